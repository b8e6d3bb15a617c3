"""Traffic shaping against a real Redis: thresholds, extension, sweeping and lifting, the
levels a throttle computes, and what leasing admits while an override is in force."""

from __future__ import annotations

import dataclasses
import time

from redis.asyncio import Redis

from tests.support import eventually
from zmta_common import redis_keys
from zmta_common.config import Zone
from zmta_common.limits import Candidate, ZoneLimits
from zmta_common.shaping import SETTLE, InForce, Overrides, Shaper, ShapingRule, Signal

SITE = "mx1.provider.test,mx2.provider.test"


def rule(**fields: object) -> ShapingRule:
    return ShapingRule.model_validate({"name": "r", "match": "slow down", "action": "suspend", "duration": 60} | fields)


def shaper(redis: Redis, rules: list[ShapingRule], zone: Zone | None = None) -> Shaper:
    return Shaper(Overrides(redis), "z", zone or Zone(), rules)


def slow_down(site: str | None = SITE, address: str | None = "192.0.2.1") -> Signal:
    return Signal(421, "4.7.0 Please slow down", "rate_limited", site, address)


async def test_a_rule_acts_at_its_threshold_within_its_window(redis: Redis) -> None:
    s = shaper(redis, [rule(threshold=3, window=30)])
    assert await s.observe(slow_down()) is None
    assert await s.observe(Signal(550, "5.1.1 no such user", "recipient_unknown", SITE, None)) is None  # no match
    assert await s.observe(slow_down()) is None
    started = await s.observe(slow_down())
    assert started is not None and (started.scope, started.site, started.action) == ("site", SITE, "suspend")
    assert started.response == "421 4.7.0 Please slow down"
    (active,) = await s.overrides.active("z")
    assert active == started


async def test_the_same_signal_while_in_force_extends_it_without_starting_it_again(redis: Redis) -> None:
    first = await shaper(redis, [rule(duration=5)]).observe(slow_down())
    assert first is not None
    longer = shaper(redis, [rule(duration=50)])
    assert await longer.observe(slow_down()) is None  # in force already: extended, no second start
    (active,) = await longer.overrides.active("z")
    assert active.started == first.started and active.expires > first.expires + 40
    assert await shaper(redis, [rule(duration=1)]).observe(slow_down()) is None
    assert (await longer.overrides.active("z"))[0].expires == active.expires  # never shortened


async def test_ended_overrides_are_swept_and_lifted_ones_are_gone(redis: Redis) -> None:
    s = shaper(redis, [rule(duration=0.3, scope="site_address"), rule(name="z", match="stop", scope="zone")])
    short = await s.observe(slow_down())
    zone_wide = await s.observe(Signal(421, "stop everything", "other", None, None))
    assert short is not None and zone_wide is not None and zone_wide.key == "zone"
    assert short.key == f"site:{SITE}|192.0.2.1"

    async def swept() -> list:
        return await s.overrides.sweep("z")

    (ended,) = await eventually(swept, timeout=5, what="the 0.3 s override to end")
    assert ended.key == short.key
    assert [o.key for o in await s.overrides.active("z")] == ["zone"]
    assert await s.overrides.lift("z", "zone") == zone_wide
    assert await s.overrides.lift("z", "zone") is None
    assert await redis.hlen(redis_keys.shaping("z")) == 0


async def test_a_throttle_halves_the_configured_limits(redis: Redis) -> None:
    zone = Zone.model_validate({"sites": {"connections": 10, "rate": "120/min"}})
    s = shaper(redis, [rule(action="throttle", connections="50%", rate="50%")], zone)
    started = await s.observe(slow_down())
    assert started is not None and (started.connections, started.rate) == (5, "60/min")


async def test_without_a_configured_rate_a_throttle_halves_what_was_being_sent(redis: Redis) -> None:
    """The queue counts what it leases to each site; "50%" of no configured rate is half of that."""
    zone = Zone.model_validate({"sites": {"connections": None}})
    limits = ZoneLimits(redis, "z", zone)
    batch = [Candidate(f"m{n}.001", f"d{n}.test", SITE) for n in range(40)]
    assert len(await limits.admit(batch, 100, time.time() + 60)) == 40
    s = shaper(redis, [rule(action="throttle", connections="50%", rate="50%")], zone)
    started = await s.observe(slow_down())
    assert started is not None
    assert started.connections == 10  # half of 20: the site has no connection limit
    assert started.rate is not None and int(started.rate.split("/")[0]) >= 20  # 40 this minute, or more per minute


async def test_leasing_holds_a_suspended_site_and_a_throttled_one_to_less(redis: Redis) -> None:
    zone = Zone.model_validate({"sites": {"connections": 4}, "domains": {"*": {"connections": 10}}})
    limits = ZoneLimits(redis, "z", zone)
    s = shaper(redis, [rule(match="stop"), rule(name="t", action="throttle", connections="50%")], zone)
    assert await s.observe(Signal(421, "stop", "other", "mx.held.test", None)) is not None
    assert await s.observe(Signal(421, "slow down", "other", SITE, None)) is not None
    shaping = InForce(await s.overrides.active("z"))
    batch = [Candidate(f"h{n}.001", "held.test", "mx.held.test") for n in range(3)]
    batch += [Candidate(f"p{n}.001", f"p{n}.test", SITE) for n in range(4)]
    batch += [Candidate("o.001", "other.test", "mx.other.test")]
    assert await limits.admit(batch, 100, time.time() + 60, shaping) == [3, 4, 7]  # 2 of 4 for the throttled site
    assert "held.test" in await limits.skip_domains()  # held back for a few seconds, then looked at again
    score = await redis.zscore(redis_keys.skip("z"), "held.test")
    assert score is not None and score <= time.time() + 5.1


async def test_a_site_that_keeps_pushing_back_is_throttled_further_once_settled(redis: Redis) -> None:
    zone = Zone.model_validate({"sites": {"connections": 20, "rate": "400/min"}})
    s = shaper(redis, [rule(action="throttle", connections="50%", rate="50%")], zone)
    first = await s.observe(slow_down())
    assert first is not None and (first.connections, first.rate) == (10, "200/min")
    # The deliveries sent at the old levels still come back refused: no change before it settles.
    assert await s.observe(slow_down()) is None
    assert (await s.overrides.active("z"))[0].connections == 10
    # Settled (its levels set SETTLE seconds ago) and refused again: half once more.
    settled = dataclasses.replace(first, updated=first.updated - SETTLE)
    await redis.hset(redis_keys.shaping("z"), first.key, settled.to_json())
    lowered = await s.observe(slow_down())
    assert lowered is not None and (lowered.connections, lowered.rate) == (5, "100/min")
    assert lowered.started == first.started and lowered.updated > first.updated
    (active,) = await s.overrides.active("z")
    assert active == lowered


async def test_a_throttle_lowers_the_open_connections_of_its_site(redis: Redis) -> None:
    """Parked connections count too: the senders hold the throttled site to its new level."""
    zone = Zone.model_validate({"sites": {"connections": 4}, "domains": {"*": {"connections": 10}}})
    limits = ZoneLimits(redis, "z", zone)
    assert [await limits.acquire_connection(f"c{n}", f"d{n}.test", SITE, ttl=30) for n in range(3)] == [True] * 3
    s = shaper(redis, [rule(action="throttle", connections="50%")], zone)
    assert await s.observe(slow_down()) is not None  # 4 -> 2: the three open ones stay, no new one
    assert not await limits.acquire_connection("c3", "d3.test", SITE, ttl=30)
    assert await limits.wanted(limits.connection_keys("d0.test", SITE)[0])  # holders close parked ones
    assert await limits.acquire_connection("o1", "other.test", "mx.other.test", ttl=30)  # another site
    for n in range(2):
        await limits.release_connection(f"c{n}", limits.connection_keys(f"d{n}.test", SITE)[0])
    assert await limits.acquire_connection("c3", "d3.test", SITE, ttl=30)  # 2 open now, the throttle's level
    assert not await limits.acquire_connection("c4", "d4.test", SITE, ttl=30)


async def _age(redis: Redis, s: Shaper, seconds: float) -> None:
    """As if the throttle's levels were set, and its site last pushed back, ``seconds`` ago."""
    (held,) = await s.overrides.active("z")
    aged = dataclasses.replace(held, updated=held.updated - seconds)
    await redis.hset(redis_keys.shaping("z"), held.key, aged.to_json())
    await redis.set(redis_keys.shaping_last("z", held.key), time.time() - seconds)


async def test_a_throttled_site_that_takes_mail_again_gets_its_limits_back_step_by_step(redis: Redis) -> None:
    zone = Zone.model_validate({"sites": {"connections": 4, "rate": "100/min"}})
    s = shaper(redis, [rule(action="throttle", connections="50%", rate="50%")], zone)
    assert await s.observe(slow_down()) is not None  # 2 connections, 50/min
    s.delivered(SITE)
    await s.recover()  # pushed back just now: no change yet
    assert [(o.connections, o.rate) for o in await s.overrides.active("z")] == [(2, "50/min")]
    steps = []
    for _ in range(5):
        await _age(redis, s, SETTLE)
        s.delivered(SITE)
        await s.recover()
        steps.append([(o.connections, o.rate) for o in await s.overrides.active("z")])
        if not steps[-1]:
            break
    # One more connection and a quarter more pace per settled step, then the configured limits.
    assert steps == [[(3, "63/min")], [(4, "79/min")], [(4, "99/min")], []]
    # A site not delivered to is left as it is.
    assert await s.observe(slow_down()) is not None
    await _age(redis, s, SETTLE)
    await s.recover()
    assert [(o.connections, o.rate) for o in await s.overrides.active("z")] == [(2, "50/min")]


async def test_a_throttle_refused_again_at_one_connection_becomes_a_suspension(redis: Redis) -> None:
    """Postfix's dead destination: a site that fails even at one connection rests."""
    zone = Zone.model_validate({"sites": {"connections": 2}})
    s = shaper(redis, [rule(action="throttle", connections="50%", duration=300)], zone)
    first = await s.observe(slow_down())
    assert first is not None and (first.action, first.connections) == ("throttle", 1)
    await _age(redis, s, SETTLE)
    dead = await s.observe(slow_down())
    assert dead is not None and (dead.action, dead.connections, dead.scope) == ("suspend", None, "site")
    assert dead.expires > time.time() + 290
    shaping = InForce(await s.overrides.active("z"))
    assert (
        await ZoneLimits(redis, "z", zone).admit([Candidate("m.001", "d.test", SITE)], 10, time.time() + 60, shaping)
        == []
    )
