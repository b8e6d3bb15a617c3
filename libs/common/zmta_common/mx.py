"""Where mail for a domain goes: MX hosts in preference order with their addresses, else
the domain's own A/AAAA (RFC 5321 5.1).

Answers are cached in Redis (:func:`zmta_common.redis_keys.dns`) for their DNS TTL, so
every sender pod of a zone and the queue share them: the senders connect to the
hosts, and the queue needs a domain's best MX host before it leases, to count the
domain under its ``mx_hosts`` group from the first delivery on. Null MX (RFC 7505)
and non-existent domains are permanent failures; timeouts and server failures are
temporary.
"""

from __future__ import annotations

import json
import logging

import dns.asyncresolver
import dns.exception
import dns.resolver
from redis.asyncio import Redis

from . import redis_keys
from .config import Dns
from .domains import canonical_domain

log = logging.getLogger(__name__)

CACHE_TTL_CAP = 600

# An MX host and its addresses, best host first.
Hosts = list[tuple[str, list[str]]]


class DnsFailure(Exception):
    """No usable answer; ``permanent`` when the domain cannot receive mail at all."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def make_resolver(config: Dns) -> dns.asyncresolver.Resolver:
    """A resolver asking the configured nameservers (else the system's), with the configured timeout."""
    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    if config.nameservers:
        resolver.nameservers = list(config.nameservers)
    resolver.port = config.port
    resolver.lifetime = config.timeout
    return resolver


class MxLookup:
    def __init__(self, config: Dns, redis: Redis | None = None) -> None:
        self.redis = redis
        self.resolver = make_resolver(config)

    async def hosts(self, domain: str) -> Hosts:
        """The domain's mail hosts and their addresses, from the cache or from DNS."""
        cached = await self._cached(canonical_domain(domain))
        return cached if cached is not None else await self.resolve(domain)

    async def resolve(self, domain: str) -> Hosts:
        """Ask DNS (for a domain known not to be in the cache) and cache the answer."""
        domain = canonical_domain(domain)
        hosts, ttl = await self._lookup(domain)
        await self._store(domain, hosts, ttl)
        return hosts

    async def _lookup(self, domain: str) -> tuple[Hosts, int]:
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DnsFailure(f"domain {domain} does not exist", permanent=True) from None
        except dns.resolver.NoAnswer:
            ips, ttl = await self._addresses(domain)
            if not ips:
                raise DnsFailure(f"no MX or address records for {domain}", permanent=True) from None
            return [(domain, ips)], ttl
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsFailure(f"DNS lookup of {domain} failed: {exc}") from None
        records = sorted(answer, key=lambda r: r.preference)
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise DnsFailure(f"{domain} accepts no mail (null MX)", permanent=True)
        hosts = []
        ttl = answer.rrset.ttl if answer.rrset is not None else 300
        for record in records:
            host = record.exchange.to_text().rstrip(".")
            ips, host_ttl = await self._addresses(host)
            ttl = min(ttl, host_ttl)
            if ips:
                hosts.append((host, ips))
        return hosts, ttl

    async def _addresses(self, host: str) -> tuple[list[str], int]:
        ips: list[str] = []
        ttl = CACHE_TTL_CAP
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
                raise DnsFailure(f"DNS lookup of {host} failed: {exc}") from None
            ips.extend(r.to_text() for r in answer)
            if answer.rrset is not None:
                ttl = min(ttl, answer.rrset.ttl)
        return ips, ttl

    async def _cached(self, domain: str) -> Hosts | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(redis_keys.dns(domain))
        except Exception as exc:  # Redis down: resolve without the cache
            log.warning("dns cache unavailable", extra={"error": repr(exc)})
            return None
        return parse_hosts(raw)

    async def _store(self, domain: str, hosts: Hosts, ttl: int) -> None:
        if self.redis is None or ttl <= 0:
            return
        try:
            await self.redis.set(redis_keys.dns(domain), json.dumps(hosts), ex=min(ttl, CACHE_TTL_CAP))
        except Exception as exc:
            log.warning("dns cache unavailable", extra={"error": repr(exc)})


def parse_hosts(raw: bytes | str | None) -> Hosts | None:
    """A cached answer as :meth:`MxLookup.hosts` returns it; None for none."""
    return [(str(h), list(ips)) for h, ips in json.loads(raw)] if raw else None
