"""Streaming intake of one message, shared by the SMTP ingest and the HTTP api.

The caller feeds the message as it arrives, in pieces of any size. The intake
normalises line ends to CRLF, splits off the top-level header block, hashes the
body for DKIM and writes it to the store in chunks, so memory use does not grow
with the message. :meth:`MessageIntake.finish` then runs the plugins and the rules of
:mod:`zmta_common.cleanup` (routing each recipient to a zone; Message-ID and Date when
missing; X-Sending-Zone and Bcc removed; delayed delivery; the meta) and commits
message, chunks and delivery rows in one transaction. Nothing is acknowledged before
that commit, and any failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .addresses import address_error
from .cleanup import BodyFacts, clean, route_recipients
from .config import Config
from .dkim_hash import BodyHasher
from .domains import domain_of
from .headers import HeaderBlock, is_continuation, is_field_start
from .hooks import Hooks, Reject
from .ids import new_queue_id, seq_for
from .routing import UnknownZoneError
from .store import IntakeTransaction, NewDelivery, NewMessage, Store

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
MAX_HEADER_SIZE = 1024 * 1024


def too_many_recipients(limit: int) -> str:
    """The one reply for a message over its recipient cap (SMTP's RCPT and the API's headers)."""
    return f"452 4.5.3 Too many recipients (at most {limit})"


class IntakeError(Exception):
    """The message cannot be queued. ``reply`` is a full SMTP reply; ``http_status`` fits the API."""

    def __init__(self, reply: str, http_status: int) -> None:
        super().__init__(reply)
        self.reply = reply
        self.http_status = http_status


class StoredBody:
    """The body of a message being queued, for ``message:store`` plugins: streamed back
    from the store (inside the intake's transaction), never held whole."""

    def __init__(self, tx: IntakeTransaction, last_chunk: bytes | None, size: int, queue_id: str = "") -> None:
        self._tx = tx
        self._last = last_chunk
        self.size = size
        self.queue_id = queue_id  # the id the message is being queued under

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._tx.written_chunks():
            yield chunk
        if self._last:
            yield self._last


@dataclass(slots=True)
class Envelope:
    """Who sent the message, to whom, and how it reached us."""

    mail_from: str
    recipients: list[str]
    interface: str
    transtype: str
    origin: str = ""
    originhost: str = ""
    transhost: str = ""
    user: str | None = None
    allow_routing_headers: bool = False
    # /send-raw: the sender and the recipients come from the From/Sender and To/Cc/Bcc headers.
    from_headers: bool = False
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class QueuedMessage:
    id: str
    zones: dict[str, int]  # zone -> number of deliveries
    message_id: str
    size: int
    suppressed: list[str] = field(default_factory=list)  # recipients dropped by the suppression list

    @property
    def dropped(self) -> bool:
        """Every recipient was suppressed: nothing was stored (the client still got its 250)."""
        return not self.zones


_NOT_LINE_END = bytes(octet for octet in range(256) if octet not in b"\r\n")


class LineEndNormaliser:
    """Turns bare CR and bare LF into CRLF across pieces of any size.

    A bare line end is never passed on: next to a dot it could end the DATA of the
    next hop early (SMTP smuggling). A CR at the very end of a piece is held back
    until the next piece shows whether an LF follows it.
    """

    def __init__(self) -> None:
        self._cr_pending = False

    def feed(self, data: bytes) -> bytes:
        if self._cr_pending:
            data = b"\r" + data
            self._cr_pending = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr_pending = True
        # The common case, every line end already CRLF: then the CRs and LFs are exactly the
        # CRLF pairs. (translate() keeps just those octets, in one pass in C.)
        if len(data.translate(None, _NOT_LINE_END)) == 2 * data.count(b"\r\n"):
            return data
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def close(self) -> bytes:
        if self._cr_pending:
            self._cr_pending = False
            return b"\r\n"
        return b""


MAX_LINE = 1000  # octets in a line, its CRLF included (RFC 5321 4.5.3.1.6)
LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)"


class LineLimit:
    """Whether a line of the message is longer than :data:`MAX_LINE` octets, over pieces of
    any size (of CRLF-normalised text). The rule for every intake, SMTP and HTTP alike.

    Lines are found by looking back from ``MAX_LINE`` octets ahead of a line start for the
    last LF (``rfind`` in C): none means that line is too long, else the next line starts
    after it. About one step per ``MAX_LINE`` octets, never one per line.
    """

    def __init__(self) -> None:
        self._line = 0  # octets of the line in progress, before its LF
        self.exceeded = False

    def feed(self, data: bytes) -> None:
        if self.exceeded:
            return
        first = data.find(b"\n")
        if first < 0:
            self._line += len(data)
            self.exceeded = self._line >= MAX_LINE
            return
        # A line of n octets before its LF is n + 1 octets long.
        if self._line + first >= MAX_LINE:
            self.exceeded = True
            return
        start, size = first + 1, len(data)
        while size - start >= MAX_LINE:
            last = data.rfind(b"\n", start, start + MAX_LINE)
            if last < 0:
                self.exceeded = True
                return
            start = last + 1
        last = data.rfind(b"\n", start)
        self._line = size - (last + 1 if last >= 0 else start)


class MessageIntake:
    """One message on its way into the store. Use :meth:`feed`, then :meth:`finish` or :meth:`abort`."""

    def __init__(
        self,
        store: Store,
        config: Config,
        envelope: Envelope,
        max_size: int,
        hooks: Hooks | None = None,
        max_recipients: int | None = None,
    ) -> None:
        self.id = new_queue_id()
        # Checked where the recipients come from the headers (SMTP caps them at RCPT).
        self.max_recipients = max_recipients
        self.config = config
        self.hooks = hooks or Hooks()
        self.envelope = envelope
        self.max_size = max_size
        self.size = 0
        self.too_big = False
        self._failure: IntakeError | None = None  # kept until finish(), so the caller can drain DATA
        self._tx = store.begin_intake(self.id)
        self._normaliser = LineEndNormaliser()
        self._lines = LineLimit()
        self._hasher = BodyHasher(config.dkim.body_canonicalization, "sha256")
        self._head = bytearray()
        self._head_scanned = 0  # bytes of _head already checked for the end of the header block
        self._in_head = True
        self._body = bytearray()
        self._body_size = 0
        self._body_ends_crlf = True
        self._writing: asyncio.Future[None] | None = None  # the chunk write in flight

    # -- streaming -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take the next piece of the message. Call :meth:`flush` when :attr:`needs_flush`."""
        self.size += len(data)
        if self.size > self.max_size:
            self.too_big = True
        if self.too_big or self._failure is not None:
            return
        data = self._normaliser.feed(data)
        self._lines.feed(data)
        if self._lines.exceeded:
            self._failure = IntakeError(LINE_TOO_LONG, 400)
            return
        if self._in_head:
            self._feed_head(data)
        elif data:
            self._add_body(data)

    @property
    def needs_flush(self) -> bool:
        """A chunk is full, or a write is in flight (see :meth:`flush`)."""
        return len(self._body) >= CHUNK_SIZE or self._writing is not None

    async def flush(self) -> None:
        """Start writing the full chunks taken so far; give a write in flight a turn.

        One write is kept in flight while the caller goes on reading: the store's work and
        ours overlap, which is what makes a big message move at the speed of the slower of
        the two rather than of their sum. Each write first waits for the one before, so
        the chunks are written in order and at most two are held in memory. A failed
        write is raised here or by :meth:`finish`.

        A caller whose next data is already buffered never gives the event loop a turn
        by itself, and a write makes progress (the rest of the chunk sent, the reply
        read) only in such turns; so while a write is in flight every call yields once.
        """
        while len(self._body) >= CHUNK_SIZE:
            with memoryview(self._body) as view:
                chunk = bytes(view[:CHUNK_SIZE])
            del self._body[:CHUNK_SIZE]
            await self._settle_write()
            self._writing = asyncio.ensure_future(self._tx.write_chunk(chunk))
        await asyncio.sleep(0)
        if self._writing is not None and self._writing.done():
            await self._settle_write()

    async def _settle_write(self) -> None:
        """Wait for the write in flight, if any; raise its failure."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def _drop_write(self) -> None:
        """Let the write in flight end, whatever its outcome, before the message is removed."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await asyncio.wait([writing])
            if not writing.cancelled():
                writing.exception()  # retrieved: the message is being dropped anyway

    def _add_body(self, data: bytes) -> None:
        """Append to the body, hashing it now: a piece is hashed while it is still in the
        CPU's cache from the passes before (a fraction of the cost of a 256 KiB chunk)."""
        self._hasher.update(data)
        self._body_size += len(data)
        # Line ends are whole in every piece (the normaliser holds back a CR at its end).
        self._body_ends_crlf = data.endswith(b"\r\n")
        self._body += data

    def _feed_head(self, data: bytes) -> None:
        self._head += data
        while True:
            end = self._head.find(b"\r\n", self._head_scanned)
            if end < 0:
                break
            line = bytes(self._head[self._head_scanned : end + 2])
            if line == b"\r\n":
                self._end_head(self._head_scanned, self._head_scanned + 2)
                return
            if not (is_field_start(line) or (self._head_scanned and is_continuation(line))):
                # Not a header line: the block ends here and this line starts the body.
                self._end_head(self._head_scanned, self._head_scanned)
                return
            self._head_scanned = end + 2
        if len(self._head) > MAX_HEADER_SIZE:
            self._failure = IntakeError("552 5.3.4 Message header is too large", 413)

    def _end_head(self, head_end: int, body_start: int) -> None:
        self._in_head = False
        if body_start < len(self._head):
            self._add_body(bytes(self._head[body_start:]))
        del self._head[head_end:]

    # -- completion ----------------------------------------------------------

    async def finish(self) -> QueuedMessage:
        """Commit the message. Raises IntakeError (nothing stored) when it cannot be queued."""
        try:
            await self._settle_write()
            return await self._finish()
        except BaseException:
            await self._drop_write()
            await self._tx.rollback()
            raise

    async def abort(self) -> None:
        await self._drop_write()
        await self._tx.rollback()

    async def _finish(self) -> QueuedMessage:
        if self._failure is not None:
            raise self._failure
        if self.too_big:
            raise IntakeError(f"552 5.3.4 Message exceeds fixed maximum message size of {self.max_size} bytes", 413)
        tail = self._normaliser.close()
        if self._in_head:
            self._head += tail
            if self._head and not self._head.endswith(b"\r\n"):
                self._head += b"\r\n"
            self._in_head = False
        elif tail:
            self._add_body(tail)
        if self._body_size and not self._body_ends_crlf:
            self._add_body(b"\r\n")  # SMTP can only carry a body whose last line is ended
        last_chunk = bytes(self._body) if self._body else None
        self._body.clear()

        headers = HeaderBlock.parse(bytes(self._head))
        env = self.envelope
        if env.from_headers:
            # In a thread: a header block of up to 1 MiB of addresses takes a while to parse.
            await asyncio.to_thread(_envelope_from_headers, env, headers, self.max_recipients)
        await self._run_hook("message:headers", env, headers)
        try:
            zones = route_recipients(self.config, headers, env)
        except UnknownZoneError as exc:
            raise IntakeError(f"550 5.7.1 {exc}", 400) from None
        zones = await self._plugin_routes(zones)
        await self._run_hook("message:store", env, headers, StoredBody(self._tx, last_chunk, self._body_size, self.id))
        cleaned = clean(self.config, headers, env, self.id, self._body_facts())
        deliveries = [
            NewDelivery(seq=seq_for(i), zone=zone, recipient=rcpt, domain=domain_of(rcpt))
            for i, (rcpt, zone) in enumerate(zip(env.recipients, zones, strict=True))
        ]
        kept = await self._tx.commit(
            NewMessage(
                id=self.id,
                mail_from=env.mail_from,
                headers=headers.to_bytes(),
                body_size=self._body_size,
                meta=cleaned.meta,
                deliveries=deliveries,
                not_before=cleaned.not_before,
            ),
            last_chunk,
        )
        counts: dict[str, int] = {}
        for delivery in deliveries:
            if delivery.seq in kept:
                counts[delivery.zone] = counts.get(delivery.zone, 0) + 1
        # Suppressed recipients got no row: their mail is dropped silently, as the original does.
        suppressed = sorted(d.recipient for d in deliveries if d.seq not in kept)
        return QueuedMessage(
            id=self.id, zones=counts, message_id=cleaned.message_id, size=self.size, suppressed=suppressed
        )

    def _body_facts(self) -> BodyFacts:
        return BodyFacts(
            size=self._body_size,
            hash_algo=self._hasher.algorithm,
            body_hash=self._hasher.b64digest(),
            canonicalization=self._hasher.canonicalization,
        )

    async def _run_hook(self, name: str, *args: object) -> None:
        try:
            await self.hooks.run(name, *args)
        except Reject as exc:
            raise IntakeError(exc.reply, 503 if exc.temporary else 400) from None

    async def _plugin_routes(self, zones: list[str]) -> list[str]:
        """Zones after the ``queue:route`` plugins had their say (a zone per recipient)."""
        if not self.hooks.has("queue:route"):
            return zones
        routes = dict(zip(self.envelope.recipients, zones, strict=True))
        await self._run_hook("queue:route", self.envelope, routes)
        for rcpt, zone in routes.items():
            if zone not in self.config.zones:
                log.error("plugin routed to an unknown zone", extra={"recipient": rcpt, "zone": zone})
                raise IntakeError(f"451 4.3.0 Recipient <{rcpt}> routed to unknown zone {zone!r}", 503)
        return [routes[rcpt] for rcpt in self.envelope.recipients]


def _envelope_from_headers(env: Envelope, headers: HeaderBlock, max_recipients: int | None) -> None:
    senders = headers.addresses("sender") or headers.addresses("from")
    env.mail_from = senders[0] if senders else ""
    seen: set[str] = set()
    env.recipients = []
    for key in ("to", "cc", "bcc"):
        for address in headers.addresses(key):
            if address.lower() not in seen:
                seen.add(address.lower())
                env.recipients.append(address)
    if not env.recipients:
        raise IntakeError("554 5.5.1 No recipients in the To, Cc or Bcc headers", 400)
    if max_recipients is not None and len(env.recipients) > max_recipients:
        raise IntakeError(too_many_recipients(max_recipients), 400)
    for address in [env.mail_from, *env.recipients]:
        if address and (reason := address_error(address)):
            raise IntakeError(f"553 5.1.3 <{address}> is not a valid address: {reason}", 400)
