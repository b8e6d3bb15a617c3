"""Answers senders' work requests with deliveries leased from the store, within the zone's limits."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from redis.asyncio import Redis

from zmta_common.config import Config
from zmta_common.events import (
    QUEUE_GROUP_QUEUE,
    WORK_SUBJECT_ALL,
    LeasedDelivery,
    SchemaError,
    WorkReply,
    WorkRequest,
)
from zmta_common.limits import Blacklist, Candidate, ZoneLimits
from zmta_common.shaping import InForce, Overrides
from zmta_common.slices import Slice
from zmta_common.store import LeaseCandidate, Store

from .assignment import Assignment

log = logging.getLogger(__name__)

# Deliveries are leased for queue.claim_time at first (at most queue.lease_time): the
# sender that gets them extends the lease to queue.lease_time at once. If the reply never
# reached it (NATS or the sender gone meanwhile), they are free again this soon, not a
# lease later. The paused zones and domains are cached for queue.pauses_ttl.
# Work requests answered at once (each one's leasing waits on the store and Redis).
CONCURRENT_REQUESTS = 16


class WorkDesk:
    def __init__(self, config: Config, store: Store, redis: Redis, limits: dict[str, ZoneLimits]) -> None:
        self.config = config
        self.store = store
        self.limits = limits
        self.blacklist = Blacklist(redis)
        self.overrides = Overrides(redis)
        self.assignments = {
            name: Assignment(redis, name, zone.pool, not zone.ignore_ipv6, config.queue.sender_timeout)
            for name, zone in config.zones.items()
        }
        self._pauses: dict[str, set[str]] = {}  # zone -> paused domains, "" for the whole zone
        self._pauses_read = float("-inf")
        self._answering: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def start(self, nc: NATS) -> None:
        await nc.subscribe(WORK_SUBJECT_ALL, queue=QUEUE_GROUP_QUEUE, cb=self.on_request)

    async def on_request(self, msg: Msg) -> None:
        """Answer in a task of its own: NATS hands a subscription's messages over one at a
        time, and one zone's slow leasing must not hold up every other sender."""
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._answering.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        self._slots.release()

    async def _answer(self, msg: Msg) -> None:
        try:
            request = WorkRequest.decode(msg.data)
            requester = Slice(request.slice_index, request.slice_count)
        except (SchemaError, ValueError) as exc:
            log.warning("bad work request", extra={"error": str(exc)})
            await msg.respond(WorkReply().encode())
            return
        deliveries: list[LeasedDelivery] = []
        retry_in = 0.0
        if request.zone in self.config.zones and request.max > 0:
            try:
                deliveries = await self.lease(request, requester)
                if len(deliveries) < request.max:
                    retry_in = await self.limits[request.zone].next_room()
            except Exception as exc:  # the store or Redis is down: the sender asks again later
                log.warning("lease failed", extra={"zone": request.zone, "error": repr(exc)})
        try:
            await msg.respond(WorkReply(deliveries=deliveries, retry_in=retry_in).encode())
        except Exception as exc:  # NATS gone: the claims run out by themselves (queue.claim_time)
            log.warning("work reply not sent", extra={"zone": request.zone, "error": repr(exc)})

    async def lease(self, request: WorkRequest, requester: Slice) -> list[LeasedDelivery]:
        """Lease ready deliveries of the requester's slice that fit the zone's limits."""
        paused = await self._paused(request.zone)
        if "" in paused:
            return []
        shaping = InForce(await self.overrides.active(request.zone))
        if shaping.zone is not None and shaping.zone.action == "suspend":
            return []
        limits = self.limits[request.zone]
        assignment = self.assignments[request.zone]
        want = min(request.max, self.config.queue.max_batch)
        lease_time = min(self.config.queue.claim_time, self.config.queue.lease_time)  # extended by the sender
        alive = await assignment.seen(requester)
        addresses: dict[tuple[str, str], str] = {}

        async def admit(ready: list[LeaseCandidate]) -> list[int]:
            sites = await limits.site_of(sorted({r.domain for r in ready}))
            excluded = await self._excluded(request.zone, sites, shaping)
            mine = []
            for index, r in enumerate(ready):
                take, address = assignment.assign(f"{r.id}.{r.seq}", excluded[r.domain], requester, alive)
                if take:
                    mine.append(index)
                    addresses[(r.id, r.seq)] = address.address if address else ""
            candidates = [
                Candidate(f"{ready[i].id}.{ready[i].seq}", ready[i].domain, sites[ready[i].domain]) for i in mine
            ]
            return [mine[j] for j in await limits.admit(candidates, want, time.time() + lease_time, shaping)]

        leases = await self.store.lease(
            request.zone,
            want,
            lease_time,
            request.sender,
            skip_domains=[*await limits.skip_domains(), *paused],
            admit=admit,
            scan=min(1000, want * 4 * requester.count),
        )
        if leases:
            log.debug("leased", extra={"zone": request.zone, "count": len(leases), "sender": request.sender})
        return [
            LeasedDelivery(
                id=lease.id,
                seq=lease.seq,
                recipient=lease.recipient,
                domain=lease.domain,
                mail_from=lease.mail_from,
                lease_token=lease.lease_token,
                lease_expires=lease.lease_expires.timestamp(),
                attempts=lease.attempts,
                local_address=addresses.get((lease.id, lease.seq), ""),
            )
            for lease in leases
        ]

    async def _paused(self, zone: str) -> set[str]:
        """The zone's paused recipient domains ("" when the whole zone is paused), shared by
        every queue replica through the store and re-read every ``queue.pauses_ttl`` seconds."""
        now = time.monotonic()
        if now - self._pauses_read >= self.config.queue.pauses_ttl:
            pauses: dict[str, set[str]] = {}
            for pause in await self.store.list_pauses():
                pauses.setdefault(pause.zone, set()).add(pause.domain or "")
            self._pauses, self._pauses_read = pauses, now
        return self._pauses.get(zone, set())

    async def _excluded(self, zone_name: str, sites: dict[str, str | None], shaping: InForce) -> dict[str, set[str]]:
        """Per domain: the pool addresses disabled for it in the config, blacklisted by it, or
        suspended for its site by traffic shaping."""
        zone = self.config.zones[zone_name]
        ordered = sorted(sites)
        listed = await self.blacklist.listed_by_domain(ordered, [a.address for a in zone.pool])
        return {
            d: listed[d] | set(zone.domain_policy(d).disabled_addresses) | shaping.suspended_addresses(sites[d])
            for d in ordered
        }
