"""Which local address of the zone's pool a delivery leaves from.

Everything is decided by hashes of (delivery key, address), so the same delivery
(key ``<id>.<seq>``) always leaves from the same address and a retry keeps its IP
(greylisting), with no state kept anywhere:

* An address with a ``ratio`` (warm-up) *claims* a delivery when the hash of the
  pair, read as a number in [0, 1), is below its ratio; so it gets about that share
  of all mail. When several claim one delivery, the one with the smallest
  hash/ratio wins. Raising a ratio only adds deliveries to that address.
* The deliveries no ratio address claims go to the address without a ratio whose
  hash is highest (rendezvous hashing), so they share the rest equally, and adding
  or removing such an address moves only the deliveries that go to or came from it.

The original instead took CRC32 of the key modulo a list in which each address
appears as often as its ratio asks: any change to the pool reshuffles nearly every
delivery, and deferred mail retries from a new address.
"""

from __future__ import annotations

import hashlib
import math

from .config import PoolAddress


def _unit(key: str, address: str) -> float:
    """A hash of the pair as a number in (0, 1)."""
    digest = hashlib.blake2b(f"{key}|{address}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def choose(pool: list[PoolAddress], key: str, ipv6: bool = False) -> PoolAddress | None:
    """The pool entry for ``key``; None (the OS picks) when the pool has no usable address."""
    usable = [a for a in pool if (ipv6 or ":" not in a.address) and a.ratio != 0]
    if not usable:
        return None
    claims = [
        (unit / entry.ratio, entry)
        for entry in usable
        if entry.ratio is not None and (unit := _unit(key, entry.address)) < entry.ratio
    ]
    if claims:
        return min(claims, key=lambda claim: claim[0])[1]
    free = [a for a in usable if a.ratio is None]
    if free:
        return max(free, key=lambda entry: _unit(key, entry.address))
    # Only ratio addresses, and none claimed this delivery: weighted rendezvous among them.
    return max(usable, key=lambda entry: -(entry.ratio or 0.0) / math.log(_unit(key, entry.address)))
