"""``python -m zmta_ingest``: every enabled SMTP interface of the config, in one process.

Several ingest processes can share the ports (``--reuse-port``: the kernel spreads new
connections over them), each with its own ``--metrics-port``: that is how one machine's
cores all take mail; in Kubernetes, pods do the same with their own addresses.

``python -m zmta_ingest hash-password`` reads a password on stdin and prints the argon2
hash to put in ``smtp_interfaces.<name>.users``.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import ssl
import sys
import weakref
from typing import Annotated, cast

import typer

from zmta_common import hooks, service
from zmta_common.config import Config

from .auth import hash_password
from .handler import IngestHandler
from .smtp_server import IngestSMTP
from .tls import StartupError, server_context

log = logging.getLogger("zmta_ingest")

# Seconds open SMTP sessions get to finish their transaction when ingest stops (SIGTERM).
DEFAULT_SHUTDOWN_GRACE = 30.0
LISTEN_BACKLOG = 1024


async def finish_sessions(sessions: weakref.WeakSet[IngestSMTP], grace: float) -> int:
    """Let open sessions finish the transaction they are in, for ``grace`` seconds at most.

    A session between transactions (no MAIL FROM given) has nothing at stake: it gets
    ``421`` and is closed at once. A session still in a transaction when the time is up
    is cut off; its client never saw a 250, so it keeps the message and tries again.
    Returns how many sessions were cut off.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        open_now = [s for s in sessions if s.transport is not None]
        for session in open_now:
            if session.envelope is None or session.envelope.mail_from is None:
                # (uvloop's transports are not subclasses of asyncio's, hence the cast)
                transport = cast(asyncio.WriteTransport, session.transport)
                if not transport.is_closing():
                    transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
                    transport.close()
        busy = [s for s in open_now if s.envelope is not None and s.envelope.mail_from is not None]
        if not busy or loop.time() >= deadline:
            break
        await asyncio.sleep(0.1)
    for session in busy:
        if session.transport is not None:
            session.transport.close()
    if busy:
        log.warning("sessions cut off at shutdown", extra={"count": len(busy), "grace": grace})
    return len(busy)


async def main(
    config: Config,
    stop: asyncio.Event,
    grace: float = DEFAULT_SHUTDOWN_GRACE,
    reuse_port: bool = False,
    metrics_port: int | None = None,
) -> None:
    # Certificates, keys and password hashes are checked before anything starts.
    try:
        contexts = {
            name: server_context(name, iface) for name, iface in config.smtp_interfaces.items() if iface.enabled
        }
    except StartupError as exc:
        log.error("bad interface", extra={"error": str(exc)})
        print(f"ingest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    async with service.connections(config, "ingest") as conn:
        plugins = hooks.load(config, "ingest")
        try:
            handlers = [IngestHandler(config, name, conn.store, conn.bus, conn.redis, plugins) for name in contexts]
        except StartupError as exc:
            log.error("bad interface", extra={"error": str(exc)})
            print(f"ingest: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        sessions: weakref.WeakSet[IngestSMTP] = weakref.WeakSet()  # open SMTP sessions, for a clean stop
        servers = [await listen(config, handler, contexts[handler.name], sessions, reuse_port) for handler in handlers]

        async def health() -> dict[str, object]:
            await conn.store.pool.fetchval("SELECT 1")
            return {"interfaces": len(servers), "nats": conn.bus.nc.is_connected}

        port = config.metrics.ingest_port if metrics_port is None else metrics_port
        async with service.health_endpoint(config, port, health):
            try:
                await stop.wait()
            finally:
                await close(servers, sessions, grace)
                for handler in handlers:
                    await handler.close()


async def listen(
    config: Config,
    handler: IngestHandler,
    tls: ssl.SSLContext | None,
    sessions: weakref.WeakSet[IngestSMTP],
    reuse_port: bool,
) -> asyncio.Server:
    """Start accepting SMTP connections on one interface."""
    loop = asyncio.get_running_loop()
    iface = handler.interface
    implicit = iface.implicit_tls

    def factory() -> IngestSMTP:
        session = IngestSMTP(
            handler,
            implicit_tls=implicit,
            hostname=iface.hostname or config.hostname,
            ident=config.name,
            data_size_limit=iface.max_size,
            enable_SMTPUTF8=True,
            timeout=iface.socket_timeout,
            # STARTTLS where there is a certificate and the port is not TLS from the start.
            tls_context=None if implicit else tls,
            loop=loop,
        )
        sessions.add(session)
        return session

    # A listen backlog for bursts of clients (asyncio's default of 100 drops connections).
    server = await loop.create_server(
        factory,
        iface.host,
        iface.port,
        ssl=tls if implicit else None,
        backlog=LISTEN_BACKLOG,
        reuse_port=reuse_port or None,
    )
    log.info(
        "listening",
        extra={
            "interface": handler.name,
            "host": iface.host,
            "port": iface.port,
            "tls": "implicit" if implicit else ("starttls" if tls else "none"),
            "auth": handler.authenticator is not None,
        },
    )
    return server


async def close(servers: list[asyncio.Server], sessions: weakref.WeakSet[IngestSMTP], grace: float) -> None:
    """Take no new connections; let open sessions finish their transaction within ``grace``."""
    log.info("stopping", extra={"sessions": sum(1 for s in sessions if s.transport is not None), "grace": grace})
    for server in servers:
        server.close()
    # Open sessions finish their transaction (wait_closed does not wait for them under uvloop).
    await finish_sessions(sessions, grace)
    await asyncio.gather(*(s.wait_closed() for s in servers), return_exceptions=True)


cli = typer.Typer(add_completion=False)


@cli.callback(invoke_without_command=True)
def start(
    ctx: typer.Context,
    config: service.ConfigOption = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            "--shutdown-grace", min=0, help="seconds open SMTP sessions get to finish their transaction on SIGTERM"
        ),
    ] = DEFAULT_SHUTDOWN_GRACE,
    reuse_port: Annotated[
        bool, typer.Option("--reuse-port", help="share the SMTP ports with other ingest processes (SO_REUSEPORT)")
    ] = False,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="serve /metrics here instead of metrics.ingest_port")
    ] = None,
) -> None:
    """Run the SMTP ingest interfaces (what happens without a command)."""
    if ctx.invoked_subcommand is None:

        async def run(config: Config, stop: asyncio.Event) -> None:
            await main(config, stop, shutdown_grace, reuse_port, metrics_port)

        service.run("ingest", run, config)


@cli.command("hash-password")
def hash_password_command() -> None:
    """Read a password on stdin (one line) and print its argon2id hash for smtp_interfaces.<name>.users."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("hash-password: the passwords differ", file=sys.stderr)
            raise typer.Exit(2)
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("hash-password: the password is empty", file=sys.stderr)
        raise typer.Exit(2)
    print(hash_password(password))


if __name__ == "__main__":
    cli()
