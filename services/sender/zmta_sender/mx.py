"""The addresses one delivery tries, from the shared MX lookup (:mod:`zmta_common.mx`)."""

from __future__ import annotations

from dataclasses import dataclass

from zmta_common.mx import DnsFailure, MxLookup

from .errors import DeliveryError

MAX_ADDRESSES = 20  # as the original: never try more than 20 IPs for one delivery


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try, and the MX host name it belongs to (for TLS SNI and logs)."""

    host: str
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class Route:
    targets: list[Target]
    hosts: list[str]  # every MX host name, best first, as the queue sees them (for the site)


class MxResolver:
    def __init__(self, lookup: MxLookup) -> None:
        self.lookup = lookup

    async def targets(self, domain: str, port: int, ipv6: bool) -> list[Target]:
        return (await self.route(domain, port, ipv6)).targets

    async def route(self, domain: str, port: int, ipv6: bool) -> Route:
        """The addresses to try, and the MX host names they come from (the domain's site)."""
        try:
            hosts = await self.lookup.hosts(domain)
        except DnsFailure as exc:
            raise DeliveryError(str(exc), "dns", permanent=exc.permanent) from None
        targets = [Target(host, ip, port) for host, ips in hosts for ip in ips if ipv6 or ":" not in ip]
        if not targets:
            raise DeliveryError(f"no usable address for the mail servers of {domain}", "dns")
        return Route(targets[:MAX_ADDRESSES], [host for host, _ in hosts])
