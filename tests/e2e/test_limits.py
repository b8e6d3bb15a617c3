"""Limits that hold for a zone across all its sender pods, and blacklist back-off."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from redis.asyncio import Redis

from tests.support import MANY_DOMAINS, MANY_DOMAINS_MX, Deployment, DeploymentFactory, eventually
from zmta_common.limits import Blacklist


def send(d: Deployment, rcpts: list[str]) -> None:
    d.smtp_send("s@origin.test", rcpts, b"Subject: limits\r\n\r\nbody\r\n")


async def test_domain_connection_limit_holds_across_three_pods(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"domains": {"slow.test": {"connections": 2}}}}}, senders={"default": 3})
    sink = sinks["127.0.0.4"]
    sink.handler.data_delay = 0.3
    await asyncio.to_thread(send, d, [f"r{n}@slow.test" for n in range(12)])
    await eventually(lambda: len(sink.messages) == 12, timeout=60, what="12 deliveries")
    assert sink.handler.open_max == 2  # the limit was reached, never passed


@pytest.mark.parametrize(
    "zone",
    [
        pytest.param({"mx_hosts": {"mx.many.test": {"connections": 2}}}, id="mx_hosts-pattern"),
        pytest.param({"sites": {"connections": 2}}, id="mx-rollup"),
    ],
)
async def test_a_site_limit_counts_all_its_domains_together(deploy: DeploymentFactory, sinks: dict, zone: dict) -> None:
    """The ten domains share one MX host: one site, one budget, with a pattern for it or
    without any (MX rollup), from the first delivery of the burst on."""
    d = await deploy({"zones": {"default": zone}}, senders={"default": 3})
    sink = sinks[MANY_DOMAINS_MX]
    sink.handler.data_delay = 0.2
    await asyncio.to_thread(send, d, [f"r{n}@{MANY_DOMAINS[n]}" for n in range(10)])  # 10 domains, one MX
    await eventually(lambda: len(sink.messages) == 10, timeout=60, what="10 deliveries")
    assert sink.handler.open_max == 2


async def test_domain_rate_limit_holds_across_three_pods(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"domains": {"b.test": {"rate": "300/min"}}}}}, senders={"default": 3})
    sink = sinks["127.0.0.3"]
    await asyncio.to_thread(send, d, [f"r{n}@b.test" for n in range(36)])
    await eventually(lambda: len(sink.messages) == 36, timeout=60, what="36 deliveries")
    times = sorted(m.time for m in sink.messages)
    # Never faster than the limit: 300/min is 30 in any 6 s (and a burst of one), 10% for timing.
    busiest = max(sum(1 for t in times if start <= t < start + 6) for start in times)
    assert busiest <= 33, busiest
    assert times[-1] - times[0] >= 34 / 5 * 0.9  # 35 intervals of 0.2 s at least, less the burst
    # Nor held back far beyond it: at 60/min (a limit read wrong) the 36 would take 35 s.
    assert times[-1] - times[0] < 25, times[-1] - times[0]


async def test_a_blacklisted_address_is_left_for_another(deploy: DeploymentFactory, sinks: dict) -> None:
    pool = [{"name": "out21.mta.test", "address": "127.0.0.21"}, {"name": "out22.mta.test", "address": "127.0.0.22"}]
    d = await deploy({"zones": {"default": {"pool": pool, "defer_times": [1, 1, 1, 1, 1, 60]}}})
    listed = "554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org"
    sinks["127.0.0.2"].handler.scripted["once@a.test"] = [listed]
    sinks["127.0.0.3"].handler.scripted["twice@b.test"] = [listed, listed]
    await asyncio.to_thread(send, d, ["once@a.test", "twice@b.test"])

    # once@a.test: listed from one address, delivered from the other at the next attempt.
    await eventually(lambda: sinks["127.0.0.2"].messages, what="delivery from the other address")
    redis = Redis.from_url(d.config.dbs.redis)
    try:
        marks = await Blacklist(redis).entries()
    finally:
        await redis.aclose()
    (first,) = [m for m in marks if m.domain == "a.test"]
    delivered = sinks["127.0.0.2"].messages[0]
    assert delivered.peer[0] != first.address
    # The mark records the delivery and the reply that set it.
    assert f" id {first.id}.{first.seq}\r\n".encode() in delivered.data
    assert listed in first.response

    # twice@b.test: both addresses listed, so the delivery waits in the queue, not bounced.
    async def waiting() -> bool:
        rows = await d.store.pool.fetch("SELECT attempts, last_response FROM deliveries")
        return bool(rows) and "Every local address" in (rows[0]["last_response"] or "")

    await eventually(waiting, what="a deferral with no address left")
    assert sinks["127.0.0.3"].messages == []
    async with httpx.AsyncClient() as http:
        await eventually(lambda: _gauge(http, d), what="zonemta_blacklisted 3.0 on the queue's metrics")


async def _gauge(http: httpx.AsyncClient, d: Deployment) -> bool:
    text = (await http.get(f"http://127.0.0.1:{d.config.metrics.queue_port}/metrics")).text
    return "zonemta_blacklisted 3.0" in text


async def test_throttling_spaces_messages_on_one_connection(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"throttling": "120/min", "domains": {"b.test": {"connections": 1}}}}})
    await asyncio.to_thread(send, d, [f"t{n}@b.test" for n in range(4)])
    sink = sinks["127.0.0.3"]
    await eventually(lambda: len(sink.messages) == 4, what="4 deliveries")
    times = sorted(m.time for m in sink.messages)
    assert len({m.peer for m in sink.messages}) == 1  # one connection carried them all
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.45  # 120/min: one every 0.5 s


async def test_disabled_addresses_are_never_used_for_their_domain(deploy: DeploymentFactory, sinks: dict) -> None:
    pool = [{"name": "out51.mta.test", "address": "127.0.0.51"}, {"name": "out52.mta.test", "address": "127.0.0.52"}]
    d = await deploy(
        {"zones": {"default": {"pool": pool, "domains": {"a.test": {"disabled_addresses": ["127.0.0.51"]}}}}}
    )
    await asyncio.to_thread(send, d, [f"x{n}@a.test" for n in range(10)] + [f"y{n}@b.test" for n in range(10)])
    await eventually(lambda: len(sinks["127.0.0.2"].messages) == len(sinks["127.0.0.3"].messages) == 10, what="20")
    assert {m.peer[0] for m in sinks["127.0.0.2"].messages} == {"127.0.0.52"}
    assert {m.peer[0] for m in sinks["127.0.0.3"].messages} == {"127.0.0.51", "127.0.0.52"}  # b.test may use both
