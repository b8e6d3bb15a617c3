"""Which sender pod, and which local address, a delivery goes to.

The address is chosen from the whole zone pool (:func:`zmta_common.local_address.choose`,
leaving out addresses disabled or blacklisted for the recipient's domain), so the
same delivery keeps its address on every attempt, whichever pod asks. The pod whose
slice holds that address gets the delivery. If no pod of that slice has asked for
work lately, any pod takes it and sends from an address of its own slice: a pod
that is gone must not hold mail back.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common.config import PoolAddress
from zmta_common.local_address import choose
from zmta_common.slices import Slice


class Assignment:
    def __init__(self, redis: Redis, zone: str, pool: list[PoolAddress], ipv6: bool, timeout: float) -> None:
        self.redis = redis
        self.zone = zone
        self.pool = pool
        self.ipv6 = ipv6
        self.timeout = timeout  # seconds without a work request after which a slice counts as unattended
        self._key = redis_keys.pods(zone)

    async def seen(self, requester: Slice) -> set[int]:
        """Note the requester as alive; return the slice indices (of its count) alive now."""
        now = time.time()
        await self.redis.hset(self._key, str(requester), now)
        alive = set()
        for field, stamp in (await self.redis.hgetall(self._key)).items():
            index, _, count = (field.decode() if isinstance(field, bytes) else str(field)).partition("/")
            if count == str(requester.count) and now - float(stamp) < self.timeout:
                alive.add(int(index))
        return alive

    def assign(
        self, key: str, excluded: set[str], requester: Slice, alive: set[int]
    ) -> tuple[bool, PoolAddress | None]:
        """(whether the requester takes this delivery, the address it sends from)."""
        if not self.pool:
            return True, None
        chosen = choose([a for a in self.pool if a.address not in excluded], key, self.ipv6)
        if chosen is None:
            return True, None  # nothing usable anywhere: any pod reports the deferral
        owners = requester.owners(self.pool.index(chosen), len(self.pool))
        if requester.index in owners:
            return True, chosen
        if owners & alive:
            return False, chosen
        own = [a for a in requester.of(self.pool) if a.address not in excluded]
        return True, choose(own, key, self.ipv6)
