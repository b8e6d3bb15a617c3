"""Which local address of the zone's pool a delivery leaves from.

Weighted rendezvous hashing over the pool: every address gets a score from a hash
of (delivery key, address) scaled by its ``ratio``; the highest score wins. The
same delivery therefore always leaves from the same address (retries keep their
IP for greylisting), an address with ratio 0.05 carries about 5% of the mail, and
adding or removing one address moves only the deliveries that must move.
"""

from __future__ import annotations

import hashlib
import math

from zmta_common.config import PoolAddress


def choose(pool: list[PoolAddress], key: str, ipv6: bool = False) -> PoolAddress | None:
    """The pool entry for ``key`` (normally ``<id>.<seq>``); None lets the OS pick."""
    candidates = [a for a in pool if ipv6 or ":" not in a.address]
    if not candidates:
        return None
    shares = _shares(candidates)
    best, best_score = None, -math.inf
    for entry, share in zip(candidates, shares, strict=True):
        if share <= 0:
            continue
        digest = hashlib.blake2b(f"{key}|{entry.address}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
        score = -share / math.log(unit)
        if score > best_score:
            best, best_score = entry, score
    return best


def _shares(pool: list[PoolAddress]) -> list[float]:
    """Entries with a ratio keep it; the others split what is left equally (as the original)."""
    fixed = sum(a.ratio for a in pool if a.ratio is not None)
    free = [a for a in pool if a.ratio is None]
    rest = max(0.0, 1.0 - fixed) / len(free) if free else 0.0
    return [a.ratio if a.ratio is not None else rest for a in pool]
