"""The FastAPI application: routes with the original's paths and JSON shapes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from zmta_common import metrics
from zmta_common.addresses import address_error
from zmta_common.bus import Bus, announce_queued
from zmta_common.config import Config
from zmta_common.headers import HeaderBlock
from zmta_common.intake import Envelope, IntakeError, MessageIntake, QueuedMessage
from zmta_common.store import DeliveryRow, Store

from .compose import ComposeError, compose
from .models import (
    Counter,
    CounterResponse,
    DeferredInfo,
    ErrorResponse,
    MessageResponse,
    QueuedDelivery,
    SendRequest,
    SendResponse,
    SuppressionAdded,
    SuppressionDeleted,
    SuppressionList,
    SuppressionRequest,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    config: Config
    store: Store
    bus: Bus


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="ZoneMTA-py", version="0.1.0")
    config, store = services.config, services.store

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=exc.error, field=exc.field).model_dump(exclude_none=True), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse({"error": f"{field or 'body'}: {first['msg']}", "field": field or None}, 400)

    def envelope_for(request: Request, interface: str) -> Envelope:
        user = request.headers.get("x-authenticated-user")
        origin = request.headers.get("x-originating-ip") or (request.client.host if request.client else "")
        return Envelope(
            mail_from="",
            recipients=[],
            interface=interface,
            transtype="HTTP",
            origin=origin,
            originhost=f"[{origin}]" if origin else "",
            transhost="",
            user=user,
            allow_routing_headers=True,  # the original allows X-Sending-Zone on the api interface
        )

    async def store_message(intake: MessageIntake, pieces: AsyncIterator[bytes]) -> QueuedMessage:
        try:
            async for piece in pieces:
                intake.feed(piece)
                if intake.needs_flush:
                    await intake.flush()
            queued = await intake.finish()
        except IntakeError as exc:
            await intake.abort()
            metrics.message_drop.inc()
            raise ApiError(exc.http_status, exc.reply) from None
        except ApiError:
            await intake.abort()
            raise
        except Exception as exc:
            await intake.abort()
            metrics.message_push.inc(result="fail")
            log.warning("store failed", extra={"id": intake.id, "error": repr(exc)})
            raise ApiError(503, "temporary failure while storing the message, try again later") from None
        if queued.dropped:
            metrics.message_drop.inc()
            log.info("dropped", extra={"id": queued.id, "suppressed": queued.suppressed})
            return queued
        metrics.message_push.inc(result="success")
        await announce_queued(services.bus, queued.id, queued.zones)
        log.info("queued", extra={"id": queued.id, "zones": queued.zones, "interface": intake.envelope.interface})
        return queued

    def check_maildrop(request: Request) -> None:
        if not config.api.maildrop:
            raise ApiError(404, "message submission is disabled (api.maildrop)")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.api.max_body:
            raise ApiError(413, f"request body over {config.api.max_body} bytes")

    @app.post("/send", response_model=SendResponse, responses={400: {"model": ErrorResponse}})
    async def send(body: SendRequest, request: Request) -> JSONResponse:
        """Compose a message from Nodemailer-style JSON and queue it."""
        check_maildrop(request)
        try:
            raw, mail_from, recipients = compose(body)
        except ComposeError as exc:
            raise ApiError(400, str(exc), exc.field) from None
        envelope = envelope_for(request, "api")
        envelope.mail_from, envelope.recipients = mail_from, recipients
        intake = MessageIntake(store, config, envelope, config.api.max_body)

        async def one() -> AsyncIterator[bytes]:
            yield raw

        queued = await store_message(intake, one())
        return JSONResponse(_send_reply(queued, envelope))

    @app.post(
        "/send-raw",
        response_model=SendResponse,
        responses={400: {"model": ErrorResponse}},
        openapi_extra={"requestBody": {"content": {"message/rfc822": {"schema": {"type": "string"}}}}},
    )
    async def send_raw(request: Request) -> JSONResponse:
        """Queue a raw RFC 822 message; sender and recipients come from its headers."""
        check_maildrop(request)
        envelope = envelope_for(request, "api")
        envelope.from_headers = True
        intake = MessageIntake(store, config, envelope, config.api.max_body)

        async def body() -> AsyncIterator[bytes]:
            async for piece in request.stream():
                yield piece
                if intake.too_big:
                    raise ApiError(413, f"request body over {config.api.max_body} bytes")

        queued = await store_message(intake, body())
        return JSONResponse(_send_reply(queued, envelope))

    @app.get("/message/{message_id}", response_model=MessageResponse, responses={404: {"model": ErrorResponse}})
    async def message_status(message_id: str) -> MessageResponse:
        """The message's metadata and its deliveries still in the queue."""
        rows = await store.deliveries_of(message_id)
        message = await store.get_message(message_id) if rows else None
        if message is None:
            raise ApiError(404, f"message {message_id} is not in the queue")
        meta = dict(message.meta)
        meta["headers"] = HeaderBlock.parse(message.headers).as_list()
        return MessageResponse(meta=meta, messages=[_delivery_view(r) for r in rows])

    async def counters(zone: str | None) -> CounterResponse:
        if zone is not None and zone not in config.zones:
            raise ApiError(404, f"sending zone {zone!r} does not exist")
        rows = await store.domain_counts(zone)
        active = [{"key": domain, "value": queued} for _, domain, queued, _ in rows if queued]
        deferred = [{"key": domain, "value": waiting} for _, domain, _, waiting in rows if waiting]
        return CounterResponse(
            zone=zone or "all",
            active=Counter(entries=active, rows=sum(queued for _, _, queued, _ in rows)),
            deferred=Counter(entries=deferred, rows=sum(waiting for _, _, _, waiting in rows)),
        )

    @app.get("/counter/zone/", response_model=CounterResponse)
    async def counter_all() -> CounterResponse:
        """Queued (active) and deferred rows over all zones, per recipient domain."""
        return await counters(None)

    @app.get("/counter/zone/{zone}", response_model=CounterResponse, responses={404: {"model": ErrorResponse}})
    async def counter_zone(zone: str) -> CounterResponse:
        """Queued (active) and deferred rows of one zone, per recipient domain."""
        return await counters(zone)

    @app.get("/suppressionlist", response_model=SuppressionList)
    async def suppression_list() -> SuppressionList:
        """Suppressed addresses and domains, newest first: mail to them is dropped silently."""
        return SuppressionList(suppressed=await store.list_suppressions())

    @app.post("/suppressionlist", response_model=SuppressionAdded, responses={400: {"model": ErrorResponse}})
    async def suppress(entry: SuppressionRequest) -> SuppressionAdded:
        """Suppress an address (``{"address": ...}``) or a whole domain (``{"domain": ...}``)."""
        if (entry.address is None) == (entry.domain is None):
            raise ApiError(400, "give either an address or a domain", "address")
        if entry.address is not None:
            if reason := address_error(entry.address):
                raise ApiError(400, f"{entry.address!r} is not a valid address: {reason}", "address")
            added = await store.add_suppression(address=entry.address)
        else:
            domain = (entry.domain or "").strip().lower()
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                raise ApiError(400, f"{entry.domain!r} is not a valid domain", "domain") from None
            if not domain or " " in domain or "@" in domain:
                raise ApiError(400, f"{entry.domain!r} is not a valid domain", "domain")
            added = await store.add_suppression(domain=domain)
        added.pop("created", None)
        return SuppressionAdded(suppressed=added)

    @app.delete("/suppressionlist", response_model=SuppressionDeleted, responses={404: {"model": ErrorResponse}})
    async def unsuppress(request: Request, id: str | None = None) -> SuppressionDeleted:
        """Remove an entry by its id, given as ``?id=`` or in a JSON body ``{"id": ...}``."""
        entry_id = id
        if entry_id is None and await request.body():
            try:
                entry_id = (await request.json()).get("id")
            except ValueError:
                raise ApiError(400, "the body is not JSON", "id") from None
        if not isinstance(entry_id, str) or not entry_id:
            raise ApiError(400, "the id of the entry to delete is missing", "id")
        if not await store.delete_suppression(entry_id):
            raise ApiError(404, f"no suppression entry {entry_id}", "id")
        return SuppressionDeleted(deleted=entry_id)

    @app.get("/health")
    async def health() -> dict[str, object]:
        await store.pool.fetchval("SELECT 1")
        return {"status": "ok", "nats": services.bus.nc.is_connected}

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics of the api process."""
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return app


def _send_reply(queued: QueuedMessage, envelope: Envelope) -> dict[str, object]:
    return SendResponse(
        id=queued.id, from_=envelope.mail_from, to=envelope.recipients, response=f"Message queued as {queued.id}"
    ).model_dump(by_alias=True)


def _ms(value: object) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0  # type: ignore[attr-defined]


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
