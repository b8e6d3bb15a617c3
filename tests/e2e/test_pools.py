"""Sender pods on their slice of the pool, and warm-up ratios, with real sender processes."""

from __future__ import annotations

import asyncio
from collections import Counter

from redis.asyncio import Redis

from tests.support import MANY_DOMAINS, MANY_DOMAINS_MX, Deployment, DeploymentFactory, eventually, log_entries
from zmta_common import redis_keys

POOL = [{"name": f"out{n}.mta.test", "address": f"127.0.0.{n}"} for n in (11, 12, 13, 14)]


def send_many(d: Deployment, count: int, tag: str) -> None:
    """``count`` deliveries to addresses spread over many domains, at most 1000 per message."""
    for start in range(0, count, 1000):
        rcpts = [f"{tag}{n}@{MANY_DOMAINS[n % len(MANY_DOMAINS)]}" for n in range(start, min(count, start + 1000))]
        d.smtp_send("s@origin.test", rcpts, f"Subject: {tag}\r\n\r\nbody\r\n".encode())


async def test_a_pod_only_uses_its_slice_of_the_pool(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"pool": POOL}}}, senders={})
    await asyncio.to_thread(d.system.start_sender, "default", True, "--slice", "1/2")
    await asyncio.to_thread(send_many, d, 60, "slice")
    sink = sinks[MANY_DOMAINS_MX]
    await eventually(lambda: len(sink.messages) == 60, what="60 deliveries")
    used = Counter((m.peer[0], m.helo) for m in sink.messages)
    assert set(used) == {("127.0.0.12", "out12.mta.test"), ("127.0.0.14", "out14.mta.test")}


async def test_a_warm_up_address_carries_its_ratio(deploy: DeploymentFactory, sinks: dict) -> None:
    pool = [*POOL[:3], {"name": "warm.mta.test", "address": "127.0.0.15", "ratio": 0.05}]
    d = await deploy({"zones": {"default": {"pool": pool, "connections": 20}}}, senders={"default": 2})
    await asyncio.to_thread(send_many, d, 2000, "warm")
    sink = sinks[MANY_DOMAINS_MX]
    await eventually(lambda: len(sink.messages) == 2000, timeout=120, what="2000 deliveries")
    share = Counter(m.peer[0] for m in sink.messages)["127.0.0.15"] / 2000
    assert 0.03 <= share <= 0.07, share


def attempts_by_delivery(d: Deployment, status: str) -> dict[str, str]:
    """From the senders' logs: delivery id.seq -> the local address of its attempt with ``status``."""
    found = {}
    for process in d.system.processes:
        if process.name.startswith("sender-") and process.log_path is not None:
            for entry in log_entries(process.log_path, status):
                found[f"{entry['id']}.{entry['seq']}"] = entry["local_address"]
    return found


async def test_a_retry_leaves_from_the_same_address_whichever_pod_asks(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"pool": POOL, "defer_times": [1, 1, 60]}}}, senders={})
    for part in ("0/2", "1/2"):
        await asyncio.to_thread(d.system.start_sender, "default", True, "--slice", part)
    sink = sinks[MANY_DOMAINS_MX]
    rcpts = [f"grey{n}@{MANY_DOMAINS[n]}" for n in range(30)]
    for rcpt in rcpts:
        sink.handler.scripted[rcpt] = ["451 4.7.1 Greylisted, please try again later"]
    await asyncio.to_thread(send_many_to, d, rcpts)
    await eventually(lambda: len(sink.messages) == 30, timeout=60, what="30 deliveries after greylisting")
    # The sink has a message before its sender has the 250 and logs the delivery.
    await eventually(lambda: len(attempts_by_delivery(d, "delivered")) == 30, what="30 deliveries logged")
    deferred, delivered = attempts_by_delivery(d, "deferred"), attempts_by_delivery(d, "delivered")
    assert len(deferred) == len(delivered) == 30
    assert all(deferred[key] == delivered[key] for key in delivered)
    logs = [p.log_path.read_text() for p in d.system.processes if p.name.startswith("sender-")]  # type: ignore[union-attr]
    assert all('"delivered"' in text for text in logs)  # both pods had their share


async def test_a_quiet_pods_deliveries_go_to_the_others(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"pool": POOL}}, "queue": {"sender_timeout": 1}}, senders={})
    await asyncio.to_thread(d.system.start_sender, "default", True, "--slice", "0/2")
    gone = await asyncio.to_thread(d.system.start_sender, "default", True, "--slice", "1/2")
    redis = Redis.from_url(d.config.dbs.redis)
    try:
        # The queue notes each pod that asks for work; pod 1's deliveries wait for it while it asks.
        await eventually(lambda: redis.hexists(redis_keys.pods("default"), "1/2"), what="pod 1 seen by the queue")
    finally:
        await redis.aclose()
    await asyncio.to_thread(gone.stop)
    # Sent at once: pod 1's share waits until it has asked for nothing for the sender_timeout.
    await asyncio.to_thread(send_many, d, 20, "quiet")
    sink = sinks[MANY_DOMAINS_MX]
    await eventually(lambda: len(sink.messages) == 20, what="20 deliveries by the remaining pod")
    assert {m.peer[0] for m in sink.messages} <= {"127.0.0.11", "127.0.0.13"}  # pod 0's addresses


def send_many_to(d: Deployment, rcpts: list[str]) -> None:
    d.smtp_send("s@origin.test", rcpts, b"Subject: grey\r\n\r\nbody\r\n")


async def test_ipv6_when_the_zone_has_ipv6_addresses(deploy: DeploymentFactory, sinks: dict) -> None:
    pool = [{"name": "out6.mta.test", "address": "::1"}, {"name": "out41.mta.test", "address": "127.0.0.41"}]
    d = await deploy({"zones": {"default": {"pool": pool, "ignore_ipv6": False}}})
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@v6.test", "y@a.test"], b"Subject: v6\r\n\r\nx\r\n")
    await eventually(lambda: sinks["::1"].messages and sinks["127.0.0.2"].messages, what="both deliveries")
    assert (sinks["::1"].messages[0].peer[0], sinks["::1"].messages[0].helo) == ("::1", "out6.mta.test")
    assert (sinks["127.0.0.2"].messages[0].peer[0], sinks["127.0.0.2"].messages[0].helo) == (
        "127.0.0.41",
        "out41.mta.test",
    )
