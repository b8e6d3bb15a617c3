"""Submission: /send (Nodemailer JSON), /send-raw (RFC 822), and the original's /store/{id}."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from zmta_common import queueing
from zmta_common.intake import Envelope, IntakeError, MessageIntake, QueuedMessage

from .common import ApiError, Services, error_responses
from .compose import ComposeError, compose
from .models import ErrorResponse, SendRequest, SendResponse
from .security import OPEN, caller

STORE_FAILED = "temporary failure while storing the message, try again later"


def router(services: Services) -> APIRouter:
    api = APIRouter(tags=["submission"])
    config, store = services.config, services.store

    def envelope_for(request: Request, interface: str) -> Envelope:
        # The user and origin a client claims count only from keys trusted to name them.
        who = caller(request)
        trusted = who is not None and who.may_set_user
        peer = request.client.host if request.client else ""
        user = request.headers.get("x-authenticated-user") if trusted else None
        if user is None and who is not None and who is not OPEN:
            user = who.name
        origin = (request.headers.get("x-originating-ip") if trusted else None) or peer
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
        """Feed the intake and queue the message (:func:`zmta_common.queueing.queue`)."""
        try:
            async for piece in pieces:
                intake.feed(piece)
                if intake.needs_flush:
                    await intake.flush()
        except IntakeError as exc:
            await intake.abort()
            queueing.refused(intake, exc)
            raise ApiError(exc.http_status, exc.reply) from None
        except (ApiError, HTTPException):  # HTTPException: the body grew past its limit (security.Gate)
            await intake.abort()
            raise
        except Exception as exc:
            await intake.abort()
            queueing.store_failed(intake, exc)
            raise ApiError(503, STORE_FAILED) from None
        try:
            return await queueing.queue(intake, services.bus)
        except IntakeError as exc:  # counted and logged by queue()
            await intake.abort()
            raise ApiError(exc.http_status, exc.reply) from None
        except Exception:
            await intake.abort()
            raise ApiError(503, STORE_FAILED) from None

    def check_maildrop() -> None:
        if not config.api.maildrop:
            raise ApiError(404, "message submission is disabled (api.maildrop)")

    @api.post("/send", response_model=SendResponse, responses=error_responses(400, 404, 413, 503))
    async def send(body: SendRequest, request: Request) -> JSONResponse:
        """Compose a message from Nodemailer-style JSON and queue it.

        The fields: from, sender, to, cc, bcc, replyTo, inReplyTo, references, subject, text,
        html, headers (``{"X-Key": "value"}`` or ``[{"key": ..., "value": ...}]``), attachments,
        envelope ``{from, to, cc, bcc}``, messageId, date, priority. Attachments carry their
        content inline (text, or ``encoding`` base64/hex/...; a ``data:`` URI as ``path`` works
        too); file paths and URLs (``path``, ``href``) are refused: 400, field
        ``attachments.0.path``. An attachment with a ``cid`` is an inline image of the html
        (multipart/related)."""
        check_maildrop()
        try:
            # In a thread: a message with big attachments takes a while to encode.
            raw, mail_from, recipients = await asyncio.to_thread(compose, body, config.api.max_recipients)
        except ComposeError as exc:
            raise ApiError(400, str(exc), exc.field) from None
        envelope = envelope_for(request, "api")
        envelope.mail_from, envelope.recipients = mail_from, recipients
        intake = MessageIntake(
            store, config, envelope, config.api.max_body, services.hooks, max_recipients=config.api.max_recipients
        )

        async def one() -> AsyncIterator[bytes]:
            yield raw

        queued = await store_message(intake, one())
        return JSONResponse(_send_reply(queued, envelope))

    @api.post(
        "/send-raw",
        response_model=SendResponse,
        responses=error_responses(400, 404, 413, 503),
        openapi_extra={"requestBody": {"content": {"message/rfc822": {"schema": {"type": "string"}}}}},
    )
    async def send_raw(request: Request) -> JSONResponse:
        """Queue a raw RFC 822 message (``Content-Type: message/rfc822``); sender and recipients
        come from its From/Sender and To/Cc/Bcc headers."""
        check_maildrop()
        envelope = envelope_for(request, "api")
        envelope.from_headers = True
        intake = MessageIntake(
            store, config, envelope, config.api.max_body, services.hooks, max_recipients=config.api.max_recipients
        )

        async def body() -> AsyncIterator[bytes]:
            async for piece in request.stream():
                yield piece
                if intake.too_big:
                    raise ApiError(413, f"request body over {config.api.max_body} bytes")

        queued = await store_message(intake, body())
        return JSONResponse(_send_reply(queued, envelope))

    @api.put(
        "/store/{message_id}",
        status_code=410,
        response_model=ErrorResponse,
        responses={410: {"model": ErrorResponse, "description": "not supported by this implementation"}},
        deprecated=True,
    )
    async def store_body(message_id: str) -> JSONResponse:
        """The original's raw body upload (a GridFS file without metadata, for deliveries added
        later over its internal channel). Here a body is stored only by /send, /send-raw and
        SMTP, in the same transaction as its message and delivery rows; a body uploaded on its
        own could never get deliveries and would only wait for garbage collection. Always 410."""
        raise ApiError(
            410,
            f"PUT /store/{message_id} is not supported: bodies are stored with their message,"
            " submit the whole message with POST /send-raw instead",
        )

    return api


def _send_reply(queued: QueuedMessage, envelope: Envelope) -> dict[str, object]:
    return SendResponse(
        id=queued.id, from_=envelope.mail_from, to=envelope.recipients, response=f"Message queued as {queued.id}"
    ).model_dump(by_alias=True)
