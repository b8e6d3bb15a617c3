"""The queue as zmta-webadmin reads and steers it: zones, counters, listings, one message,
its body, retry now and drop, the domains held back by limits, and blacklist marks."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from zmta_common.events import WorkReady, ready_subject
from zmta_common.headers import HeaderBlock
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.store import DeliveryRow, QueuedRow

from .common import AnyId, ApiError, MessageId, Services, ZoneName, check_zone, error_responses, iso, well_formed
from .models import (
    BlacklistResponse,
    Counter,
    CounterResponse,
    DeferredInfo,
    MessageResponse,
    Outcome,
    QueuedDelivery,
    QueuedList,
    SkipDomains,
    ZoneEntry,
)

log = logging.getLogger(__name__)

PAGE_MAX = 1000  # the original lists at most 1000 rows at once
PREFETCH_CHUNKS = 1  # body chunks (of up to 1 MiB) read with the message row by /fetch

SortKey = Literal["id", "created", "queued"]
Order = Literal["asc", "desc"]


def router(services: Services) -> APIRouter:
    api = APIRouter(tags=["queue"])
    config, store = services.config, services.store

    async def wake(zone: str) -> None:
        """Tell the zone's senders that work is ready (best effort: they poll every second anyway)."""
        try:
            await services.bus.nc.publish(ready_subject(zone), WorkReady(zone=zone, finished=0).encode())
        except Exception as exc:  # NATS down: the senders find the work by themselves
            log.warning("wake failed", extra={"zone": zone, "error": repr(exc)})

    def redis_or_503() -> Any:
        if services.redis is None:
            raise ApiError(503, "this api has no Redis connection")
        return services.redis

    @api.get("/zones", response_model=list[ZoneEntry])
    async def zones(
        include_disabled: Annotated[
            bool, Query(alias="includeDisabled", description="list disabled zones too (zones have no off switch yet)")
        ] = False,
    ) -> list[ZoneEntry]:
        """The sending zones, sorted by name."""
        names = [
            name for name, zone in config.zones.items() if include_disabled or not getattr(zone, "disabled", False)
        ]
        return [ZoneEntry(name=name) for name in sorted(names, key=lambda n: (n.lower(), n))]

    async def counters(zone: str | None) -> CounterResponse:
        if zone is not None:
            check_zone(config, zone)
        rows = await store.domain_counts(zone)
        if zone is None:
            return _zone_counters(sorted(config.zones), rows)
        active = [{"key": domain, "value": queued} for _, domain, queued, _ in rows if queued]
        deferred = [{"key": domain, "value": waiting} for _, domain, _, waiting in rows if waiting]
        return CounterResponse(
            zone=zone or "all",
            active=Counter(entries=active, rows=sum(queued for _, _, queued, _ in rows)),
            deferred=Counter(entries=deferred, rows=sum(waiting for _, _, _, waiting in rows)),
        )

    @api.get("/counter/zone/", response_model=CounterResponse)
    async def counter_all() -> CounterResponse:
        """Queued (active) and deferred rows, one entry per zone keyed by its name (zeros
        included), as the original answers and its web admin's home page reads them."""
        return await counters(None)

    @api.get("/counter/zone/{zone}", response_model=CounterResponse, responses=error_responses(404))
    async def counter_zone(zone: ZoneName) -> CounterResponse:
        """Queued (active) and deferred rows of one zone, per recipient domain."""
        return await counters(zone)

    @api.get("/queued/{type}/{zone}", response_model=QueuedList, responses=error_responses(400, 404))
    async def queued(
        type: Literal["active", "queued", "deferred"],
        zone: ZoneName,
        sort: Annotated[SortKey | None, Query(description="default: id (with a cursor: the cursor's)")] = None,
        order: Annotated[Order | None, Query(description="default: desc (with a cursor: the cursor's)")] = None,
        start: Annotated[int, Query(ge=0, le=1_000_000_000, description="rows to skip")] = 0,
        page_size: Annotated[int, Query(alias="pageSize", ge=1, description="at most 1000 (more is cut to 1000)")] = (
            PAGE_MAX
        ),
        cursor: Annotated[
            str | None, Query(max_length=2000, description="the ``next`` of the previous page, for the page after it")
        ] = None,
    ) -> QueuedList:
        """Deliveries of a zone that are ready (``active`` or ``queued``: the same) or waiting
        for a later attempt (``deferred``), a page at a time."""
        check_zone(config, zone)
        kind: Literal["queued", "deferred"] = "deferred" if type == "deferred" else "queued"
        after: list[Any] | None = None
        if cursor is not None:
            if start:
                raise ApiError(400, "give start or cursor, not both", "cursor")
            key = _read_cursor(cursor)
            for name, given, kept in (("type", kind, key["t"]), ("sort", sort, key["s"]), ("order", order, key["o"])):
                if given is not None and given != kept:
                    raise ApiError(400, f"the cursor is for {name} {kept}, not {given}", "cursor")
            sort, order, after = key["s"], key["o"], key["k"]
        sort, order = sort or "id", order or "desc"
        limit = min(page_size, PAGE_MAX)
        rows = await store.list_queued(
            zone, kind == "deferred", sort, order == "desc", offset=start, limit=limit + 1, after=after
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            {
                "id": r.id,
                "seq": r.seq,
                "zone": r.zone,
                "recipient": r.recipient,
                "created": iso(r.created),
                "queued": iso(r.next_attempt),
                "deferred": r.attempts,
            }
            for r in rows
        ]
        next_cursor = _make_cursor(kind, sort, order, rows[-1]) if more and rows else None
        return QueuedList.model_validate({"zone": zone, "type": kind, "list": items, "next": next_cursor})

    @api.get("/message/{message_id}", response_model=MessageResponse, responses=error_responses(400, 404))
    async def message_status(message_id: MessageId) -> MessageResponse:
        """The message's metadata and its deliveries still in the queue."""
        rows = await store.deliveries_of(message_id)
        message = await store.get_message(message_id) if rows else None
        if message is None:
            raise ApiError(404, f"message {message_id} is not in the queue", "id")
        meta = dict(message.meta)
        meta["headers"] = HeaderBlock.parse(message.headers).as_list()
        return MessageResponse(meta=meta, messages=[_delivery_view(r) for r in rows])

    async def retry(message_id: str, seq: str | None) -> Outcome:
        what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
        state, zone = await store.retry_now(message_id, seq) if well_formed(message_id, seq) else ("missing", None)
        if state == "missing" or zone is None:
            return Outcome(success=True, message=f"{what} is not in the queue")
        if state == "leased":
            return Outcome(success=True, message=f"{what} is being delivered right now")
        log.info("retry now", extra={"id": message_id, "seq": seq, "zone": zone})
        await wake(zone)
        return Outcome(success=True)

    # The original answers these with success whatever happened (a delivery gone already,
    # held by a sender, an id that cannot be one), and its web admin shows an error page for
    # any other status: so do we, saying in "message" why nothing changed.

    @api.put("/message/{message_id}/{seq}", response_model=Outcome, response_model_exclude_none=True)
    async def retry_now(message_id: AnyId, seq: AnyId) -> Outcome:
        """Send now: the delivery is ready at once, whatever its retry schedule said (the
        original's manual retry); not while a sender holds it."""
        return await retry(message_id, seq)

    @api.put("/message/{message_id}", response_model=Outcome, response_model_exclude_none=True)
    @api.put(
        "/message/{message_id}/", response_model=Outcome, response_model_exclude_none=True, include_in_schema=False
    )
    async def retry_message(message_id: AnyId) -> Outcome:
        """Send now, every delivery of the message that no sender holds (the web admin asks
        with an empty seq: ``/message/<id>/``)."""
        return await retry(message_id, None)

    async def drop(message_id: str, seq: str | None) -> Outcome:
        what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
        removed, leased = await store.drop_deliveries(message_id, seq) if well_formed(message_id, seq) else ([], 0)
        if not removed:
            why = "is being delivered right now" if leased else "is not in the queue"
            return Outcome(success=True, message=f"{what} {why}")
        for removed_seq, zone in removed:
            log.info("dropped by api", extra={"id": message_id, "seq": removed_seq, "zone": zone})
        return Outcome(success=True)

    @api.delete("/message/{message_id}/{seq}", response_model=Outcome, response_model_exclude_none=True)
    async def drop_delivery(message_id: AnyId, seq: AnyId) -> Outcome:
        """Remove one delivery (no bounce), unless a sender holds it; the message goes with
        its last delivery."""
        return await drop(message_id, seq)

    @api.delete("/message/{message_id}", response_model=Outcome, response_model_exclude_none=True)
    @api.delete(
        "/message/{message_id}/", response_model=Outcome, response_model_exclude_none=True, include_in_schema=False
    )
    async def drop_message(message_id: AnyId) -> Outcome:
        """Remove every delivery of the message that no sender holds (no bounce)."""
        return await drop(message_id, None)

    @api.get(
        "/fetch/{message_id}",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "the stored message: its headers, a blank line and the body",
                "content": {"message/rfc822": {"schema": {"type": "string"}}},
            },
            **error_responses(400, 404),
        },
    )
    async def fetch(
        message_id: MessageId,
        body: Annotated[str | None, Query(max_length=10, description="yes: the body only")] = None,
    ) -> StreamingResponse:
        """The message as stored, streamed chunk by chunk: without the Received header and the
        DKIM signatures, which are added when it is sent."""
        message = await store.get_message(message_id, prefetch=PREFETCH_CHUNKS)
        if message is None:
            raise ApiError(404, f"message {message_id} does not exist", "id")
        body_only = (body or "").strip().lower() == "yes"

        async def content() -> AsyncIterator[bytes]:
            if not body_only:
                yield message.headers + b"\r\n"
            async for chunk in store.body(message, PREFETCH_CHUNKS):
                yield chunk

        return StreamingResponse(content(), media_type="message/rfc822")

    @api.get("/skipdomains/{zone}", response_model=SkipDomains, responses=error_responses(404, 503))
    async def skip_domains(zone: ZoneName) -> SkipDomains:
        """Recipient domains of the zone that are at a connection or rate limit right now
        (the queue leases none of their deliveries until they have room)."""
        check_zone(config, zone)
        limits = ZoneLimits(redis_or_503(), zone, config.zones[zone])
        return SkipDomains(skipDomains=sorted(await limits.skip_domains()))

    @api.get("/blacklist", response_model=BlacklistResponse, responses=error_responses(503))
    async def blacklist() -> BlacklistResponse:
        """Local addresses that a recipient domain said are blacklisted, unused for that domain
        until the mark expires (bounce.blacklist_ttl after it was set)."""
        ttl = config.bounce.blacklist_ttl
        marks = await Blacklist(redis_or_503()).entries()
        entries = [
            {
                "id": "",
                "seq": "",
                "address": address,
                "domain": domain,
                "response": "",
                "created": iso(expires - ttl),
                "expires": iso(expires),
            }
            for domain, address, expires in sorted(marks, key=lambda m: (m[0], m[1]))
        ]
        return BlacklistResponse.model_validate({"list": entries})

    return api


def _make_cursor(kind: str, sort: str, order: str, last: QueuedRow) -> str:
    key: list[Any] = [last.id, last.seq]
    if sort == "created":
        key.insert(0, last.created.isoformat())
    elif sort == "queued":
        key.insert(0, last.next_attempt.isoformat())
    raw = json.dumps({"t": kind, "s": sort, "o": order, "k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> dict[str, Any]:
    """The cursor's type, sort, order and key (with its time parsed); 400 for anything else."""
    bad = ApiError(400, "the cursor is not one this api gave out", "cursor")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise bad from None
    if not isinstance(data, dict):
        raise bad
    sort, key = data.get("s"), data.get("k")
    if data.get("t") not in ("queued", "deferred") or sort not in ("id", "created", "queued"):
        raise bad
    if data.get("o") not in ("asc", "desc") or not isinstance(key, list):
        raise bad
    if len(key) != (2 if sort == "id" else 3) or not all(isinstance(k, str) and k.isprintable() for k in key):
        raise bad
    if sort != "id":
        try:
            moment = datetime.fromisoformat(key[0])
        except ValueError:
            raise bad from None
        if moment.tzinfo is None:
            raise bad
        key = [moment, *key[1:]]
    data["k"] = key
    return data


def _zone_counters(zones: list[str], rows: list[tuple[str, str, int, int]]) -> CounterResponse:
    active, deferred = dict.fromkeys(zones, 0), dict.fromkeys(zones, 0)
    for zone, _, queued, waiting in rows:
        active[zone] = active.get(zone, 0) + queued
        deferred[zone] = deferred.get(zone, 0) + waiting
    return CounterResponse(
        zone="all",
        active=Counter(entries=[{"key": z, "value": n} for z, n in active.items()], rows=sum(active.values())),
        deferred=Counter(entries=[{"key": z, "value": n} for z, n in deferred.items()], rows=sum(deferred.values())),
    )


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def _delivery_view(row: DeliveryRow) -> QueuedDelivery:
    deferred = None
    if row.attempts:
        deferred = DeferredInfo(
            first=_ms(row.first_deferred),
            count=row.attempts,
            last=_ms(row.last_deferred),
            next=_ms(row.next_attempt),
            response=row.last_response or "",
        )
    return QueuedDelivery(
        id=row.id,
        seq=row.seq,
        zone=row.zone,
        recipient=row.recipient,
        status="DEFERRED" if row.attempts else "QUEUED",
        lock=row.leased,
        deferred=deferred,
    )
