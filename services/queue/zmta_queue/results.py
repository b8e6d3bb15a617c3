"""Applies the delivery reports that senders put on the durable RESULTS stream.

A report is acknowledged only after its effect is committed, so a queue that
restarts (or a store that fails) leaves the report on the stream to be applied
again; applying one twice changes nothing, because deferred and rejected reports
act only while their lease token still matches. A rejection publishes its
bounce event *before* the row goes (deduplicated by Nats-Msg-Id), so a crash
between the two cannot lose the bounce.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg

from zmta_common import metrics
from zmta_common.bus import Bus, consume
from zmta_common.config import Bounce, Config, Zone
from zmta_common.events import (
    DEFERRED,
    DELAYED,
    DELIVERED,
    FAILED,
    REJECTED,
    STREAM_RESULTS,
    BounceEvent,
    DeliveryReport,
    SchemaError,
    WorkReady,
    bounced_subject,
    delayed_subject,
    ready_subject,
)
from zmta_common.hooks import Hooks, Reject
from zmta_common.limits import ZoneLimits
from zmta_common.store import AttemptHistory, Deferral, DeliveryKey, LeaseRef, OutcomeBatch, Store

log = logging.getLogger(__name__)

REPORT_ACK_WAIT = 60.0  # seconds, at most (see ResultApplier.ack_wait)

CONSUMER = "zmta-queue"


def next_attempt(zone: Zone, past: AttemptHistory, now: datetime) -> datetime | None:
    """When a delivery that failed softly at ``now`` is tried next, or None when it bounces.

    The delay is ``zone.defer_times[n]`` seconds from ``now``, ``n`` being the delivery's
    earlier deferrals (``past.attempts``). It bounces when the schedule has no entry ``n``
    (out of retries), or when that next attempt would fall more than ``zone.max_age``
    seconds after the delivery was queued (``past.created``).
    """
    times = zone.defer_times
    if past.attempts >= len(times):
        return None
    when = now + timedelta(seconds=times[past.attempts])
    return None if when - past.created > timedelta(seconds=zone.max_age) else when


def delay_warning_due(bounce: Bounce, past: AttemptHistory, now: datetime) -> bool:
    """Whether a delivery deferred at ``now`` gets its one "delayed" DSN now.

    Only with ``bounce.delay_warning`` on, and only for the failure that is the first one
    ``bounce.delay_warning_after`` seconds or more past queueing (the previous failure, or
    the queueing itself when there was none, came before that line): exactly one attempt
    crosses it, so the sender hears of the delay once.
    """
    if not bounce.delay_warning:
        return False
    after = timedelta(seconds=bounce.delay_warning_after)
    previous = past.last_deferred or past.created
    return previous - past.created < after <= now - past.created


def _details(report: DeliveryReport) -> dict[str, str | int]:
    fields: dict[str, str | int] = {
        "response": report.response,
        "category": report.category,
        "mx": report.mx,
        "local_address": report.local_address,
        "tls": report.tls,
        "ip": report.mx_ip,
        "timer_ms": report.timer_ms,
    }
    return {name: value for name, value in fields.items() if value}


class ResultApplier:
    def __init__(
        self,
        config: Config,
        store: Store,
        bus: Bus,
        limits: dict[str, ZoneLimits],
        hooks: Hooks | None = None,
        batch: int = 200,
    ) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.store = store
        self.bus = bus
        self.js = bus.js
        self.limits = limits
        self.batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        await consume(self.js, STREAM_RESULTS, CONSUMER, self.apply, stop, batch=self.batch, ack_wait=self.ack_wait)

    @property
    def ack_wait(self) -> float:
        """How long a fetched report may stay unacknowledged before JetStream hands it out
        again: well inside the lease it reports on (which the sender stopped renewing when it
        published the report), so that a queue killed after fetching it does not let the
        lease expire and the delivery be sent a second time."""
        return max(1.0, min(REPORT_ACK_WAIT, self.config.queue.lease_time / 3))

    async def apply(self, msgs: list[Msg]) -> None:
        reports: list[tuple[Msg, DeliveryReport]] = []
        for msg in msgs:
            try:
                reports.append((msg, DeliveryReport.decode(msg.data)))
            except SchemaError as exc:
                log.error("unreadable report dropped", extra={"error": str(exc)})
                await msg.term()
        try:
            await self._apply([r for _, r in reports])
        except Exception as exc:  # store or NATS failed: leave the reports for a retry
            log.warning("applying reports failed", extra={"error": repr(exc)})
            for msg, _ in reports:
                await msg.nak(delay=2)
            return
        for msg, _ in reports:
            await msg.ack()

    async def _apply(self, reports: list[DeliveryReport]) -> None:
        batch = OutcomeBatch()
        deferred = [r for r in reports if r.status == DEFERRED]
        history = await self.store.delivery_attempts([DeliveryKey(r.id, r.seq) for r in deferred]) if deferred else {}
        now = datetime.now(UTC)
        rejected: list[DeliveryReport] = []
        delayed: list[DeliveryReport] = []
        for report in reports:
            if report.status == DELIVERED:
                batch.delivered.append(DeliveryKey(report.id, report.seq))
            elif report.status == REJECTED:
                rejected.append(report)
            else:
                past = history.get(DeliveryKey(report.id, report.seq), AttemptHistory(0, now, None))
                retry_at = next_attempt(self._zone(report.zone), past, now)
                if retry_at is None:
                    # out of retries or too old: a soft failure becomes a bounce
                    report.response = f"{report.response} (gave up after {past.attempts + 1} attempts)"
                    rejected.append(report)
                    continue
                batch.deferred.append(Deferral(report.id, report.seq, report.lease_token, retry_at, report.response))
                batch.details[DeliveryKey(report.id, report.seq)] = {"next_attempt": retry_at.isoformat()}
                if delay_warning_due(self.config.bounce, past, now):
                    delayed.append(report)
        for report in rejected:
            if await self._publish_bounce(report, FAILED):
                batch.rejected.append(LeaseRef(report.id, report.seq, report.lease_token))
        for report in delayed:
            await self._publish_bounce(report, DELAYED)
        for report in reports:  # what the delivery log says of each attempt
            details = batch.details.setdefault(DeliveryKey(report.id, report.seq), {})
            details.update(_details(report))
        applied = await self.store.apply_outcomes(batch)
        await self._release(reports)
        rejected_ids = {id(r) for r in rejected}
        for report in reports:
            if DeliveryKey(report.id, report.seq) not in applied:
                # Applied before (JetStream redelivered the report), overtaken, or its bounce
                # not published: not counted, so that each outcome is counted once.
                log.info("outcome not applied", extra={"id": report.id, "seq": report.seq, "status": report.status})
                continue
            status = REJECTED if id(report) in rejected_ids else report.status
            metrics.count_delivery(status, report.zone)
            entry = {
                "id": report.id,
                "seq": report.seq,
                "zone": report.zone,
                "response": report.response,
                "category": report.category,
                "mx": report.mx,
                "local_address": report.local_address,
            }
            log.info(status, extra=entry)
            await self._log_hooks({"action": status, **entry})

    async def _log_hooks(self, entry: dict[str, object]) -> None:
        """``log:entry`` plugins see each outcome; their failures never hold results back."""
        try:
            await self.hooks.run("log:entry", entry)
        except Reject as exc:
            log.warning("log:entry plugin failed", extra={"error": exc.reply})

    async def _release(self, reports: list[DeliveryReport]) -> None:
        """Finished deliveries no longer count against their domain's in-flight limit."""
        by_zone: dict[str, list[str]] = {}
        for report in reports:
            by_zone.setdefault(report.zone, []).append(f"{report.id}.{report.seq}")
        for zone, members in by_zone.items():
            if zone in self.limits:
                await self.limits[zone].release(members)
                # Senders waiting for room under a limit may ask again now.
                await self.bus.nc.publish(ready_subject(zone), WorkReady(zone=zone, finished=len(members)).encode())

    def _zone(self, zone: str) -> Zone:
        return self.config.zones.get(zone) or self.config.zones[self.config.queue.default_zone]

    async def _publish_bounce(self, report: DeliveryReport, kind: str) -> bool:
        """Publish the bounce (or delay) event of a report that still holds its lease."""
        # The one row of the report: reading every row of the message made the bounces of a
        # message to n recipients cost n squared.
        recipient = await self.store.leased_recipient(report.id, report.seq, report.lease_token)
        if recipient is None:
            return False  # already applied, or the lease passed to another sender
        message = await self.store.get_message(report.id)
        event = BounceEvent(
            id=report.id,
            seq=report.seq,
            zone=report.zone,
            recipient=recipient,
            mail_from=message.mail_from if message else "",
            response=report.response,
            category=report.category,
            time=report.time or time.time(),
            headers=message.headers if message else b"",
            mx=report.mx,
            arrival=message.created.timestamp() if message else 0.0,
            kind=kind,
        )
        subject = bounced_subject(report.zone) if kind == FAILED else delayed_subject(report.zone)
        await self.js.publish(
            subject, event.encode(), headers={"Nats-Msg-Id": f"{kind}:{report.id}:{report.seq}:{report.lease_token}"}
        )
        if kind == FAILED:
            metrics.bounce_generation.inc()
        return True
