"""Sender pods on their slice of the pool, and warm-up ratios, with real sender processes."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import MANY_DOMAINS, MANY_DOMAINS_MX, Deployment, DeploymentFactory, eventually

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
