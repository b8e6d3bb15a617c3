"""Limits that hold for a sending zone as a whole, across all its sender pods, in Redis.

Three kinds, each counted per recipient domain and per *site* (the set of MX hosts the
domain's mail goes to, or the ``mx_hosts`` pattern its best MX host falls under; see
:mod:`zmta_common.sites`):

* **in flight** (the queue, when it leases): a delivery leased for a domain takes a
  place in a sorted set scored with its lease expiry; no more than ``connections``
  are leased at once. A report frees the place; a lost one frees itself at expiry.
* **rate** (the queue, when it leases): GCRA, one theoretical-arrival-time key per
  domain or site, so "60/min" admits a delivery every second with a burst of one.
* **open connections** (the senders): every open SMTP connection, busy or idle in the
  reuse pool, holds a slot with an expiry its sender keeps renewing. A sender that
  finds no free slot raises a short-lived *want* flag, and senders holding idle
  connections for that domain close them.

A domain that is at a limit goes on the zone's skip list (a sorted set scored with
the time it may have room again), which the queue leaves out of its next queries,
as the original's skipDomains. Blacklisted local addresses live here too, and the count of
refused SMTP AUTH attempts per client address (:class:`AuthFailures`).

Every check-and-take is one Lua script, so pods and queue replicas cannot race.
The scripts append domains to key prefixes of :mod:`zmta_common.redis_keys`, so this
needs one Redis, not a cluster.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from . import redis_keys
from .config import Limit, Zone, parse_rate
from .domains import canonical_domain
from .mx import DnsFailure, Hosts, MxLookup, parse_hosts
from .shaping import InForce, Override, scope_key

# MX lookups the queue runs at once for domains that no sender has resolved yet.
MX_LOOKUPS = 20
# Seconds the domains of a suspended site stay on the skip list before they are looked at again.
SUSPENDED_RECHECK = 5.0

# ARGV: the zone's skip key, inflight, rate, lease and leased prefixes, now, lease_expiry,
# want, then 9 per candidate: member, domain, site ("" for none), domain connections, domain
# rate count, domain rate period, site connections, site rate count, site rate period
# (0 for no limit).
_ADMIT = """
local skip_key, inflight, rate, lease, leased = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, expiry, want = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local first = 9
local minute = ':' .. tostring(math.floor(now / 60))
local admitted = {}

local function room(kind, name, connections)
    if connections <= 0 then return true end
    local key = inflight .. kind .. ':' .. name
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    return redis.call('ZCARD', key) < connections
end

local function next_tat(kind, name, count, period)
    -- GCRA: nil when over the rate, else the new theoretical arrival time
    if count <= 0 then return 0 end
    local interval = period / count
    local tat = tonumber(redis.call('GET', rate .. kind .. ':' .. name) or now)
    if tat - now > interval + 0.001 then return nil, tat - interval end  -- 1 ms for rounding
    return math.max(tat, now) + interval
end

local function take(kind, name, member, connections, tat, period)
    if connections > 0 then
        redis.call('ZADD', inflight .. kind .. ':' .. name, expiry, member)
    end
    if tat > 0 then
        local key = rate .. kind .. ':' .. name
        -- tostring() would keep 14 digits only: too few for a Unix time with microseconds
        redis.call('SET', key, string.format('%.6f', tat), 'PX', math.ceil((tat - now + period) * 1000))
    end
end

local i = first
while i + 8 <= #ARGV and #admitted < want do
    local member, domain, site = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local dconn, dcount, dperiod = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
    local sconn, scount, speriod = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8])
    local free_at = nil
    if not room('d', domain, dconn) or (site ~= '' and not room('s', site, sconn)) then
        free_at = now + 0.5  -- or sooner: a report that frees a place takes it off the list
    end
    local dtat, s_tat = 0, 0
    if not free_at then
        local wait
        dtat, wait = next_tat('d', domain, dcount, dperiod)
        if not dtat then free_at = wait end
    end
    if not free_at and site ~= '' then
        local wait
        s_tat, wait = next_tat('s', site, scount, speriod)
        if not s_tat then free_at = wait end
    end
    if free_at then
        redis.call('ZADD', skip_key, 'GT', free_at, domain)
    else
        take('d', domain, member, dconn, dtat, dperiod)
        if site ~= '' then
            take('s', site, member, sconn, s_tat, speriod)
            -- what the site is being sent, for a shaping throttle of "50%" of it
            local count_key = leased .. site .. minute
            if redis.call('INCR', count_key) == 1 then redis.call('EXPIRE', count_key, 150) end
        end
        redis.call('SET', lease .. member, domain .. '\\t' .. site,
                   'PX', math.ceil((expiry - now) * 1000) + 60000)
        table.insert(admitted, (i - first) / 9)
    end
    i = i + 9
end
return admitted
"""

# ARGV: the zone's skip key, inflight and lease prefixes, then members
_RELEASE = """
local skip_key, inflight, lease = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
    local lease_key = lease .. ARGV[i]
    local where = redis.call('GET', lease_key)
    if where then
        local tab = string.find(where, '\\t', 1, true)
        local domain, site = string.sub(where, 1, tab - 1), string.sub(where, tab + 1)
        redis.call('ZREM', inflight .. 'd:' .. domain, ARGV[i])
        if site ~= '' then redis.call('ZREM', inflight .. 's:' .. site, ARGV[i]) end
        redis.call('DEL', lease_key)
        -- a place is free again: the domain may be leased at once (a rate wait keeps its own key)
        redis.call('ZREM', skip_key, domain)
    end
end
return 0
"""

# ARGV: the zone's inflight and lease prefixes, new expiry (unix seconds), then members
_RENEW = """
local inflight, lease, expiry = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ttl = math.ceil((expiry - tonumber(redis.call('TIME')[1])) * 1000) + 60000
for i = 4, #ARGV do
    local lease_key = lease .. ARGV[i]
    local where = redis.call('GET', lease_key)
    if where then
        local tab = string.find(where, '\\t', 1, true)
        local domain, site = string.sub(where, 1, tab - 1), string.sub(where, tab + 1)
        redis.call('ZADD', inflight .. 'd:' .. domain, 'XX', expiry, ARGV[i])
        if site ~= '' then
            redis.call('ZADD', inflight .. 's:' .. site, 'XX', expiry, ARGV[i])
        end
        redis.call('PEXPIRE', lease_key, ttl)
    end
end
return 0
"""

# KEYS: connection sets (domain, site); ARGV: now, expiry, connection id, the zone's shaping
# hash and the site's field in it ("" for none), limits (0: none), want keys
_ACQUIRE = """
local now, expiry, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local limits = {}
for i = 1, #KEYS do limits[i] = tonumber(ARGV[5 + i]) end
if ARGV[4] ~= '' then
    -- a shaping throttle in force lowers the site's connections (KEYS[2])
    local raw = redis.call('HGET', ARGV[4], ARGV[5])
    if raw then
        local held = cjson.decode(raw)
        local cap = held.connections
        if held.expires > now and held.action == 'throttle' and type(cap) == 'number'
                and (limits[2] <= 0 or cap < limits[2]) then
            limits[2] = cap
        end
    end
end
for i = 1, #KEYS do
    if limits[i] > 0 then
        redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
        if redis.call('ZSCORE', KEYS[i], id) == false and redis.call('ZCARD', KEYS[i]) >= limits[i] then
            redis.call('SET', ARGV[5 + #KEYS + i], '1', 'PX', 2000)
            return 0
        end
    end
end
for i = 1, #KEYS do
    if limits[i] > 0 then redis.call('ZADD', KEYS[i], expiry, id) end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A ready delivery the queue would like to lease."""

    member: str  # "<id>.<seq>"
    domain: str
    site: str | None  # the domain's site (zmta_common.sites), None when its MX is unknown


def _rate(text: str | None) -> tuple[int, float]:
    return parse_rate(text) if text else (0, 0.0)


def _throttled(limit: Limit, override: Override | None) -> Limit:
    """A site's limits, lowered by a shaping throttle in force (never raised by one)."""
    if override is None or override.action != "throttle":
        return limit
    connections = min(limit.connections or override.connections or 0, override.connections or limit.connections or 0)
    rate = limit.rate
    if override.rate and (not limit.rate or _per_second(override.rate) < _per_second(limit.rate)):
        rate = override.rate
    return Limit(connections=connections or None, rate=rate)


def _per_second(rate: str) -> float:
    count, period = parse_rate(rate)
    return count / period


class ZoneLimits:
    def __init__(self, redis: Redis, zone_name: str, zone: Zone, lookup: MxLookup | None = None) -> None:
        self.redis = redis
        self.zone_name = zone_name
        self.zone = zone
        # Where the queue finds the MX hosts of a domain no sender has resolved yet.
        self.lookup = lookup
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._acquire = redis.register_script(_ACQUIRE)
        # What the scripts build their keys from.
        self._skip = redis_keys.skip(zone_name)
        self._inflight = redis_keys.inflight_prefix(zone_name)
        self._rate = redis_keys.rate_prefix(zone_name)
        self._lease = redis_keys.lease_prefix(zone_name)
        self._leased = redis_keys.leased_prefix(zone_name)

    # -- the queue -----------------------------------------------------------

    async def skip_domains(self) -> list[str]:
        """Domains at a limit right now; the queue leaves them out of its query."""
        key = self._skip
        now = time.time()
        await self.redis.zremrangebyscore(key, "-inf", now)
        return [_text(d) for d in await self.redis.zrangebyscore(key, now, "+inf")]

    async def next_room(self) -> float:
        """Seconds until the soonest domain at a limit may have room again; 0 when none is
        at a limit. (A rate limit knows its time exactly; a connection limit guesses.)"""
        soonest = await self.redis.zrangebyscore(self._skip, time.time(), "+inf", start=0, num=1, withscores=True)
        return max(0.0, float(soonest[0][1]) - time.time()) if soonest else 0.0

    async def admit(
        self, candidates: list[Candidate], want: int, lease_expiry: float, shaping: InForce | None = None
    ) -> list[int]:
        """Indices of the candidates (in order, at most ``want``) that fit every limit, the
        traffic shaping ``shaping`` holds them to included; takes their places."""
        shaping = shaping or InForce([])
        held = {c.domain: o.expires for c in candidates if (o := shaping.site(c.site)) and o.action == "suspend"}
        if held:
            await self._hold(held)
        passing = [i for i, c in enumerate(candidates) if c.domain not in held]
        args: list[str | float | int] = [
            self._skip,
            self._inflight,
            self._rate,
            self._lease,
            self._leased,
            time.time(),
            lease_expiry,
            want,
        ]
        for c in (candidates[i] for i in passing):
            policy = self.zone.domain_policy(c.domain)
            site = _throttled(self.zone.site_limit(c.site), shaping.site(c.site)) if c.site else None
            args += [c.member, c.domain, c.site or "", policy.connections or 0, *_rate(policy.rate)]
            args += [(site.connections or 0) if site else 0, *(_rate(site.rate) if site else (0, 0.0))]
        admitted = await self._admit(args=args)
        return [passing[int(i)] for i in admitted]

    async def _hold(self, until: dict[str, float]) -> None:
        """Put the domains of suspended sites on the skip list: until the suspension ends,
        or a few seconds, whichever is sooner (an operator may lift it through the API)."""
        soon = time.time() + SUSPENDED_RECHECK
        await self.redis.zadd(self._skip, {d: min(t, soon) for d, t in until.items()}, gt=True)

    async def release(self, members: list[str]) -> None:
        """Free the in-flight places of finished deliveries."""
        if members:
            await self._release(args=[self._skip, self._inflight, self._lease, *members])

    async def renew(self, members: list[str], expiry: float) -> None:
        """Keep the in-flight places of deliveries still running until ``expiry`` (unix seconds)."""
        if members:
            await self._renew(args=[self._inflight, self._lease, expiry, *members])

    async def site_of(self, domains: list[str]) -> dict[str, str | None]:
        """Each domain's site, from the MX answers cached in Redis; a domain not in the
        cache is looked up first (when this has a lookup), so that a burst to a domain no
        sender has resolved yet is held to its site's limit from the start."""
        if not domains or self.zone.smarthost:
            return dict.fromkeys(domains)
        cached = await self.redis.mget([redis_keys.dns(d) for d in domains])
        hosts = {domain: parse_hosts(raw) for domain, raw in zip(domains, cached, strict=True)}
        unknown = [d for d, found in hosts.items() if found is None]
        if unknown and self.lookup is not None:
            hosts.update(zip(unknown, await self._look_up(unknown), strict=True))
        sites: dict[str, str | None] = {}
        for domain, found in hosts.items():
            sites[domain] = self.zone.site_of([host for host, _ in found]) if found else None
        return sites

    async def _look_up(self, domains: list[str]) -> list[Hosts | None]:
        """MX hosts of each domain, None where DNS has no answer (the sender will say why)."""
        assert self.lookup is not None
        lookup, slots = self.lookup, asyncio.Semaphore(MX_LOOKUPS)

        async def one(domain: str) -> Hosts | None:
            async with slots:
                try:
                    return await lookup.resolve(domain)  # the cache was just read
                except DnsFailure:
                    return None

        return list(await asyncio.gather(*(one(d) for d in domains)))

    # -- the senders ---------------------------------------------------------

    def connection_keys(self, domain: str, site: str | None) -> tuple[list[str], list[int]]:
        keys = [redis_keys.connections(self.zone_name, "d", domain)]
        limits = [self.zone.domain_policy(canonical_domain(domain)).connections or 0]
        if site is not None:
            keys.append(redis_keys.connections(self.zone_name, "s", site))
            limits.append(self.zone.site_limit(site).connections or 0)
        return keys, limits

    async def acquire_connection(self, conn_id: str, domain: str, site: str | None, ttl: float) -> bool:
        """Take a connection slot for ``domain`` (and its site) if one is free; a shaping
        throttle in force for the site lowers its connections here too, parked ones included."""
        keys, limits = self.connection_keys(domain, site)
        now = time.time()
        wants = [redis_keys.want(k) for k in keys]
        shaping = [redis_keys.shaping(self.zone_name), scope_key("site", site)] if site else ["", ""]
        return bool(await self._acquire(keys=keys, args=[now, now + ttl, conn_id, *shaping, *limits, *wants]))

    async def renew_connections(self, held: dict[str, list[str]], ttl: float) -> None:
        """Push the expiry of every slot in ``held`` (connection id -> its keys) forward."""
        if not held:
            return
        expiry = time.time() + ttl
        async with self.redis.pipeline(transaction=False) as pipe:
            for conn_id, keys in held.items():
                for key in keys:
                    pipe.zadd(key, {conn_id: expiry}, xx=True)
            await pipe.execute()

    async def release_connection(self, conn_id: str, keys: list[str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrem(key, conn_id)
            await pipe.execute()

    async def wanted(self, keys: list[str]) -> bool:
        """Does another sender wait for a slot under any of these connection keys?"""
        wants = [redis_keys.want(k) for k in keys]
        return bool(wants) and bool(await self.redis.exists(*wants))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class BlacklistMark:
    """A local address a recipient domain said is listed, and the delivery that was told so."""

    domain: str
    address: str
    expires: float  # Unix time
    created: float  # Unix time the mark was set
    id: str = ""  # the delivery (queue id, seq) whose reply set the mark
    seq: str = ""
    response: str = ""  # that reply


class Blacklist:
    """(recipient domain, local address) pairs that a server said are listed, until they
    expire: a sorted set scored with the expiry, and beside it what set each mark."""

    KEY = redis_keys.BLACKLIST

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def mark(
        self, domain: str, address: str, ttl: float, *, id: str = "", seq: str = "", response: str = ""
    ) -> None:
        member = redis_keys.blacklist_member(domain, address)
        now = time.time()
        why = json.dumps({"id": id, "seq": seq, "response": response, "created": now})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.KEY, {member: now + ttl})
            pipe.hset(redis_keys.BLACKLIST_WHY, member, why)
            await pipe.execute()

    async def listed(self, domain: str, addresses: list[str]) -> set[str]:
        return (await self.listed_by_domain([domain], addresses))[domain]

    async def listed_by_domain(self, domains: list[str], addresses: list[str]) -> dict[str, set[str]]:
        """``listed`` for many domains in one round trip."""
        if not domains or not addresses:
            return {d: set() for d in domains}
        async with self.redis.pipeline(transaction=False) as pipe:
            for domain in domains:
                pipe.zmscore(self.KEY, [redis_keys.blacklist_member(domain, a) for a in addresses])
            results = await pipe.execute()
        now = time.time()
        return {
            domain: {a for a, score in zip(addresses, scores, strict=True) if score is not None and score > now}
            for domain, scores in zip(domains, results, strict=True)
        }

    async def count(self) -> int:
        await self._purge()
        return int(await self.redis.zcard(self.KEY))

    async def entries(self) -> list[BlacklistMark]:
        """Every mark in force, soonest expiry first."""
        now = await self._purge()
        marks: list[Any] = await self.redis.zrangebyscore(self.KEY, now, "+inf", withscores=True)
        members = [_text(mark[0]) for mark in marks]
        whys = await self.redis.hmget(redis_keys.BLACKLIST_WHY, members) if members else []
        entries = []
        for member, mark, raw in zip(members, marks, whys, strict=True):
            domain, _, address = member.partition("|")
            why = json.loads(raw) if raw else {}
            entries.append(
                BlacklistMark(
                    domain,
                    address,
                    float(mark[1]),
                    float(why.get("created", mark[1])),
                    str(why.get("id", "")),
                    str(why.get("seq", "")),
                    str(why.get("response", "")),
                )
            )
        return entries

    async def _purge(self) -> float:
        """Drop the marks that have expired (and what set them); returns now."""
        now = time.time()
        gone = [_text(m) for m in await self.redis.zrangebyscore(self.KEY, "-inf", now)]
        if gone:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.KEY, *gone)
                pipe.hdel(redis_keys.BLACKLIST_WHY, *gone)
                await pipe.execute()
        return now


class AuthFailures:
    """Refused SMTP AUTH attempts per interface and client address, counted in fixed
    windows shared by every ingest process: a guesser spread over many connections (or
    pods) is stopped as one."""

    def __init__(self, redis: Redis, interface: str, limit: int, window: float) -> None:
        self.redis = redis
        self.interface = interface
        self.limit = limit
        self.window_ms = max(1, int(window * 1000))

    def _key(self, client: str) -> str:
        return redis_keys.auth_failures(self.interface, client)

    async def locked(self, client: str) -> bool:
        """Whether ``client`` has used up its failures for the current window."""
        count = await self.redis.get(self._key(client))
        return count is not None and int(count) >= self.limit

    async def add(self, client: str) -> int:
        """Count a refused attempt; the window starts with the first one. Returns the count."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._key(client))
            pipe.pexpire(self._key(client), self.window_ms, nx=True)
            count, _ = await pipe.execute()
        return int(count)
