"""The bytes that go on the wire for one delivery: Received header, headers, body, dot-stuffed.

Dot-stuffing is done here, as the body is streamed from the store in chunks: the
SMTP session (:mod:`.smtp_session`) writes the chunks as they are. A line that starts
with a dot gets a second dot even when the line start falls on the edge between two
chunks, or between a CR and its LF.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from zmta_common.headers import header_safe


class DotStuffer:
    """Stateful RFC 5321 4.5.2 transparency over a stream of CRLF-normalised chunks."""

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the last two bytes sent; the message starts at a line start

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._tail == b"\r\n" and chunk[:1] == b".":
            out = b"." + out
        elif self._tail[-1:] == b"\r" and chunk[:2] == b"\n.":
            out = b"\n." + out[1:]
        self._tail = (self._tail + chunk)[-2:]
        return out

    def end(self) -> bytes:
        """The end-of-data mark, preceded by a CRLF if the data did not end with one."""
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def received_header(meta: dict[str, Any], delivery_id: str, recipient: str, local_hostname: str, name: str) -> bytes:
    """The Received header of our hop (RFC 5321 4.4), folded over several lines.

    Its values come from the client (the EHLO name) or from the meta of a message queued by
    any version of us: each is made header-safe here, where the header is written."""
    origin = header_safe(str(meta.get("originhost") or "localhost"))
    helo = header_safe(str(meta.get("transhost") or origin))
    transtype = header_safe(str(meta.get("transtype") or "ESMTP"), 16)
    recipient = header_safe(recipient, 512)
    lines = [
        f"Received: from {helo} ({origin})",
        f" by {local_hostname} ({name}) with {transtype} id {delivery_id}",
        f" for <{recipient}>; {format_datetime(datetime.now(UTC))}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


async def wire_chunks(head: bytes, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Header block, blank line and body, dot-stuffed, ending with the end-of-data mark."""
    stuffer = DotStuffer()
    yield stuffer.feed(head + b"\r\n")
    async for chunk in body:
        yield stuffer.feed(chunk)
    yield stuffer.end()
