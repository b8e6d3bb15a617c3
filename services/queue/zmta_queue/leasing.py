"""Answers senders' work requests with deliveries leased from the store."""

from __future__ import annotations

import logging
import time

from nats.aio.msg import Msg

from zmta_common.config import Config
from zmta_common.events import (
    QUEUE_GROUP_QUEUE,
    WORK_SUBJECT_ALL,
    LeasedDelivery,
    SchemaError,
    WorkReply,
    WorkRequest,
)
from zmta_common.limits import Candidate, ZoneLimits
from zmta_common.store import Store

log = logging.getLogger(__name__)


class WorkDesk:
    def __init__(self, config: Config, store: Store, limits: dict[str, ZoneLimits]) -> None:
        self.config = config
        self.store = store
        self.limits = limits

    async def start(self, nc: object) -> None:
        await nc.subscribe(WORK_SUBJECT_ALL, queue=QUEUE_GROUP_QUEUE, cb=self.on_request)  # type: ignore[attr-defined]

    async def on_request(self, msg: Msg) -> None:
        try:
            request = WorkRequest.decode(msg.data)
        except SchemaError as exc:
            log.warning("bad work request", extra={"error": str(exc)})
            await msg.respond(WorkReply().encode())
            return
        deliveries: list[LeasedDelivery] = []
        if request.zone in self.config.zones and request.max > 0:
            try:
                deliveries = await self.lease(request)
            except Exception as exc:  # the store is down: the sender asks again later
                log.warning("lease failed", extra={"zone": request.zone, "error": repr(exc)})
        await msg.respond(WorkReply(deliveries=deliveries).encode())

    async def lease(self, request: WorkRequest) -> list[LeasedDelivery]:
        """Lease ready deliveries that fit the zone's limits (connections in flight, rates)."""
        limits = self.limits[request.zone]
        want = min(request.max, self.config.queue.max_batch)
        lease_time = self.config.queue.lease_time

        async def admit(ready: list[tuple[str, str, str]]) -> list[int]:
            groups = await limits.group_of(sorted({domain for _, _, domain in ready}))
            candidates = [Candidate(f"{i}.{seq}", domain, groups[domain]) for i, seq, domain in ready]
            return await limits.admit(candidates, want, time.time() + lease_time)

        leases = await self.store.lease(
            request.zone, want, lease_time, request.sender, skip_domains=await limits.skip_domains(), admit=admit
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
            )
            for lease in leases
        ]
