"""The queue as zmta-webadmin reads and steers it: zones, counters, listings, one message,
its body, retry now and drop, the domains held back by limits, and blacklist marks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from zmta_common.config import Config
from zmta_common.domains import canonical_domain
from zmta_common.headers import HeaderBlock
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.store import DeliveryRow, DomainCount, DropResult, QueuedRow, RetryResult, Store, StoredMessage

from .common import (
    AnyId,
    ApiError,
    DomainName,
    MessageId,
    Services,
    ZoneName,
    check_zone,
    error_responses,
    iso,
    well_formed,
)
from .models import (
    BlacklistResponse,
    Counter,
    CounterResponse,
    DeferralRecord,
    DeferredInfo,
    HoldResult,
    LockInfo,
    MessageResponse,
    Outcome,
    QueuedDelivery,
    QueuedList,
    RetryZoneResult,
    SkipDomains,
    ZoneEntry,
)

log = logging.getLogger(__name__)

PAGE_MAX = 1000  # the original lists at most 1000 rows at once
PREFETCH_CHUNKS = 1  # body chunks (of up to 1 MiB) read with the message row by /fetch and /message
HASH_IN_THREAD = 64 * 1024  # body chunks bigger than this are hashed off the event loop
# The original's _deferred.response for a delivery held back from the start (its deferDelivery).
HELD_RESPONSE = "Deferred by router"

SortKey = Literal["id", "created", "queued"]
Order = Literal["asc", "desc"]
QueueType = Annotated[
    str,
    Path(max_length=200, description="queued (or active), deferred or held; anything else counts as queued"),
]


def router(services: Services) -> APIRouter:
    api = APIRouter(tags=["queue"])
    config, store = services.config, services.store

    wake, redis_or_503 = services.wake, services.redis_or_503

    @api.get("/zones", response_model=list[ZoneEntry])
    async def zones(
        include_disabled: Annotated[
            bool, Query(alias="includeDisabled", description="list disabled zones too (zones have no off switch yet)")
        ] = False,
    ) -> list[ZoneEntry]:
        """The sending zones, sorted by name (``includeDisabled`` is accepted; no zone can be
        disabled yet)."""
        names = [
            name for name, zone in config.zones.items() if include_disabled or not getattr(zone, "disabled", False)
        ]
        return [ZoneEntry(name=name) for name in sorted(names, key=lambda n: (n.lower(), n))]

    # A zone that is not configured is no error on the read routes (the original answers them
    # all with 200): it has no rows, so it gets the usual shape, empty. Rows left in a zone
    # removed from the configuration are still counted and listed.

    async def counters(zone: str | None) -> CounterResponse:
        rows = await store.domain_counts(zone)
        if zone is None:
            return _zone_counters(sorted(config.zones), rows)
        active = [{"key": r.domain, "value": r.queued} for r in rows if r.queued]
        deferred = [{"key": r.domain, "value": r.deferred} for r in rows if r.deferred]
        return CounterResponse(
            zone=zone or "all",
            active=Counter(entries=active, rows=sum(r.queued for r in rows)),
            deferred=Counter(entries=deferred, rows=sum(r.deferred for r in rows)),
        )

    @api.get("/counter/zone/", response_model=CounterResponse)
    async def counter_all() -> CounterResponse:
        """Queued (active) and deferred rows, one entry per zone keyed by its name (zeros
        included), as the original answers and its web admin's home page reads them."""
        return await counters(None)

    @api.get("/counter/zone/{zone}", response_model=CounterResponse)
    async def counter_zone(zone: ZoneName) -> CounterResponse:
        """Queued (active) and deferred rows of one zone, per recipient domain. As the original,
        a zone that is not configured is answered 200: its rows if some are left from an
        earlier configuration, else the same shape, empty."""
        return await counters(zone)

    @api.get("/queued/{type}/{zone}", response_model=QueuedList, responses=error_responses(400))
    async def queued(
        type: QueueType,
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
        domain: Annotated[
            str | None, Query(min_length=1, max_length=255, description="only deliveries to this recipient domain")
        ] = None,
    ) -> QueuedList:
        """Deliveries of a zone that are ready (``queued``; ``active`` or any other type: the
        same, as in the original), waiting for a later attempt (``deferred``, any case) or held
        by an operator (``held``: never attempted until released), a page at a time. Beyond
        one page, pass ``next`` back as ``?cursor=`` (it keeps type, sort, order and domain);
        it is null on the last page. ``domain`` narrows the list to one recipient domain. As
        the original, a zone that is not configured is answered 200, with an empty list."""
        if domain is not None:
            try:
                domain = canonical_domain(domain)
            except ValueError as exc:
                raise ApiError(400, f"domain: {exc}", "domain") from None
        named = type.strip().lower()
        kind: Literal["queued", "deferred", "held"] = named if named in ("deferred", "held") else "queued"  # type: ignore[assignment]
        after: list[Any] | None = None
        if cursor is not None:
            if start:
                raise ApiError(400, "give start or cursor, not both", "cursor")
            key = _read_cursor(cursor)
            for name, given, kept in (("type", kind, key["t"]), ("sort", sort, key["s"]), ("order", order, key["o"])):
                if given is not None and given != kept:
                    raise ApiError(400, f"the cursor is for {name} {kept}, not {given}", "cursor")
            if domain != key.get("d"):
                raise ApiError(400, f"the cursor is for domain {key.get('d')}, not {domain}", "cursor")
            sort, order, after = key["s"], key["o"], key["k"]
        sort, order = sort or "id", order or "desc"
        limit = min(page_size, PAGE_MAX)
        rows = await store.list_queued(
            zone, kind, sort, order == "desc", offset=start, limit=limit + 1, after=after, domain=domain
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
        next_cursor = _make_cursor(kind, sort, order, rows[-1], domain) if more and rows else None
        return QueuedList.model_validate({"zone": zone, "type": kind, "list": items, "next": next_cursor})

    # -- hold and release, retry a zone (before /message/{id}/{seq}: "hold" is no seq) --

    @api.post("/message/{message_id}/hold", response_model=HoldResult, response_model_exclude_none=True)
    async def hold(message_id: AnyId) -> HoldResult:
        """Hold the message's deliveries (those no sender holds right now): they are never
        attempted, and never expire, until released (Postfix's ``postsuper -h``)."""
        held = await store.hold(message_id) if well_formed(message_id, None) else 0
        log.info("held", extra={"id": message_id, "count": held})
        return HoldResult(success=True, held=held)

    @api.delete("/message/{message_id}/hold", response_model=HoldResult, response_model_exclude_none=True)
    async def release(message_id: AnyId) -> HoldResult:
        """Release the message's held deliveries: ready at once (``postsuper -H``)."""
        released = await store.release(message_id) if well_formed(message_id, None) else 0
        log.info("released", extra={"id": message_id, "count": released})
        for zone in {d.zone for d in await store.deliveries_of(message_id)} if released else set():
            await wake(zone)
        return HoldResult(success=True, released=released)

    @api.post("/retry/{zone}", response_model=RetryZoneResult, responses=error_responses(404))
    async def retry_zone(zone: ZoneName) -> RetryZoneResult:
        """Every deferred delivery of the zone is due now (``postqueue -f``); held ones stay held."""
        return await retry_all(zone, None)

    @api.post("/retry/{zone}/{domain}", response_model=RetryZoneResult, responses=error_responses(400, 404))
    async def retry_domain(zone: ZoneName, domain: DomainName) -> RetryZoneResult:
        """Every deferred delivery of the zone to the recipient domain is due now (``postqueue -s``)."""
        try:
            canonical = canonical_domain(domain)
        except ValueError as exc:
            raise ApiError(400, f"domain: {exc}", "domain") from None
        return await retry_all(zone, canonical)

    async def retry_all(zone: str, domain: str | None) -> RetryZoneResult:
        check_zone(config, zone)
        retried = await store.retry_zone(zone, domain)
        log.info("retry now", extra={"zone": zone, "domain": domain, "count": retried})
        if retried:
            await wake(zone)
        return RetryZoneResult(success=True, retried=retried)

    # Without the None fields of the models (a delivery's lock and deferred are absent, not
    # null, as in the original); meta is a plain dict, so its values are kept as they are.
    @api.get(
        "/message/{message_id}",
        response_model=MessageResponse,
        response_model_exclude_none=True,
        responses=error_responses(400, 404),
    )
    async def message_status(message_id: MessageId) -> MessageResponse:
        """The message's metadata and its deliveries still in the queue, in the original's
        shape (404 once every delivery is done).

        As the original: ``meta.user`` is false without an authenticated user; times inside a
        message are ms since the epoch. ``meta.sourceMd5`` is the hex MD5 of the stored body
        (the message after its top-level header block, line ends CRLF: what the original
        stores and hashes), computed on each request by streaming the body from the store.
        A delivery's ``lock`` is there only while a sender holds the delivery (its lease:
        ``lockOwner`` is the sender, ``expires`` the lease's end). ``status`` is DEFERRED while
        the next attempt is in the future, and only then is ``deferred`` there: its ``log``
        holds what the queue keeps of the deferrals, the last failed attempt's response (the
        original keeps the whole SMTP transcript); a delivery held back by a future Date has
        count 0, "Deferred by router", no log."""
        rows = await store.deliveries_of(message_id)
        message = await store.get_message(message_id, prefetch=PREFETCH_CHUNKS) if rows else None
        source_md5 = await _source_md5(store, message) if message is not None else None
        if message is None or source_md5 is None:
            raise ApiError(404, f"message {message_id} is not in the queue", "id")
        meta = dict(message.meta)
        meta["headers"] = HeaderBlock.parse(message.headers).as_list()
        meta["sourceMd5"] = source_md5
        if not meta.get("user"):
            meta["user"] = False  # the original's value for "no authenticated user"
        now = datetime.now(UTC)
        entries = [e.view() for e in await store.message_log(message_id)]
        return MessageResponse.model_validate(
            {"meta": meta, "messages": [_delivery_view(r, config, now) for r in rows], "log": entries}
        )

    async def retry(message_id: str, seq: str | None) -> Outcome:
        what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
        found = await store.retry_now(message_id, seq) if well_formed(message_id, seq) else RetryResult("missing", None)
        zone = found.zone
        if found.state == "missing" or zone is None:
            return Outcome(success=True, message=f"{what} is not in the queue")
        if found.state == "leased":
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
        original's manual retry); not while a sender holds it. As the original, answered 200
        and success whatever happened; where nothing changed, ``message`` says why."""
        return await retry(message_id, seq)

    @api.put("/message/{message_id}", response_model=Outcome, response_model_exclude_none=True)
    @api.put(
        "/message/{message_id}/", response_model=Outcome, response_model_exclude_none=True, include_in_schema=False
    )
    async def retry_message(message_id: AnyId) -> Outcome:
        """Send now, every delivery of the message that no sender holds (the web admin asks
        with an empty seq: ``/message/<id>/``, which does the same). Answered 200 and success
        whatever happened; where nothing changed, ``message`` says why."""
        return await retry(message_id, None)

    async def drop(message_id: str, seq: str | None) -> Outcome:
        what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
        dropped = await store.drop_deliveries(message_id, seq) if well_formed(message_id, seq) else DropResult([], 0)
        if not dropped.removed:
            why = "is being delivered right now" if dropped.leased else "is not in the queue"
            return Outcome(success=True, message=f"{what} {why}")
        for removed in dropped.removed:
            log.info("dropped by api", extra={"id": message_id, "seq": removed.seq, "zone": removed.zone})
        return Outcome(success=True)

    @api.delete("/message/{message_id}/{seq}", response_model=Outcome, response_model_exclude_none=True)
    async def drop_delivery(message_id: AnyId, seq: AnyId) -> Outcome:
        """Remove one delivery (no bounce), unless a sender holds it; the message and its body
        go with its last delivery. As the original, answered 200 and success whatever
        happened (the web admin takes anything else for a failure); where nothing changed,
        ``message`` says why."""
        return await drop(message_id, seq)

    @api.delete("/message/{message_id}", response_model=Outcome, response_model_exclude_none=True)
    @api.delete(
        "/message/{message_id}/", response_model=Outcome, response_model_exclude_none=True, include_in_schema=False
    )
    async def drop_message(message_id: AnyId) -> Outcome:
        """Remove every delivery of the message that no sender holds (no bounce); the body goes
        with the last one. ``/message/<id>/`` with the trailing slash (the web admin's form)
        does the same. Answered 200 and success whatever happened; where nothing changed,
        ``message`` says why."""
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
        """The message as stored (``message/rfc822``), streamed chunk by chunk: headers, a blank
        line and the body, without the Received header and the DKIM signatures, which are
        added when it is sent. ``?body=yes``: the body only."""
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

    @api.get("/skipdomains/{zone}", response_model=SkipDomains, responses=error_responses(503))
    async def skip_domains(zone: ZoneName) -> SkipDomains:
        """Recipient domains of the zone that are at a connection or rate limit right now
        (the queue leases none of their deliveries until they have room); none (``[]``) for a
        zone that is not configured."""
        if zone not in config.zones:
            return SkipDomains(skipDomains=[])
        limits = ZoneLimits(redis_or_503(), zone, config.zones[zone])
        return SkipDomains(skipDomains=sorted(await limits.skip_domains()))

    @api.get("/blacklist", response_model=BlacklistResponse, responses=error_responses(503))
    async def blacklist() -> BlacklistResponse:
        """Local addresses that a recipient domain said are blacklisted, unused for that domain
        until the mark expires (``bounce.blacklist_ttl`` after it was set); ``id``, ``seq`` and
        ``response``: the delivery whose reply set the mark. Times in ms since the epoch, as
        the original's ``created``."""
        marks = await Blacklist(redis_or_503()).entries()
        entries = [
            {
                "id": mark.id,
                "seq": mark.seq,
                "address": mark.address,
                "domain": mark.domain,
                "response": mark.response,
                "created": round(mark.created * 1000),
                "expires": round(mark.expires * 1000),
            }
            for mark in sorted(marks, key=lambda m: (m.domain, m.address))
        ]
        return BlacklistResponse.model_validate({"list": entries})

    return api


def _make_cursor(kind: str, sort: str, order: str, last: QueuedRow, domain: str | None = None) -> str:
    key: list[Any] = [last.id, last.seq]
    if sort == "created":
        key.insert(0, last.created.isoformat())
    elif sort == "queued":
        key.insert(0, last.next_attempt.isoformat())
    raw = json.dumps({"t": kind, "s": sort, "o": order, "k": key, "d": domain}, separators=(",", ":"))
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
    if data.get("t") not in ("queued", "deferred", "held") or sort not in ("id", "created", "queued"):
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


def _zone_counters(zones: list[str], rows: list[DomainCount]) -> CounterResponse:
    active, deferred = dict.fromkeys(zones, 0), dict.fromkeys(zones, 0)
    for row in rows:
        active[row.zone] = active.get(row.zone, 0) + row.queued
        deferred[row.zone] = deferred.get(row.zone, 0) + row.deferred
    return CounterResponse(
        zone="all",
        active=Counter(entries=[{"key": z, "value": n} for z, n in active.items()], rows=sum(active.values())),
        deferred=Counter(entries=[{"key": z, "value": n} for z, n in deferred.items()], rows=sum(deferred.values())),
    )


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


async def _source_md5(store: Store, message: StoredMessage) -> str | None:
    """The hex MD5 of the message body as stored, as the original's ``sourceMd5``; None when
    the body went away while it was read (the message left the queue meanwhile).

    The bytes hashed are exactly the stored body chunks, in order, which is what the original
    stores and hashes: the message after its top-level header block and the empty line that
    ends it (child MIME parts keep their headers), with every line end made CRLF (and, as the
    intake stores it, a final CRLF after a last line that had none). Nothing else: neither the
    headers (kept apart, and rebuilt at sending) nor the Received/DKIM lines added at sending.

    Streamed chunk by chunk (a few chunks of up to 1 MiB in memory at once), and a big chunk is hashed
    in a worker thread, so a huge body neither sits whole in memory nor blocks the event loop.
    """
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    async for chunk in store.body(message, PREFETCH_CHUNKS):
        size += len(chunk)
        if len(chunk) > HASH_IN_THREAD:
            await asyncio.to_thread(digest.update, chunk)
        else:
            digest.update(chunk)
    return digest.hexdigest() if size == message.body_size else None


def _delivery_view(row: DeliveryRow, config: Config, now: datetime) -> QueuedDelivery:
    """One delivery as the original's getInfo gives it: DEFERRED while its next attempt is in
    the future (then with ``deferred``), QUEUED otherwise (a deferral whose time has come, or
    that was retried now, is QUEUED, without ``deferred``); ``lock`` only while leased."""
    waiting = row.next_attempt > now
    deferred = None
    if waiting and row.attempts:
        deferred = DeferredInfo(
            first=_ms(row.first_deferred),
            count=row.attempts,
            last=_ms(row.last_deferred),
            next=_ms(row.next_attempt),
            response=row.last_response or "",
            # The store keeps the last failed attempt's response and time, not the transcript.
            log=[DeferralRecord(time=_ms(row.last_deferred), level="info", tnx="server", message=row.last_response)]
            if row.last_response is not None
            else [],
        )
    elif waiting:  # never tried: held back until its Date (the original's deferDelivery)
        deferred = DeferredInfo(
            first=_ms(row.created),
            count=0,
            last=_ms(row.created),
            next=_ms(row.next_attempt),
            response=HELD_RESPONSE,
            log=[],
        )
    lock = None
    if row.leased and row.lease_expires is not None:
        zone = config.zones.get(row.zone)
        lock = LockInfo(
            key=f"lock {row.id} {row.seq}",
            zone=row.zone,
            domain=row.domain,
            lockOwner=row.lease_owner or "",
            maxConnections=(zone.domain_policy(row.domain).connections or 0) if zone is not None else 0,
            expires=_ms(row.lease_expires),
        )
    return QueuedDelivery(
        id=row.id,
        seq=row.seq,
        zone=row.zone,
        recipient=row.recipient,
        status="DEFERRED" if waiting else "QUEUED",
        lock=lock,
        deferred=deferred,
    )
