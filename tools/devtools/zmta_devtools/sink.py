"""A catch-all SMTP server that keeps what it receives (aiosmtpd).

``make run`` starts one that writes each message into a folder as an ``.eml``
file, with ``Return-Path`` and ``Delivered-To`` on top as a local delivery would
add them. Tests use :class:`Sink` in-process to record every message with the
peer address it came from and how many connections were open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(slots=True)
class Received:
    peer: tuple[str, int]
    helo: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    time: float


@dataclass
class SinkHandler:
    folder: Path | None = None
    messages: list[Received] = field(default_factory=list)
    # Per recipient: a list of replies to give at DATA, used up one by one (then 250).
    scripted: dict[str, list[str]] = field(default_factory=dict)
    data_delay: float = 0.0
    _counter: Any = field(default_factory=itertools.count)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
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


class CountingSMTP(SMTP):
    """Counts open connections so tests can check concurrency limits."""

    open_now = 0
    open_max = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).open_now += 1
        type(self).open_max = max(type(self).open_max, type(self).open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).open_now -= 1
        super().connection_lost(exc)


class Sink:
    """An SMTP sink on ``host:port`` in the running event loop."""

    def __init__(self, host: str, port: int, folder: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.handler = SinkHandler(folder=folder)
        self.server: asyncio.Server | None = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(
                self.handler, hostname=f"sink.{self.host}", enable_SMTPUTF8=True, data_size_limit=None, loop=loop
            ),
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


cli = typer.Typer(add_completion=False)


@cli.command()
def main(
    folder: Annotated[Path, typer.Option(help="where received messages are written")] = Path(".run/mail"),
    host: str = "127.0.0.1",
    port: int = 2526,
) -> None:
    """Accept every message and keep it in FOLDER."""

    async def serve() -> None:
        sink = Sink(host, port, folder)
        await sink.start()
        print(f"sink: listening on {host}:{port}, writing to {folder}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    cli()
