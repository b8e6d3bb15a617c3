"""zmta_common.limits against a real Redis: admission, rates, skip list, connection slots, blacklist."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from tests.support import MANY_DOMAINS, Infra, eventually
from zmta_common import redis_keys
from zmta_common.config import Dns, Zone
from zmta_common.limits import Blacklist, Candidate, ZoneLimits
from zmta_common.mx import MxLookup
from zmta_sender.connections import ConnectionPool, PoolKey
from zmta_sender.errors import DeliveryError
from zmta_sender.smtp_session import SmtpSession


def zone(**kwargs: object) -> Zone:
    return Zone.model_validate(kwargs)


def candidates(domain: str, n: int, group: str | None = None, start: int = 0) -> list[Candidate]:
    return [Candidate(f"m{domain}.{i:03x}", domain, group) for i in range(start, start + n)]


async def test_in_flight_limit_and_release(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(domains={"*": {"connections": 3}}))
    expiry = time.time() + 60
    assert await limits.admit(candidates("a.test", 5), want=10, lease_expiry=expiry) == [0, 1, 2]
    assert await limits.skip_domains() == ["a.test"]
    assert await limits.admit(candidates("b.test", 2), want=10, lease_expiry=expiry) == [0, 1]
    assert await limits.admit(candidates("a.test", 1, start=9), want=10, lease_expiry=expiry) == []
    await limits.release(["ma.test.000"])
    assert await limits.admit(candidates("a.test", 2, start=9), want=10, lease_expiry=expiry) == [0]


async def test_want_caps_the_batch(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone())
    assert await limits.admit(candidates("a.test", 5) + candidates("b.test", 5), 4, time.time() + 60) == [0, 1, 2, 3]


async def test_expired_leases_free_their_place(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(domains={"*": {"connections": 1}}))
    assert await limits.admit(candidates("a.test", 1), 10, time.time() + 0.3) == [0]
    assert await limits.admit(candidates("a.test", 1, start=1), 10, time.time() + 60) == []

    async def admitted() -> bool:
        return await limits.admit(candidates("a.test", 1, start=1), 10, time.time() + 60) == [0]

    await eventually(admitted, timeout=5, what="the lost lease's place to free itself at its expiry")


async def test_rate_spaces_admissions(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"rate": "4/sec", "connections": 100}}))
    admitted_at: list[float] = []

    async def admit_next() -> bool:
        if await limits.admit(candidates("a.test", 1, start=len(admitted_at)), 10, time.time() + 60):
            admitted_at.append(time.monotonic())
            return True
        return False

    # a burst of 2, then one every 0.25 s
    assert await admit_next() and await admit_next()
    assert not await admit_next()
    for _ in range(6):
        await eventually(admit_next, timeout=2, interval=0.01, what="the next admission at 4/sec")
    gaps = [b - a for a, b in itertools.pairwise(admitted_at[1:])]
    assert min(gaps) > 0.2, gaps
    # 2 + 1.6 / 0.25 = 8 in 1.6 s, give or take one: the seventh is in by then
    assert admitted_at[6] - admitted_at[0] < 1.6, admitted_at


async def test_mx_hosts_site_limit_spans_domains(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(mx_hosts={"*.outlook.test": {"connections": 2}}))
    group = "*.outlook.test"
    mixed = candidates("a.test", 2, group) + candidates("b.test", 2, group) + candidates("c.test", 2)
    assert await limits.admit(mixed, 10, time.time() + 60) == [0, 1, 4, 5]
    assert await limits.skip_domains() == ["b.test"]  # found at the limit; a.test will be at its next try


async def test_site_of_reads_the_senders_dns_cache(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(mx_hosts={"*.outlook.test": {"connections": 2}}))
    await redis.set(redis_keys.dns("a.test"), '[["a-test.mail.outlook.test", ["192.0.2.1"]], ["backup.test", []]]')
    assert await limits.site_of(["a.test", "unknown.test"]) == {"a.test": "*.outlook.test", "unknown.test": None}


async def test_site_of_looks_up_a_domain_no_sender_has_resolved(redis: Redis, infra: Infra) -> None:
    """A cold burst to a big provider is held to its mx_hosts limit from the first lease:
    the queue resolves what the senders have not cached yet, and caches it for them."""
    lookup = MxLookup(Dns(nameservers=["127.0.0.1"], port=infra.dns.port, timeout=2), redis)
    limits = ZoneLimits(redis, "z", zone(mx_hosts={"mx.many.test": {"connections": 2}}), lookup)
    cold = [MANY_DOMAINS[0], MANY_DOMAINS[1], "nowhere.invalid"]
    assert await redis.get(redis_keys.dns(MANY_DOMAINS[0])) is None
    groups = await limits.site_of(cold)
    assert groups == {MANY_DOMAINS[0]: "mx.many.test", MANY_DOMAINS[1]: "mx.many.test", "nowhere.invalid": None}
    assert await redis.get(redis_keys.dns(MANY_DOMAINS[0])) is not None  # the senders find it cached
    admitted = await limits.admit([Candidate(f"m{d}.001", d, groups[d]) for d in cold], 10, time.time() + 60)
    assert admitted == [0, 1, 2]
    assert await limits.admit(candidates(MANY_DOMAINS[2], 1, "mx.many.test"), 10, time.time() + 60) == []


async def test_domains_with_the_same_mx_hosts_are_one_site(redis: Redis) -> None:
    """MX rollup: no configuration names the provider, its domains share the site's budget."""
    limits = ZoneLimits(redis, "z", zone(sites={"connections": 3}))
    hosts = '[["mx1.provider.test", ["192.0.2.1"]], ["MX2.provider.test.", ["192.0.2.2"]]]'
    other_order = '[["mx2.provider.test", ["192.0.2.2"]], ["mx1.provider.test", ["192.0.2.1"]]]'
    await redis.set(redis_keys.dns("a.test"), hosts)
    await redis.set(redis_keys.dns("b.test"), other_order)
    await redis.set(redis_keys.dns("c.test"), '[["mx.c.test", ["192.0.2.3"]]]')
    sites = await limits.site_of(["a.test", "b.test", "c.test"])
    assert sites == {"a.test": "mx1.provider.test,mx2.provider.test", "b.test": sites["a.test"], "c.test": "mx.c.test"}
    batch = [
        Candidate(f"m{n}.00{n}", d, sites[d]) for n, d in enumerate(["a.test", "b.test", "a.test", "b.test", "c.test"])
    ]
    assert await limits.admit(batch, 10, time.time() + 60) == [0, 1, 2, 4]  # 3 for the provider, c.test apart
    # The senders' connections count against the same site.
    keys, caps = limits.connection_keys("b.test", sites["b.test"])
    assert keys[1] == redis_keys.connections("z", "s", "mx1.provider.test,mx2.provider.test") and caps == [5, 3]


async def test_a_smarthost_zone_has_no_sites(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(smarthost="relay.test:25"))
    await redis.set(redis_keys.dns("a.test"), '[["mx.a.test", ["192.0.2.1"]]]')
    assert await limits.site_of(["a.test"]) == {"a.test": None}


async def test_connection_slots(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"connections": 2}}))
    assert await limits.acquire_connection("c1", "a.test", None, ttl=10)
    assert await limits.acquire_connection("c2", "a.test", None, ttl=0.3)
    assert not await limits.acquire_connection("c3", "a.test", None, ttl=10)
    keys, _ = limits.connection_keys("a.test", None)
    assert await limits.wanted(keys)  # c3's failed try asks holders to let go of idle connections
    await limits.release_connection("c1", keys)
    assert await limits.acquire_connection("c3", "a.test", None, ttl=10)
    # c2 was never renewed: its slot expires
    await eventually(
        lambda: limits.acquire_connection("c4", "a.test", None, ttl=10), timeout=5, what="c2's slot to expire"
    )
    await limits.renew_connections({"c3": keys, "c4": keys}, ttl=10)
    assert not await limits.acquire_connection("c5", "a.test", None, ttl=10)


async def test_blacklist_marks_expire(redis: Redis) -> None:
    blacklist = Blacklist(redis)
    await blacklist.mark("a.test", "192.0.2.1", ttl=0.3)
    await blacklist.mark("a.test", "192.0.2.2", ttl=60)
    await blacklist.mark("b.test", "192.0.2.1", ttl=60)
    assert await blacklist.listed("a.test", ["192.0.2.1", "192.0.2.2", "192.0.2.3"]) == {"192.0.2.1", "192.0.2.2"}
    assert await blacklist.count() == 3
    by_domain = await blacklist.listed_by_domain(["a.test", "b.test", "c.test"], ["192.0.2.1", "192.0.2.2"])
    assert by_domain == {"a.test": {"192.0.2.1", "192.0.2.2"}, "b.test": {"192.0.2.1"}, "c.test": set()}

    async def short_mark_gone() -> bool:
        return await blacklist.listed("a.test", ["192.0.2.1", "192.0.2.2"]) == {"192.0.2.2"}

    await eventually(short_mark_gone, timeout=5, what="the 0.3 s mark to expire")
    assert await blacklist.count() == 2


async def test_mx_hosts_site_rate_spans_domains(redis: Redis) -> None:
    limits = ZoneLimits(redis, "z", zone(mx_hosts={"mx.shared.test": {"rate": "1/min"}}))
    group = "mx.shared.test"
    batch = candidates("a.test", 1, group) + candidates("b.test", 1, group) + candidates("c.test", 1)
    # the group's rate allows one and a burst of one; the unrelated domain goes regardless
    assert await limits.admit(batch, 10, time.time() + 60) == [0, 1, 2]
    assert await limits.admit(candidates("b.test", 1, group, start=5), 10, time.time() + 60) == []


def sink_session(infra: Infra) -> tuple[Callable[[], Awaitable[SmtpSession]], PoolKey]:
    """How to open a session to one of the test sinks, and the pool key of such sessions."""
    server = next(iter(infra.sinks.values()))

    async def connect() -> SmtpSession:
        return await SmtpSession.connect(
            server.host, infra.sink_port, source_ip=None, connect_timeout=5, command_timeout=5
        )

    return connect, (None, "mta.test", server.host, infra.sink_port, "a.test")


async def test_a_stale_parked_connection_frees_its_slot_when_found(redis: Redis, infra: Infra) -> None:
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"connections": 1}}))
    pool = ConnectionPool(limits, idle_ttl=0)  # a parked connection is stale at once
    connect, key = sink_session(infra)
    conn = await pool.open("a.test", None, connect)
    await pool.give(key, conn)  # parked, holding the domain's only slot
    assert not await limits.acquire_connection("other", "a.test", None, 15)
    assert await pool.take(key) is None
    assert await limits.acquire_connection("other", "a.test", None, 15)  # freed at once, not in 15 s
    assert not conn.session.usable


async def test_a_new_connection_to_a_full_site_closes_our_parked_one_to_another_domain(
    redis: Redis, infra: Infra
) -> None:
    """Connections are pooled per recipient domain, so a site's budget is mostly taken by
    parked ones: a delivery to another domain of the site closes one of ours at once."""
    limits = ZoneLimits(redis, "z", zone(sites={"connections": 1}))
    pool = ConnectionPool(limits, idle_ttl=30, slot_wait=0.5)
    connect, key = sink_session(infra)
    first = await pool.open("a.test", "mx.shared.test", connect)
    await pool.give(key, first)  # parked, holding the site's only slot
    second = await pool.open("b.test", "mx.shared.test", connect)  # not after slot_wait: no DeliveryError
    assert not first.session.usable and pool.idle == 0
    # A parked connection of another site is left alone (and this site has no room left).
    other_key = (*key[:4], "c.test")
    third = await pool.open("c.test", "mx.other.test", connect)
    await pool.give(other_key, third)
    with pytest.raises(DeliveryError, match=r"no free connection slot for d\.test"):
        await pool.open("d.test", "mx.shared.test", connect)
    assert pool.idle == 1 and third.session.usable
    await pool.discard(second)
    await pool.close_all()


async def test_a_connection_taken_while_the_upkeep_runs_is_not_parked_again(redis: Redis, infra: Infra) -> None:
    """take() frees a stale connection's slot (an await) while the upkeep task goes over the
    parked connections: the one take() hands out must not stay parked for another delivery."""
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"connections": 5}}))
    pool = ConnectionPool(limits, idle_ttl=30)
    connect, key = sink_session(infra)
    good = await pool.open("a.test", None, connect)
    await pool.give(key, good)
    stale = await pool.open("a.test", None, connect)
    await pool.give(key, stale)  # parked last: found first
    stale.session.close()  # the server dropped it
    upkeep = asyncio.create_task(pool.maintain())
    taken = await pool.take(key)
    await upkeep
    assert taken is good
    assert pool.idle == 0  # in use, so not parked
    await pool.discard(good)


async def test_close_all_frees_the_slots_of_connections_still_in_use(redis: Redis, infra: Infra) -> None:
    """A stopping sender closes its pool while cancelled deliveries still hold connections:
    their slots are freed at once, not left to hold the domain's limit for the slot_ttl."""
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"connections": 2}}))
    pool = ConnectionPool(limits)
    connect, key = sink_session(infra)
    parked = await pool.open("a.test", None, connect)
    await pool.give(key, parked)
    in_use = await pool.open("a.test", None, connect)  # taken by a delivery, never given back
    assert not await limits.acquire_connection("other", "a.test", None, 15)
    await pool.close_all()
    assert await limits.acquire_connection("other-1", "a.test", None, 15)
    assert await limits.acquire_connection("other-2", "a.test", None, 15)  # both slots free
    assert not in_use.session.usable


async def test_close_all_frees_the_slot_of_a_connection_whose_quit_hangs(redis: Redis) -> None:
    """A delivery cancelled at stop QUITs its connection, and the server does not answer: the
    stopping sender's close_all() still drops that connection and frees its slot."""
    heard: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mute.test ready\r\n")
        while line := await reader.readline():
            heard.append(line)  # and never a reply
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limits = ZoneLimits(redis, "z", zone(domains={"a.test": {"connections": 1}}))
    pool = ConnectionPool(limits)

    async def connect() -> SmtpSession:
        return await SmtpSession.connect("127.0.0.1", port, source_ip=None, connect_timeout=5, command_timeout=5)

    conn = await pool.open("a.test", None, connect)
    quitting = asyncio.create_task(pool.discard(conn))
    await eventually(lambda: b"QUIT\r\n" in heard, what="the QUIT sent")
    assert not await limits.acquire_connection("other", "a.test", None, 15)
    await pool.close_all()
    assert await limits.acquire_connection("other", "a.test", None, 15)  # freed now, not in 15 s
    await quitting  # the QUIT ends with the connection, not after its 5 s timeout
    server.close()
    await server.wait_closed()
