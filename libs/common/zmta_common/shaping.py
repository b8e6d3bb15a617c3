"""Adaptive traffic shaping: the zone changes its own pace when receiving sites push back.

Rules are data (the shipped ``shaping.yaml`` beside this module, after the operator's files
in ``shaping.rules_files``); the first rule that matches a reply decides. A rule matches a
reply's text (a regular expression over the reply as the bounce rules read it,
:func:`zmta_common.replies.normalise`) and/or its classifier category, once or ``threshold``
times within ``window`` seconds, and puts an *override* in force for ``duration`` seconds:

``suspend``
    at ``site`` scope: no delivery to any domain of the site is leased; at ``site_address``
    scope: the site's domains get other local addresses of the pool (none left: they
    wait); at ``zone`` scope: the zone leases nothing.
``throttle`` (``site`` scope)
    the site's ``connections`` and ``rate`` are lowered: ``"50%"`` of the configured value
    (where the site has none: of 20 connections, and of the rate the zone was sending at
    when the signal came), or an absolute ``3`` / ``"60/min"``.

An override lives in Redis (:func:`zmta_common.redis_keys.shaping`), so the sender pod that
read the reply and the queue replicas that lease hold the whole cluster to it. The same
signal again while it is in force extends it, and lowers a throttle once more by its shares
(multiplicative decrease, at most every ``SETTLE`` seconds, so the levels follow a site
that keeps pushing back); a throttle refused again at one connection becomes a suspension
for the rule's duration (the site is dead to us, as Postfix marks a dead destination). A
throttled site that takes mail again gets its limits back step by step (:meth:`Shaper.recover`);
when an override ends, the configured values apply again. The senders observe
(:class:`Shaper`); the queue enforces (:class:`InForce`) and sweeps ended overrides, logging
each; the API lists and lifts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from redis.asyncio import Redis

from . import metrics, redis_keys
from .config import DEFAULT_SITE_CONNECTIONS, Zone, parse_rate
from .replies import RulesError as RulesError  # raised here, the name callers catch
from .replies import normalise, rule_entries

log = logging.getLogger(__name__)

SHIPPED_RULES = Path(__file__).with_name("shaping.yaml")
# Seconds a throttle's levels hold before a later signal may lower them again.
SETTLE = 5.0

Scope = Literal["site", "site_address", "zone"]
Action = Literal["suspend", "throttle"]

triggered = metrics.Tally(
    "zonemta_shaping_triggered",
    "Traffic shaping overrides put in force (not counting extensions), by rule",
    ("zone", "rule", "action"),
)


class ShapingRule(BaseModel):
    """One rule of a shaping rules file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    match: str | None = None  # regular expression over the normalised reply
    category: list[str] = Field(default_factory=list)  # classifier categories, any of them
    threshold: int = Field(default=1, ge=1)
    window: float = Field(default=60.0, gt=0)
    scope: Scope = "site"
    action: Action
    connections: str | None = None  # throttle: "50%" or "3"
    rate: str | None = None  # throttle: "50%" or "60/min"
    duration: float = Field(gt=0)

    @field_validator("category", mode="before")
    @classmethod
    def _listed(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("match")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("connections", mode="before")
    @classmethod
    def _connections(cls, value: object) -> object:
        if value is None:
            return None
        text = str(value).strip()
        if not re.fullmatch(r"\d+%?", text) or _number(text) < 1 or (text.endswith("%") and _number(text) > 100):
            raise ValueError("must be a share of the configured limit (`50%`) or a number of connections (`3`)")
        return text

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+%", value):
            parse_rate(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ShapingRule:
        if self.match is None and not self.category:
            raise ValueError("needs `match`, `category` or both")
        if self.action == "throttle" and self.scope != "site":
            raise ValueError("`throttle` lowers a site's limits: its scope must be `site`")
        if self.action == "throttle" and self.connections is None and self.rate is None:
            raise ValueError("`throttle` needs `connections`, `rate` or both")
        if self.action == "suspend" and (self.connections is not None or self.rate is not None):
            raise ValueError("`suspend` takes no `connections` or `rate`")
        return self

    def matches(self, line: str, category: str) -> bool:
        if self.category and category not in self.category:
            return False
        return self.match is None or _compiled(self.match).search(line) is not None


_patterns: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    compiled = _patterns.get(pattern)
    if compiled is None:
        compiled = _patterns[pattern] = re.compile(pattern, re.IGNORECASE)
    return compiled


def _number(text: str) -> int:
    return int(text.rstrip("%"))


def load_rules(path: Path) -> list[ShapingRule]:
    rules = []
    for index, entry in enumerate(rule_entries(path), 1):
        try:
            rules.append(ShapingRule.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rule'}: {e['msg']}" for e in exc.errors())
            raise RulesError(f"{path}: rule {index}: {problems}") from None
    return rules


def load_all(extra: Sequence[str | Path] = ()) -> list[ShapingRule]:
    """The operator's rule files in order, then the shipped rules."""
    return [rule for path in [*extra, SHIPPED_RULES] for rule in load_rules(Path(path))]


@dataclass(frozen=True, slots=True)
class Override:
    """A shaping decision in force: what it holds back, how, until when, and why."""

    zone: str
    scope: Scope
    site: str  # "" at zone scope
    address: str  # the local address at site_address scope, else ""
    rule: str
    action: Action
    connections: int | None  # throttle: the site's connections while it lasts
    rate: str | None  # throttle: the site's rate while it lasts
    started: float  # Unix time
    expires: float
    response: str  # the reply that set it
    updated: float = 0.0  # when a throttle's levels were last set (lowered again on a later signal)

    @property
    def key(self) -> str:
        return scope_key(self.scope, self.site, self.address)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Override:
        return cls(**json.loads(raw))


def scope_key(scope: Scope, site: str = "", address: str = "") -> str:
    """Where an override is kept in its zone's hash: one per scope, site and address."""
    if scope == "zone":
        return "zone"
    return f"site:{site}" if scope == "site" else f"site:{site}|{address}"


@dataclass(frozen=True, slots=True)
class Signal:
    """A reply (or a connection failure, code 0) a sender got from a site."""

    code: int
    text: str
    category: str
    site: str | None
    address: str | None  # the local address it was sent from


# KEYS: the zone's overrides hash, the rule's hit counter, the scope's last push-back.
# ARGV: field, override JSON, now, expires, threshold, window (ms), and the `updated` of the
# throttle in force that the JSON lowers ("" for none).
# 0: below the threshold; 1: put in force; 2: extended; 3: lowered.
_TRIGGER = """
redis.call('SET', KEYS[3], ARGV[3], 'EX', 3600)
local hits = redis.call('INCR', KEYS[2])
if hits == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[6]) end
if hits < tonumber(ARGV[5]) then return 0 end
local now, expires = tonumber(ARGV[3]), tonumber(ARGV[4])
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
    local held = cjson.decode(current)
    if held.expires > now then
        if ARGV[7] ~= '' and held.updated == tonumber(ARGV[7]) then
            redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
            return 3
        end
        if expires > held.expires then
            -- not cjson.encode: it keeps 14 digits, too few for a Unix time with microseconds
            -- (the pattern is Override.to_json's spelling)
            local extended = string.gsub(current, '"expires": [-+.%deE]+', '"expires": ' .. ARGV[4])
            redis.call('HSET', KEYS[1], ARGV[1], extended)
        end
        return 2
    end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the zone's overrides hash. ARGV: field, now. Removes the override if it has ended
# (not if it was extended meanwhile); returns it, or false.
_SWEEP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current).expires <= tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return current
end
return false
"""


# KEYS: the zone's overrides hash, the scope's last push-back. ARGV: field, the `updated` of
# the throttle being raised, its raised JSON ("" when it is back to the configured limits),
# now, SETTLE. 1: raised (or ended); 0: changed meanwhile, or pushed back within SETTLE.
_RAISE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or cjson.decode(current).updated ~= tonumber(ARGV[2]) then return 0 end
local last = redis.call('GET', KEYS[2])
if last and tonumber(ARGV[4]) - tonumber(last) < tonumber(ARGV[5]) then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


class Overrides:
    """The overrides of every zone, in Redis: put in force, listed, lifted, swept."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._trigger = redis.register_script(_TRIGGER)
        self._sweep = redis.register_script(_SWEEP)
        self._raise = redis.register_script(_RAISE)

    async def raise_(self, held: Override, raised: Override | None) -> bool:
        """Replace the throttle ``held`` by ``raised`` (None: end it), unless it changed
        meanwhile or its site pushed back within the last SETTLE seconds."""
        keys = [redis_keys.shaping(held.zone), redis_keys.shaping_last(held.zone, held.key)]
        args: list[str | float] = [
            held.key,
            repr(held.updated),
            raised.to_json() if raised else "",
            time.time(),
            SETTLE,
        ]
        return bool(await self._raise(keys=keys, args=args))

    async def trigger(self, rule: ShapingRule, override: Override, lowers: Override | None = None) -> int:
        """Count the signal; put the override in force when the rule's threshold is reached.
        0: not yet; 1: in force now; 2: one was in force already (extended); 3: it replaced
        ``lowers``, the throttle in force (unless another pod lowered that one first)."""
        counter = redis_keys.shaping_hits(override.zone, rule.name, override.key)
        args: list[str | float | int] = [override.key, override.to_json(), override.started, override.expires]
        args += [rule.threshold, math.ceil(rule.window * 1000), repr(lowers.updated) if lowers else ""]
        last = redis_keys.shaping_last(override.zone, override.key)
        result = await self._trigger(keys=[redis_keys.shaping(override.zone), counter, last], args=args)
        return int(result)

    async def get(self, zone: str, key: str) -> Override | None:
        """The override at ``key``, if one is in force."""
        raw = await self.redis.hget(redis_keys.shaping(zone), key)
        override = Override.from_json(raw) if raw else None
        return override if override and override.expires > time.time() else None

    async def active(self, zone: str) -> list[Override]:
        """The zone's overrides in force now."""
        now = time.time()
        raw = await self.redis.hvals(redis_keys.shaping(zone))
        return sorted((o for o in map(Override.from_json, raw) if o.expires > now), key=lambda o: o.key)

    async def lift(self, zone: str, key: str) -> Override | None:
        """End an override now (an operator's decision); the one ended, if there was one."""
        raw = await self.redis.hget(redis_keys.shaping(zone), key)
        if raw is None or not await self.redis.hdel(redis_keys.shaping(zone), key):
            return None
        return Override.from_json(raw)

    async def sweep(self, zone: str) -> list[Override]:
        """Remove the zone's overrides that have ended, and return them."""
        now, ended = time.time(), []
        for key, raw in (await self.redis.hgetall(redis_keys.shaping(zone))).items():
            if Override.from_json(raw).expires <= now:
                gone = await self._sweep(keys=[redis_keys.shaping(zone)], args=[key, now])
                if gone:
                    ended.append(Override.from_json(gone))
        return ended


class InForce:
    """A zone's overrides, as leasing applies them."""

    def __init__(self, overrides: list[Override]) -> None:
        self.zone: Override | None = next((o for o in overrides if o.scope == "zone"), None)
        self._sites = {o.site: o for o in overrides if o.scope == "site"}
        self._addresses: dict[str, set[str]] = {}
        for o in overrides:
            if o.scope == "site_address":
                self._addresses.setdefault(o.site, set()).add(o.address)

    def site(self, site: str | None) -> Override | None:
        return self._sites.get(site) if site else None

    def suspended_addresses(self, site: str | None) -> set[str]:
        return self._addresses.get(site, set()) if site else set()


class Shaper:
    """What a sender does with the replies it gets: match them against the rules and put
    overrides in force for its zone."""

    def __init__(self, overrides: Overrides, zone_name: str, zone: Zone, rules: list[ShapingRule]) -> None:
        self.overrides = overrides
        self.zone_name = zone_name
        self.zone = zone
        self.rules = rules
        self.redis = overrides.redis
        self._succeeded: set[str] = set()  # sites delivered to since the last recover()

    async def observe(self, signal: Signal) -> Override | None:
        """The override this signal put in force (None: none, or one was already)."""
        line = normalise(signal.code, signal.text)
        rule = next((r for r in self.rules if r.matches(line, signal.category)), None)
        if rule is None or (rule.scope != "zone" and not signal.site):
            return None
        if rule.scope == "site_address" and not signal.address:
            return None
        site = (signal.site or "") if rule.scope != "zone" else ""
        address = (signal.address or "") if rule.scope == "site_address" else ""
        now = time.time()
        held = await self._lowerable(rule, scope_key(rule.scope, site, address), now)
        if held is not None:  # the site still pushes back: lower the throttle again
            connections, rate = _lowered(rule, held)
            override = dataclasses.replace(
                held, rule=rule.name, connections=connections, rate=rate, updated=now, response=line[:300]
            )
            override = dataclasses.replace(override, expires=max(held.expires, now + rule.duration))
            if held.connections == 1 and connections == 1 and rule.connections is not None:
                # Refused even at one connection: the site is dead to us (Postfix's dead
                # destination). Rest it for the rule's duration instead of trying every message.
                override = dataclasses.replace(
                    override, action="suspend", connections=None, rate=None, expires=now + rule.duration
                )
        else:
            connections, rate = await self._levels(rule, site) if rule.action == "throttle" else (None, None)
            override = Override(
                self.zone_name, rule.scope, site, address, rule.name, rule.action, connections, rate, now,
                now + rule.duration, line[:300], now,
            )  # fmt: skip
        result = await self.overrides.trigger(rule, override, held)
        if result not in (1, 3):
            return None
        triggered.inc(zone=self.zone_name, rule=rule.name, action=rule.action)
        how = "started" if result == 1 else "lowered" if override.action == "throttle" else "suspended"
        log.warning(f"shaping {how}", extra=_log_fields(override))
        return override

    def delivered(self, site: str | None) -> None:
        """A delivery to ``site`` succeeded (counted here; :meth:`recover` acts on it)."""
        if site:
            self._succeeded.add(site)

    async def recover(self) -> None:
        """Additive increase: each throttled site this sender delivered to since the last call,
        and that has not pushed back for SETTLE seconds, gets one more connection and a
        quarter more pace, up to its configured limits; then the throttle ends."""
        sites, self._succeeded = self._succeeded, set()
        now = time.time()
        for site in sites:
            held = await self.overrides.get(self.zone_name, scope_key("site", site))
            if held is None or held.action != "throttle" or now - held.updated < SETTLE:
                continue
            raised = self._raised(held, now)
            if await self.overrides.raise_(held, raised):
                log.info("shaping raised" if raised else "shaping recovered", extra=_log_fields(raised or held))

    def _raised(self, held: Override, now: float) -> Override | None:
        """``held`` one step up, or None once back at the configured limits."""
        configured = self.zone.site_limit(held.site)
        ceiling = configured.connections or DEFAULT_SITE_CONNECTIONS
        connections = min(ceiling, held.connections + 1) if held.connections is not None else None
        rate = held.rate
        if rate is not None:
            per_minute = _per_minute(parse_rate(rate))
            raised_rate = math.floor(per_minute * 1.25) + 1
            top = _per_minute(parse_rate(configured.rate)) if configured.rate else None
            rate = None if top is not None and raised_rate >= top else f"{raised_rate}/min"
        if (connections is None or connections >= ceiling) and (rate is None or configured.rate is None):
            return None  # back where the configuration puts it (a rate it never had goes too)
        return dataclasses.replace(held, connections=connections, rate=rate, updated=now)

    async def run(self, stop: asyncio.Event) -> None:
        """Call :meth:`recover` every half SETTLE until ``stop``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SETTLE / 2)
            try:
                await self.recover()
            except Exception as exc:  # Redis down: the throttle ends with its duration
                log.warning("shaping recovery failed", extra={"zone": self.zone_name, "error": repr(exc)})

    async def _lowerable(self, rule: ShapingRule, key: str, now: float) -> Override | None:
        """The throttle in force at ``key`` if this rule may lower it again now: not sooner
        than SETTLE seconds after it was last set, so that the deliveries already on their way
        at the old levels have come back before the site's answer to the new ones is read."""
        if rule.action != "throttle":
            return None
        held = await self.overrides.get(self.zone_name, key)
        if held is None or held.action != "throttle" or now - held.updated < SETTLE:
            return None
        return held

    async def _levels(self, rule: ShapingRule, site: str) -> tuple[int | None, str | None]:
        """A throttle's connections and rate for the site, in absolute numbers."""
        configured = self.zone.site_limit(site)
        connections = rate = None
        if rule.connections is not None:
            connections = _share(rule.connections, configured.connections or DEFAULT_SITE_CONNECTIONS)
        if rule.rate is not None and rule.rate.endswith("%"):
            per_minute = _per_minute(parse_rate(configured.rate)) if configured.rate else await self._sending(site)
            rate = f"{max(1, math.floor(per_minute * _number(rule.rate) / 100))}/min" if per_minute else None
        elif rule.rate is not None:
            rate = rule.rate
        return connections, rate

    async def _sending(self, site: str) -> float:
        """Deliveries per minute the zone leased to the site over the last minute or two."""
        minute = int(time.time() // 60)
        keys = [redis_keys.site_leased(self.zone_name, site, m) for m in (minute - 1, minute)]
        previous, current = (int(v or 0) for v in await self.redis.mget(keys))
        elapsed = (time.time() % 60) / 60
        return (previous * (1 - elapsed) + current) if previous else current / max(elapsed, 1 / 60)


def _lowered(rule: ShapingRule, held: Override) -> tuple[int | None, str | None]:
    """A throttle in force, lowered once more by the rule's shares (absolute levels stay)."""
    connections = held.connections
    if rule.connections is not None and rule.connections.endswith("%") and connections is not None:
        connections = _share(rule.connections, connections)
    rate = held.rate
    if rule.rate is not None and rule.rate.endswith("%") and rate is not None:
        rate = f"{max(1, math.floor(_per_minute(parse_rate(rate)) * _number(rule.rate) / 100))}/min"
    return connections, rate


def _share(spec: str, base: int) -> int:
    return max(1, math.floor(base * _number(spec) / 100)) if spec.endswith("%") else int(spec)


def _per_minute(rate: tuple[int, float]) -> float:
    count, period = rate
    return count * 60 / period


def _log_fields(override: Override) -> dict[str, object]:
    return {
        "zone": override.zone,
        "scope": override.scope,
        "site": override.site,
        "local_address": override.address,
        "rule": override.rule,
        "action": override.action,
        "connections": override.connections,
        "rate": override.rate,
        "until": override.expires,
        "response": override.response,
    }


def log_ended(override: Override, how: str = "ended") -> None:
    log.warning(f"shaping {how}", extra=_log_fields(override))
