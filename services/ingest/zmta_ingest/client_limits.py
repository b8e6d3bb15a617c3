"""How much of an interface one client address may take: connections open at once and
new connections per minute, as Postfix's anvil counts them.

Counted in this process (an ingest pod), not cluster-wide: the point is that one
client cannot take every socket and session of a pod, and a load balancer that keeps
client addresses spreads a client over pods anyway. Clients in the interface's
``client_limit_exceptions`` are not counted.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from zmta_common.config import SmtpInterface

RATE_PERIOD = 60.0  # seconds: max_connection_rate_per_client is per minute
# Past this many addresses with recent connections, the idle ones are forgotten.
_PRUNE_AT = 10_000


def parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """The client's address (an IPv4 client of a dual-stack listener as IPv4), or None."""
    try:
        ip = ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientLimits:
    def __init__(self, interface: SmtpInterface, hostname: str) -> None:
        self.hostname = hostname
        self.max_open = interface.max_connections_per_client
        self.max_rate = interface.max_connection_rate_per_client
        self.exceptions = [ip_network(n, strict=False) for n in interface.client_limit_exceptions]
        self.open: Counter[str] = Counter()
        self.recent: dict[str, deque[float]] = {}

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client``; or the 421 that refuses it (not counted)."""
        ip = parse_ip(client)
        if ip is not None and any(ip in network for network in self.exceptions):
            return None
        key = str(ip) if ip is not None else client
        if self.max_open and self.open[key] >= self.max_open:
            return f"421 4.7.0 {self.hostname} Error: too many connections from {key}"
        if self.max_rate and not self._take_rate(key):
            return f"421 4.7.0 {self.hostname} Error: too many connections from {key} in the last minute"
        self.open[key] += 1
        return None

    def release(self, client: str) -> None:
        """A connection that :meth:`admit` counted has ended."""
        ip = parse_ip(client)
        key = str(ip) if ip is not None else client
        if self.open[key] <= 1:
            self.open.pop(key, None)
        else:
            self.open[key] -= 1

    def _take_rate(self, key: str) -> bool:
        now = time.monotonic()
        if len(self.recent) > _PRUNE_AT:
            self.recent = {k: q for k, q in self.recent.items() if q and q[-1] > now - RATE_PERIOD}
        times = self.recent.setdefault(key, deque())
        while times and times[0] <= now - RATE_PERIOD:
            times.popleft()
        if len(times) >= self.max_rate:
            return False
        times.append(now)
        return True
