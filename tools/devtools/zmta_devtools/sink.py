"""A catch-all SMTP server that keeps what it receives (aiosmtpd).

``make run`` starts one that writes each message into a folder as an ``.eml``
file, with ``Return-Path`` and ``Delivered-To`` on top as a local delivery would
add them. Tests use :class:`Sink` in-process to record every message with the
peer address it came from, and to script the replies some recipients get;
:meth:`Sink.use_tls` makes a sink offer STARTTLS. With a :class:`Provider` a sink pushes back
as a big provider's inbound servers do (traffic shaping's tests and ``make bench-shaping``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(slots=True)
class Received:
    peer: tuple[str, int]
    helo: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    time: float
    tls: str = ""  # the TLS version of the session, "" for plain text


@dataclass
class Provider:
    """A provider's limits: more than ``connections`` open at once are refused at the greeting
    (421), and recipients beyond ``messages`` per ``window`` seconds get a 450 at RCPT TO.
    Both are sliding: a sender that slows down is served again."""

    connections: int
    messages: int
    window: float
    accepted: deque[float] = field(default_factory=deque)  # when each recipient in the window was taken
    deferred: int = 0  # temporary failures given: refused connections and recipients
    refused_connections: int = 0

    def take(self, now: float) -> bool:
        """Count a recipient if the window has room for it."""
        while self.accepted and self.accepted[0] <= now - self.window:
            self.accepted.popleft()
        if len(self.accepted) >= self.messages:
            self.deferred += 1
            return False
        self.accepted.append(now)
        return True


@dataclass
class SinkHandler:
    folder: Path | None = None
    messages: list[Received] = field(default_factory=list)
    # Per recipient: a list of replies to give at DATA, used up one by one (then 250).
    scripted: dict[str, list[str]] = field(default_factory=dict)
    # Per recipient: replies to give at RCPT TO, used up one by one (then 250).
    scripted_rcpt: dict[str, list[str]] = field(default_factory=dict)
    # Whether SMTPUTF8 is advertised to new connections.
    smtputf8: bool = True
    # Replies to greet new connections with instead of 220 (and hang up), used up one by one.
    greetings: list[str] = field(default_factory=list)
    # Connections refused at the greeting so far.
    refused: int = 0
    data_delay: float = 0.0
    # STARTTLS is offered with this context when it is set.
    tls_context: ssl.SSLContext | None = None
    open_now: int = 0  # connections open at this moment
    open_max: int = 0  # the most that were ever open at once
    provider: Provider | None = None  # push back as a provider does
    _counter: Any = field(default_factory=itertools.count)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        replies = self.scripted_rcpt.get(address.lower())
        if replies:
            return replies.pop(0)
        if self.provider is not None and not self.provider.take(time.monotonic()):
            return "450 4.7.1 Too many messages from your IP, please slow down"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
            if server.transport is None or server.transport.is_closing():
                return "421 4.4.2 Client went away"  # not kept: the client never saw a 250
        for rcpt in envelope.rcpt_tos:
            replies = self.scripted.get(rcpt.lower())
            if replies:
                return replies.pop(0)
        content = envelope.original_content or b""
        item = Received(
            peer=tuple(session.peer[:2]) if isinstance(session.peer, tuple) else ("", 0),
            helo=session.host_name or "",
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=content,
            time=time.time(),
            tls=_tls_version(session),
        )
        self.messages.append(item)
        if self.folder is not None:
            self._write(item)
        return "250 2.0.0 Ok: kept"

    def _write(self, item: Received) -> None:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        head = f"Return-Path: <{item.mail_from}>\r\n" + "".join(f"Delivered-To: {r}\r\n" for r in item.rcpt_tos)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):05d}.eml"
        (self.folder / name).write_bytes(head.encode() + item.data)


def _tls_version(session: Session) -> str:
    ssl_object = (session.ssl or {}).get("ssl_object")
    return str(ssl_object.version()) if ssl_object is not None else ""


class CountingSMTP(SMTP):
    """aiosmtpd's server, counting the connections open at once in its handler."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler: SinkHandler = self.event_handler
        if self._original_transport is None:  # not the same connection again after STARTTLS
            handler.open_now += 1
            handler.open_max = max(handler.open_max, handler.open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        handler: SinkHandler = self.event_handler
        handler.open_now -= 1
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        # aiosmtpd has no hook for the greeting, so a scripted refusal replaces the
        # whole session: say the scripted reply instead of 220 and hang up.
        handler: SinkHandler = self.event_handler
        provider = handler.provider
        if provider is not None and handler.open_now > provider.connections:
            provider.refused_connections += 1
            provider.deferred += 1
            handler.greetings.insert(0, "421 4.7.0 Too many concurrent SMTP connections from your IP, try again later")
        if handler.greetings:
            handler.refused += 1
            await self.push(handler.greetings.pop(0))
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()


class CountingController(Controller):
    def factory(self) -> SMTP:
        overrides = {"tls_context": self.handler.tls_context, "enable_SMTPUTF8": self.handler.smtputf8}
        return CountingSMTP(self.handler, **{**self.SMTP_kwargs, **overrides})


class Sink:
    """An SMTP sink on ``host:port``, served from its own thread (aiosmtpd's Controller)."""

    def __init__(self, host: str, port: int, folder: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.handler = SinkHandler(folder=folder)
        self.controller = CountingController(
            self.handler,
            hostname=host,
            port=port,
            server_hostname=f"sink.{host}",
            enable_SMTPUTF8=True,
            data_size_limit=None,
        )

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def reset(self) -> None:
        """Forget what was received and scripted, and serve as a fresh sink would (plain text,
        SMTPUTF8 offered, no delay); the connections open now stay counted."""
        handler = self.handler
        handler.messages.clear()
        handler.scripted.clear()
        handler.scripted_rcpt.clear()
        handler.greetings.clear()
        handler.refused = 0
        handler.data_delay = 0.0
        handler.open_max = handler.open_now
        handler.provider = None
        self.use_tls(None)
        self.use_smtputf8(True)

    def use_smtputf8(self, enabled: bool) -> None:
        """Advertise SMTPUTF8 on new connections from now on, or not."""
        self.handler.smtputf8 = enabled

    def use_tls(self, context: ssl.SSLContext | None) -> None:
        """Offer STARTTLS with ``context`` on new connections from now on (None: stop offering it)."""
        self.handler.tls_context = context

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


cli = typer.Typer(add_completion=False)


@cli.command()
def main(
    folder: Annotated[Path, typer.Option(help="where received messages are written")] = Path(".run/mail"),
    host: str = "127.0.0.1",
    port: int = 2526,
) -> None:
    """Accept every message and keep it in FOLDER."""

    sink = Sink(host, port, folder)
    sink.start()
    print(f"sink: listening on {host}:{port}, writing to {folder}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    sink.stop()


if __name__ == "__main__":
    cli()
