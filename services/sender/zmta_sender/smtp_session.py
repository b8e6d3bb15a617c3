"""A lean SMTP client session on asyncio streams, with PIPELINING (RFC 2920).

We write this rather than use aiosmtplib because aiosmtplib cannot pipeline (its protocol
drops a reply that arrives while another parsed reply waits to be picked up), so MAIL, RCPT
and DATA cost a round trip each before the body, and its per-command machinery costs
noticeable CPU per message. Here MAIL, RCPT and DATA go out in one write when the server
offers PIPELINING, and their replies are read in order; otherwise one command per round trip.

Errors carry the ``stage`` (the command whose reply failed): :class:`SmtpRefused` when the
server answered with something else than success, :class:`SmtpBroken` when there is no
usable reply (connection failed or closed, timeout, malformed or over-long reply); a broken
session is closed at once. A command holding CR or LF is a bug upstream: ``ValueError``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

MAX_LINE = 8192  # octets in one reply line (RFC 5321 says 512; real servers exceed it)
MAX_REPLY = 32768  # octets in one whole reply, continuation lines included (EHLO is the longest)
BODY_WRITE = 64 * 1024  # octets of the body gathered for one write
_KEYWORD = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)[ =]?(.*)")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the texts of its lines, joined by newlines

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpError(Exception):
    """``stage``: connect, ehlo, starttls, mail, rcpt, data, rset or quit."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class SmtpRefused(SmtpError):
    """The server answered ``stage`` with a failure (or a reply that does not fit)."""

    def __init__(self, reply: Reply, stage: str) -> None:
        super().__init__(str(reply), stage)
        self.code = reply.code
        self.text = reply.text


class SmtpBroken(SmtpError):
    """No usable reply to ``stage``: the connection failed, closed or timed out, or the reply was malformed."""


class _Protocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, counting the octets received: a parked session compares the
    count with what it read as replies to tell whether the server said something unasked
    (a 421 before hanging up), which the StreamReader does not expose."""

    received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)


class SmtpSession:
    """One client session; :meth:`connect` opens it and reads the greeting."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: _Protocol, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._consumed = 0  # octets read as replies
        self.timeout = timeout  # seconds for each reply, and for each body chunk to drain
        self.greeting = Reply(0, "")
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> its parameters
        self.dane = ""  # how DANE authenticated the server after STARTTLS (see tls.TlsOutcome), if it did

    @classmethod
    async def connect(
        cls, host: str, port: int, *, source_ip: str | None, connect_timeout: float, command_timeout: float
    ) -> SmtpSession:
        """A greeted session; SmtpRefused (stage connect) when the greeting is not 2xx."""
        loop = asyncio.get_running_loop()
        # As asyncio.open_connection does, but with our counting protocol; the reader's limit
        # bounds a reply line (readuntil fails past it instead of buffering on).
        reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
        protocol = _Protocol(reader, loop=loop)
        local = (source_ip, 0) if source_ip else None
        try:
            async with asyncio.timeout(connect_timeout):
                transport, _ = await loop.create_connection(lambda: protocol, host, port, local_addr=local)
        except TimeoutError:
            raise SmtpBroken(f"no connection in {connect_timeout:g}s", "connect") from None
        except OSError as exc:
            raise SmtpBroken(str(exc), "connect") from None
        session = cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop), protocol, command_timeout)
        try:
            session.greeting = _check(await session._reply("connect", connect_timeout), "connect")
        except BaseException:
            session.close()
            raise
        return session

    @property
    def usable(self) -> bool:
        """Open, and in step: everything the server sent was read as a reply."""
        return not self._writer.is_closing() and not self._reader.at_eof() and self._protocol.received == self._consumed

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS state after STARTTLS; None in plain text."""
        found = None if self._writer.is_closing() else self._writer.get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject) else None

    @property
    def local_ip(self) -> str:
        """The address the connection comes from ("" if unknown)."""
        sockname = self._writer.get_extra_info("sockname")
        return str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def ehlo(self, name: str) -> Reply:
        reply = await self._command(f"EHLO {name}", "ehlo")
        self.extensions = _extensions(reply.text)
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """STARTTLS and the handshake (SNI ``server_hostname``); ssl and OS errors of the
        handshake are raised as they are. EHLO again afterwards (RFC 3207 §4.2)."""
        await self._command("STARTTLS", "starttls")
        self.extensions = {}  # what the server offers is learnt again over TLS
        await self._writer.start_tls(context, server_hostname=server_hostname, ssl_handshake_timeout=self.timeout)

    async def send(
        self,
        mail_from: str,
        recipient: str,
        body: AsyncIterable[bytes],
        options: Sequence[str] = (),
        size: int | None = None,
    ) -> Reply:
        """One transaction; the final reply, or SmtpRefused / SmtpBroken at mail, rcpt or data.

        ``body``: the message as it goes on the wire, dot-stuffed, the end mark included. The
        addresses go as UTF-8 (the caller declared SMTPUTF8 when they need it). ``size`` is
        declared (SIZE=, RFC 1870) when the server takes it."""
        params = [*options, f"SIZE={size}"] if size is not None and "SIZE" in self.extensions else list(options)
        envelope = [
            (_line(" ".join([f"MAIL FROM:<{mail_from}>", *params])), "mail", 2),
            (_line(f"RCPT TO:<{recipient}>"), "rcpt", 2),
            (b"DATA\r\n", "data", 3),
        ]
        if "PIPELINING" in self.extensions:
            await self._pipelined(envelope)
        else:
            for command, stage, digit in envelope:
                self._write(command, stage)
                _check(await self._reply(stage), stage, digit)
        await self._body(body)
        return _check(await self._reply("data"), "data")

    async def rset(self) -> None:
        """Abandon the transaction in progress (after a refusal) so that the session can take another."""
        await self._command("RSET", "rset")

    async def quit(self, timeout: float = 5.0) -> None:
        """QUIT politely and close; just close when the server is gone or slow."""
        try:
            if self.usable:
                self._write(b"QUIT\r\n", "quit")
                await self._reply("quit", timeout)
        except SmtpError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()

    async def _pipelined(self, envelope: list[tuple[bytes, str, int]]) -> None:
        """MAIL, RCPT and DATA in one write, then their replies in order (RFC 2920 §3.1). The first
        refusal is raised after every reply is read, so that the session stays in step (the reply
        to DATA, usually a 503 or 554, is read and dropped); the body is not sent then."""
        self._write(b"".join(command for command, _, _ in envelope), "mail")
        refusal: SmtpRefused | None = None
        for _, stage, digit in envelope:
            try:
                reply = await self._reply(stage)
            except SmtpBroken:
                if refusal is None:
                    raise
                break  # hung up after refusing: the refusal is the answer
            if refusal is None and reply.code // 100 != digit:
                refusal = SmtpRefused(reply, stage)
            elif refusal is not None and reply.code // 100 == 3:
                # A broken server takes DATA for an envelope it refused. Without a body the session
                # cannot get back in step, and a lone dot might deliver something: hang up.
                self.close()
        if refusal is not None:
            raise refusal

    async def _body(self, chunks: AsyncIterable[bytes]) -> None:
        """The body in writes of at least :data:`BODY_WRITE` octets (small pieces, such as the
        header block and the end mark, go with their neighbours: one system call for most
        messages), each drained before more is taken from the store (back-pressure)."""
        pending: list[bytes] = []
        size = 0
        async for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= BODY_WRITE:
                await self._write_body(pending)
                pending, size = [], 0
        if pending:
            await self._write_body(pending)

    async def _write_body(self, pieces: list[bytes]) -> None:
        self._write(pieces[0] if len(pieces) == 1 else b"".join(pieces), "data")
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        except TimeoutError:
            self._broken(f"the server took nothing for {self.timeout:g}s", "data")
        except OSError as exc:
            self._broken(f"connection lost: {exc}", "data")

    async def _command(self, command: str, stage: str) -> Reply:
        self._write(_line(command), stage)
        return _check(await self._reply(stage), stage)

    def _write(self, data: bytes, stage: str) -> None:
        if self._writer.is_closing():
            raise SmtpBroken("connection closed", stage)
        self._writer.write(data)

    async def _reply(self, stage: str, timeout: float | None = None) -> Reply:
        """The next reply, within ``timeout`` (default: the command timeout)."""
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._read_reply(stage)
        except TimeoutError:
            self._broken(f"no reply in {timeout:g}s", stage)
        except asyncio.IncompleteReadError:
            self._broken("connection closed by the server", stage)
        except asyncio.LimitOverrunError:
            self._broken(f"reply line longer than {MAX_LINE} octets", stage)
        except OSError as exc:
            self._broken(f"connection lost: {exc}", stage)

    async def _read_reply(self, stage: str) -> Reply:
        texts: list[bytes] = []
        size = 0
        while True:
            line = await self._reader.readuntil(b"\n")
            size += len(line)
            if size > MAX_REPLY:
                self._broken(f"reply longer than {MAX_REPLY} octets", stage)
            code, separator = line[:3], line[3:4]
            if not code.isdigit() or separator not in (b" ", b"-", b"\r", b"\n"):
                self._broken(f"malformed reply line {line[:100]!r}", stage)
            texts.append(line[4:].strip())
            if separator != b"-":
                self._consumed += size
                return Reply(int(code), b"\n".join(texts).decode("utf-8", "surrogateescape"))

    def _broken(self, message: str, stage: str) -> NoReturn:
        """Close (out of step, the session is of no more use) and raise SmtpBroken."""
        self.close()
        raise SmtpBroken(message, stage)


def _line(command: str) -> bytes:
    """A command on the wire. The addresses were validated upstream: a CR or LF here is a bug,
    and sending it would let the rest of the line pass for another command."""
    data = command.encode("utf-8")
    if b"\r" in data or b"\n" in data:
        raise ValueError(f"CR or LF in an SMTP command: {command!r}")
    return data + b"\r\n"


def _check(reply: Reply, stage: str, digit: int = 2) -> Reply:
    """The reply if its first digit is ``digit`` (2: success; 3: DATA's go-ahead), else SmtpRefused."""
    if reply.code // 100 != digit:
        raise SmtpRefused(reply, stage)
    return reply


def _extensions(text: str) -> dict[str, str]:
    """EHLO keywords (upper-cased) with their parameters; the first line is the server's name.
    An old-style ``AUTH=LOGIN`` counts as ``AUTH LOGIN``."""
    found: dict[str, str] = {}
    for line in text.split("\n")[1:]:
        match = _KEYWORD.match(line.strip())
        if match:
            found[match[1].upper()] = match[2].strip()
    return found
