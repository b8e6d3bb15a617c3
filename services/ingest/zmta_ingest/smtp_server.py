"""The SMTP protocol of an ingest interface: aiosmtpd, made strict and streaming.

aiosmtpd 1.4.6 (pinned: this module uses its private ``_reader`` with that reader's
``_limit`` and ``_buffer``, ``_reset_timeout`` and ``_set_post_data_state``) holds the
whole message in memory during DATA, refuses the null reverse-path ``<>``, takes addresses without
angle brackets and never advertises PIPELINING. This subclass therefore replaces
MAIL, RCPT and DATA:

* MAIL and RCPT need angle brackets; NUL bytes and invalid addresses get 5xx; the
  null sender ``<>`` is accepted (bounces must be); recipients are capped.
* DATA streams in blocks into a :class:`~zmta_common.intake.MessageIntake`, with no
  Python step per line (:mod:`.data_stream`). Only ``<CRLF>.<CRLF>`` ends it: a dot
  after a bare LF or CR is content, and the bare line end is normalised to CRLF by the
  intake (the sender dot-stuffs it on the way out), so no smuggled end-of-data can
  reach the next hop. Lines over 1000 octets are refused after the data ends (RFC 5321
  4.5.3.1.6).

What one client may take is bounded: connections per address (refused with 421 before
the greeting, see :mod:`.client_limits`), error replies per connection (421 and closed
after ``max_errors_per_connection``), and in DATA a minimum rate (``min_data_rate``).
An EHLO/HELO name with a line break, a control character or a space is refused (501):
it would be copied into our Received header.

It also replaces AUTH: PLAIN and LOGIN, offered only where the interface has AUTH
and (unless ``auth_without_tls``) only once the connection is encrypted, checked
without blocking the loop (argon2 in a thread, or an HTTP call). MAIL from a client
outside the interface's ``relay_networks`` needs AUTH first (530) or, where the
interface has none, is refused (554).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException, syntax

from zmta_common.headers import CLIENT_VALUE_LIMIT, unsafe_character
from zmta_common.intake import MessageIntake

from .data_stream import DataBody
from .handler import aiosmtpd_names, client_ip

if TYPE_CHECKING:
    from .handler import IngestHandler

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024  # the most of DATA taken in one step
_PATH = re.compile(r"^<(?:@[^:<>]+:)?([^<>]*)>(.*)$")  # a source route (@a,@b:) is ignored


class PathError(ValueError):
    pass


def parse_path(command: str, arg: str | None) -> tuple[str, list[str]]:
    """Split the argument of MAIL (``FROM:<address> PARAM=...``) or RCPT (``TO:<address>``)."""
    keyword = "FROM:" if command == "MAIL" else "TO:"
    text = arg or ""
    if "\x00" in text:
        raise PathError("501 5.5.2 NUL byte in command")
    if text[: len(keyword)].upper() != keyword:
        raise PathError(f"501 5.5.4 Syntax: {command} {keyword}<address>")
    match = _PATH.match(text[len(keyword) :].strip())
    if match is None:
        raise PathError("501 5.5.4 Syntax: the address must be in angle brackets, as <user@domain>")
    address, params = match.group(1), match.group(2)
    if params and not params.startswith(" "):
        raise PathError("501 5.5.4 Syntax: text after the closing angle bracket")
    return address, params.split()


def helo_error(name: str) -> str | None:
    """Why an EHLO/HELO argument is refused, or None. It must be one word of printable
    characters: it is copied into the Received header we write."""
    if len(name) > CLIENT_VALUE_LIMIT:
        return f"501 5.5.4 The EHLO/HELO name is longer than {CLIENT_VALUE_LIMIT} characters"
    if unsafe_character(name) is not None or any(c.isspace() for c in name):
        return "501 5.5.4 The EHLO/HELO name holds a line break, a control character or a space"
    return None


class RateWatch:
    """In DATA: closes the connection with 421 when the client sent fewer than ``rate``
    bytes per second over the last ``window`` seconds. One timer per window, no per-read
    cost. A window in which we were writing to the store (and so not reading) is not held
    against the client."""

    def __init__(self, protocol: IngestSMTP, rate: int, window: float) -> None:
        self.protocol = protocol
        self.rate = rate
        self.window = window
        self.received = 0  # bytes of DATA so far, counted by the reader
        self._mark = 0
        self._storing = False
        self._stored_in_window = False
        self._timer = asyncio.get_running_loop().call_later(window, self._check)

    @contextlib.contextmanager
    def storing(self) -> Iterator[None]:
        """Around a write to the store: the client waits for us meanwhile."""
        self._storing = self._stored_in_window = True
        try:
            yield
        finally:
            self._storing = False

    def _check(self) -> None:
        ours = self._storing or self._stored_in_window
        if not ours and self.received - self._mark < self.rate * self.window:
            self.protocol.drop(f"421 4.4.2 DATA too slow: under {self.rate} bytes/s for {self.window:g} s")
            return
        self._mark = self.received
        self._stored_in_window = self._storing
        self._timer = asyncio.get_running_loop().call_later(self.window, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


class IngestSMTP(SMTP):
    event_handler: IngestHandler

    def __init__(self, handler: IngestHandler, *, implicit_tls: bool = False, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.implicit_tls = implicit_tls  # the listener speaks TLS from the first byte (465)
        self._counted_client: str | None = None  # the address ClientLimits counted this connection for
        self._refused = False  # refused before the greeting: aiosmtpd never saw the connection
        self._errors = 0

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd looks for (see ``aiosmtpd_names``): its per-connection
        introspection of every attribute cost a tenth of the CPU of a one-message connection."""
        return aiosmtpd_names(type(self))

    # -- what one client may take ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection (STARTTLS calls this again, with the TLS transport)
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
            refusal = self.event_handler.clients.admit(client)
            if refusal is not None:
                self._refused = True
                log.info("connection refused", extra={"client": client, "interface": self.event_handler.name})
                cast(asyncio.WriteTransport, transport).write(f"{refusal}\r\n".encode())
                transport.close()
                return
            self._counted_client = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted_client is not None:
            self.event_handler.clients.release(self._counted_client)
            self._counted_client = None
        if not self._refused:
            super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    def drop(self, reply: str) -> None:
        """Send ``reply`` (a 421) and close the connection, whatever the session is doing."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            log.info("connection dropped", extra={"client": self._counted_client, "reply": reply})
            transport.write(f"{reply}\r\n".encode())
            transport.close()

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        text = status.decode(errors="replace") if isinstance(status, bytes) else status
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self._errors += 1
            if self._errors >= self.event_handler.interface.max_errors_per_connection:
                self.drop("421 4.7.0 Too many errors on one connection, closing it")

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def auth_offered(self) -> bool:
        """AUTH is advertised and taken: the interface has it and the channel is fit for it."""
        return self.event_handler.authenticator is not None and (
            self.tls_active or self.event_handler.interface.auth_without_tls
        )

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that fails the handshake (or a scanner) is no error of ours; aiosmtpd
            # closes the connection and sends nothing.
            assert self.session is not None
            log.info(
                "tls handshake failed",
                extra={
                    "client": client_ip(self.session),
                    "interface": self.event_handler.name,
                    "error": repr(error.__cause__),
                },
            )
            return "454 4.7.0 TLS not available"
        status: str = await super().handle_exception(error)
        return status

    @syntax("AUTH mechanism [initial-response]")
    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        assert self.envelope is not None
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: AUTH needs EHLO")
            return
        if self.event_handler.authenticator is None:
            await self.push("502 5.5.1 AUTH is not available on this port")
            return
        if not self.auth_offered:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.session.authenticated:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: AUTH is not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            credentials = await self._auth_plain(args[1] if len(args) > 1 else None)
        elif mechanism == "LOGIN":
            credentials = await self._auth_login(args[1] if len(args) > 1 else None)
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if credentials is None:
            return  # the reason has been sent
        await self.push(await self.event_handler.authenticate(self.session, mechanism, *credentials))

    async def _response(self, initial: str | None, challenge: str) -> bytes | None:
        """The client's base64 answer, decoded: ``initial`` (``=`` is empty) or the answer to
        a 334 ``challenge``. None if it cancelled (``*``) or sent bad base64 (already answered)."""
        if initial is None:
            answer = await self.challenge_auth(challenge)
            return None if answer is MISSING else bytes(answer)
        if initial == "=":
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Cannot decode the base64 response")
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[bytes, bytes] | None:
        response = await self._response(initial, "")
        if response is None:
            return None
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 AUTH PLAIN needs authzid NUL authcid NUL password")
            return None
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for another user (RFC 4616 authorization identity) is not supported.
            return login, b""
        return login, password

    async def _auth_login(self, initial: str | None) -> tuple[bytes, bytes] | None:
        login = await self._response(initial, "Username:")
        if login is None:
            return None
        password = await self._response(None, "Password:")
        if password is None:
            return None
        return login, password

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and "\x00" in hostname:
            await self.push("501 5.5.2 NUL byte in command")
            return
        if hostname and (reply := helo_error(hostname)):
            await self.push(reply)
            return
        await super().smtp_EHLO(hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and "\x00" in hostname:
            await self.push("501 5.5.2 NUL byte in command")
            return
        if hostname and (reply := helo_error(hostname)):
            await self.push(reply)
            return
        await super().smtp_HELO(hostname)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.envelope is not None
        assert self.session is not None
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        refusal = self.event_handler.check_relay(self.session)
        if refusal is not None:
            await self.push(refusal)
            return
        try:
            address, params = parse_path("MAIL", arg)
        except PathError as exc:
            await self.push(str(exc))
            return
        reply = self._mail_params(params)
        if reply is None:
            reply = self.event_handler.check_sender(address)
        if reply is None and not address.isascii() and not self.envelope.smtp_utf8:
            reply = f"553 5.6.7 <{address}> needs SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)"
        if reply is None:
            reply = await self.event_handler.plugins_allow("smtp:mail_from", self.envelope, address)
        if reply is not None:
            self.envelope.smtp_utf8 = False
            await self.push(reply)
            return
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(params)
        await self.push("250 2.1.0 Accepted")

    def _mail_params(self, params: list[str]) -> str | None:
        assert self.envelope is not None
        assert self.session is not None
        if params and not self.session.extended_smtp:
            return "501 5.5.4 Syntax: MAIL parameters need EHLO"
        for param in params:
            key, _, value = param.upper().partition("=")
            if key == "BODY" and value in ("7BIT", "8BITMIME"):
                continue
            if key == "SMTPUTF8" and not value:
                self.envelope.smtp_utf8 = True
                continue
            if key == "SIZE" and value.isdigit():
                if self.data_size_limit and int(value) > self.data_size_limit:
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
                continue
            return f"555 5.5.4 MAIL parameter {param} not recognised"
        return None

    @syntax("RCPT TO: <address>")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        try:
            address, params = parse_path("RCPT", arg)
        except PathError as exc:
            await self.push(str(exc))
            return
        if params:
            await self.push(f"555 5.5.4 RCPT parameter {params[0]} not recognised")
            return
        reply = self.event_handler.check_recipient(self.envelope.rcpt_tos, address)
        if reply is None and not address.isascii() and not self.envelope.smtp_utf8:
            reply = f"553 5.6.7 <{address}> needs SMTPUTF8, which this transaction did not ask for"
        if reply is None:
            reply = await self.event_handler.plugins_allow("smtp:rcpt_to", self.envelope, address)
        if reply is not None:
            await self.push(reply)
            return
        self.envelope.rcpt_tos.append(address)
        await self.push("250 2.1.5 Accepted")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        assert self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        intake = self.event_handler.open_intake(self.session, self.envelope, self.data_size_limit, self.tls_active)
        iface = self.event_handler.interface
        watch = RateWatch(self, iface.min_data_rate, iface.data_rate_window) if iface.min_data_rate else None
        try:
            reply = await self._receive(intake, watch)
        except BaseException:
            # The client went away (or we are stopping, or it was too slow) before the end of DATA.
            await intake.abort()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)

    async def _receive(self, intake: MessageIntake, watch: RateWatch | None) -> str:
        """Read DATA up to its end, feeding the intake; return the reply to send.

        The stream is taken in blocks of up to :data:`BLOCK_SIZE` as they arrive
        (:class:`DataBody` finds the end mark and unstuffs dots). What a pipelining client
        sent after the end mark goes back into the reader for the command loop. The
        reader's limit, which also sets its flow control, is raised for the duration.
        """
        reader = self._reader
        body = DataBody()
        failure: BaseException | None = None
        line_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = BLOCK_SIZE  # type: ignore[attr-defined]
        try:
            while True:
                data = await reader.read(BLOCK_SIZE)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)  # the client went away in DATA
                self._reset_timeout()  # the socket timeout is for idleness, not for big mail
                if watch is not None:
                    watch.received += len(data)
                content, rest = body.feed(data)
                if failure is None and content:
                    failure = await self._feed(intake, content, watch)
                if rest is not None:
                    reader._buffer[:0] = rest  # type: ignore[attr-defined]
                    break
        finally:
            reader._limit = line_limit  # type: ignore[attr-defined]
        if failure is not None:
            await intake.abort()
            return self.event_handler.store_failure(intake, failure)
        return await self.event_handler.finish(intake)

    async def _feed(self, intake: MessageIntake, content: bytes, watch: RateWatch | None) -> BaseException | None:
        """Hand a block to the intake; return the store's exception if writing failed."""
        intake.feed(content)
        if not intake.needs_flush:
            return None
        try:
            with watch.storing() if watch is not None else contextlib.nullcontext():
                await intake.flush()
        except Exception as exc:  # the store failed: drain DATA, then answer 451
            return exc
        return None
