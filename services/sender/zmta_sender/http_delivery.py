"""Delivery to HTTP: the message POSTed as a file upload instead of sent over SMTP.

The request is ``multipart/form-data`` with the fields ``id`` (``<id>.<seq>``),
``from`` and ``to``, and the file ``message`` (``<id>.eml``, ``message/rfc822``).
The multipart body is written here because httpx builds multipart uploads only from
whole or synchronous files, and a message is streamed from the store, never held
whole. A 2xx answer is a delivery, a 5xx a rejection, anything else (and no answer)
a deferral.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .context import DeliveryContext


@dataclass(slots=True)
class HttpOutcome:
    status: int  # 0: no answer
    response: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300

    @property
    def rejected(self) -> bool:
        return 500 <= self.status < 600


def _part(boundary: str, name: str, extra: str = "", content_type: str = "") -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n'
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode()


async def _body(boundary: str, delivery: DeliveryContext, message: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for name, value in (
        ("id", f"{delivery.id}.{delivery.seq}"),
        ("from", delivery.mail_from),
        ("to", delivery.recipient),
    ):
        yield _part(boundary, name) + value.encode() + b"\r\n"
    yield _part(boundary, "message", f'; filename="{delivery.id}.eml"', "message/rfc822")
    async for chunk in message:
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


async def post(client: httpx.AsyncClient, delivery: DeliveryContext, message: AsyncIterator[bytes]) -> HttpOutcome:
    assert delivery.http_url is not None
    boundary = uuid.uuid4().hex
    try:
        response = await client.post(
            delivery.http_url,
            content=_body(boundary, delivery, message),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    except httpx.HTTPError as exc:
        return HttpOutcome(0, f"HTTP delivery to {delivery.http_url} failed: {exc!r}")
    text = " ".join(response.text.split())[:200]
    return HttpOutcome(response.status_code, f"HTTP {response.status_code} {text}".strip())
