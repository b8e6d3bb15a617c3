"""Where mail for a domain goes: MX records in preference order, else the domain's A/AAAA.

Answers are cached in Redis (key ``zmta:dns:<domain>``) for their DNS TTL, so the
sender pods of a zone share them. Null MX (RFC 7505) and non-existent domains are
permanent failures; timeouts and server failures are temporary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
from redis.asyncio import Redis

from zmta_common.config import Dns

from .errors import DeliveryError

log = logging.getLogger(__name__)

MAX_ADDRESSES = 20  # as the original: never try more than 20 IPs for one delivery
CACHE_TTL_CAP = 600


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try, and the MX host name it belongs to (for TLS SNI and logs)."""

    host: str
    ip: str
    port: int


def make_resolver(config: Dns) -> dns.asyncresolver.Resolver:
    """A resolver asking the configured nameservers (else the system's), with the configured timeout."""
    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    if config.nameservers:
        resolver.nameservers = list(config.nameservers)
    resolver.port = config.port
    resolver.lifetime = config.timeout
    return resolver


class MxResolver:
    def __init__(self, config: Dns, redis: Redis | None = None) -> None:
        self.redis = redis
        self.resolver = make_resolver(config)

    async def targets(self, domain: str, port: int, ipv6: bool) -> list[Target]:
        ascii_domain = to_ascii(domain)
        cached = await self._cached(ascii_domain)
        if cached is None:
            cached, ttl = await self._lookup(ascii_domain)
            await self._store(ascii_domain, cached, ttl)
        targets = [Target(host, ip, port) for host, ips in cached for ip in ips if ipv6 or ":" not in ip]
        if not targets:
            raise DeliveryError(f"no usable address for the mail servers of {domain}", "dns")
        return targets[:MAX_ADDRESSES]

    async def _lookup(self, domain: str) -> tuple[list[tuple[str, list[str]]], int]:
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DeliveryError(f"domain {domain} does not exist", "dns", permanent=True) from None
        except dns.resolver.NoAnswer:
            ips, ttl = await self._addresses(domain)
            if not ips:
                raise DeliveryError(f"no MX or address records for {domain}", "dns", permanent=True) from None
            return [(domain, ips)], ttl
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DeliveryError(f"DNS lookup of {domain} failed: {exc}", "dns") from None
        records = sorted(answer, key=lambda r: r.preference)
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise DeliveryError(f"{domain} accepts no mail (null MX)", "dns", permanent=True)
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
                raise DeliveryError(f"DNS lookup of {host} failed: {exc}", "dns") from None
            ips.extend(r.to_text() for r in answer)
            if answer.rrset is not None:
                ttl = min(ttl, answer.rrset.ttl)
        return ips, ttl

    async def _cached(self, domain: str) -> list[tuple[str, list[str]]] | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(f"zmta:dns:{domain}")
        except Exception as exc:  # Redis down: resolve without the cache
            log.warning("dns cache unavailable", extra={"error": repr(exc)})
            return None
        return [(h, list(ips)) for h, ips in json.loads(raw)] if raw else None

    async def _store(self, domain: str, hosts: list[tuple[str, list[str]]], ttl: int) -> None:
        if self.redis is None or ttl <= 0:
            return
        try:
            await self.redis.set(f"zmta:dns:{domain}", json.dumps(hosts), ex=min(ttl, CACHE_TTL_CAP))
        except Exception as exc:
            log.warning("dns cache unavailable", extra={"error": repr(exc)})


def to_ascii(domain: str) -> str:
    """IDN domains are looked up in their punycode form."""
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
