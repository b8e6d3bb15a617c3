"""``make run``: the whole system in the foreground, for development.

Starts NATS, Redis and PostgreSQL only where nothing answers at the configured
URLs (their data then lives under ``.run/``), creates the database if it is
missing, starts the catch-all sink that the development zones relay to, and the
five services: ingest, queue, one sender per zone, bounce and api, and says so
once they all listen. Ctrl-C stops everything it started, services first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import asyncpg
import typer

from zmta_common.config import Config, ConfigError, load_config

from .servers import ChildServer, NatsServer, PostgresCluster, RedisServer, port_open
from .system import ServiceProcess, System

SINK_PORT = 2526  # config/development.yaml relays every zone here

cli = typer.Typer(add_completion=False)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def start_infrastructure(config: Config, state: Path) -> list[ChildServer]:
    """Start whichever of NATS, Redis and PostgreSQL is not reachable at its configured URL."""
    started: list[ChildServer] = []
    wanted: list[tuple[str, int, type[ChildServer]]] = [
        (*_host_port(config.dbs.nats, 4222), NatsServer),
        (*_host_port(config.dbs.redis, 6379), RedisServer),
        (*_host_port(config.dbs.postgres, 5432), PostgresCluster),
    ]
    for host, port, kind in wanted:
        if port_open(host, port):
            print(f"run: using the {kind.name} already at {host}:{port}", flush=True)
            continue
        if host not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"run: nothing answers at {host}:{port} and it is not local; start {kind.name} there")
        server = kind(workdir=_workdir(state, kind), port=port)
        print(f"run: starting {kind.name} on {host}:{port} (data in {server.workdir})", flush=True)
        server.start()
        started.append(server)
    return started


def _workdir(state: Path, kind: type[ChildServer]) -> Path:
    """Where a server keeps its data. PostgreSQL runs as its own user when we are root, and
    that user may not be able to enter the checkout (a home directory of mode 700): then
    its data goes to a directory of its own under the system's temporary directory."""
    workdir = state / kind.name
    if kind is not PostgresCluster or os.geteuid() != 0:
        return workdir
    state.mkdir(parents=True, exist_ok=True)
    reachable = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(state)], check=False)
    if reachable.returncode == 0:
        return workdir
    fallback = Path(tempfile.gettempdir()) / f"zmta-run-{hashlib.sha256(bytes(state)).hexdigest()[:8]}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    return fallback / kind.name


async def ensure_database(dsn: str) -> None:
    """Create the configured database when the server has none of that name."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    admin = parts._replace(path="/postgres").geturl()
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
            print(f"run: created database {name}", flush=True)
    finally:
        await conn.close()


def start_sink(mail_dir: Path) -> ServiceProcess:
    sink = ServiceProcess(
        "sink",
        [sys.executable, "-m", "zmta_devtools.sink", "--folder", str(mail_dir), "--port", str(SINK_PORT)],
        SINK_PORT,
    )
    sink.start()
    sink.wait_ready()
    return sink


@cli.command()
def main(
    config_path: Annotated[Path, typer.Option("--config", help="YAML config")] = Path("config/development.yaml"),
    state: Annotated[Path, typer.Option(help="where servers started here keep their data")] = Path(".run"),
) -> None:
    """Run everything until Ctrl-C."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise SystemExit(f"run: {exc}") from None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    infrastructure = start_infrastructure(config, state.resolve())
    system = System(config_path.resolve(), config, log_dir=None)
    sink = None
    try:
        asyncio.run(ensure_database(config.dbs.postgres))
        mail_dir = (state / "mail").resolve()
        sink = start_sink(mail_dir)
        system.start()
        smtp = ", ".join(f"{i.host}:{i.port}" for i in config.smtp_interfaces.values() if i.enabled)
        print(
            f"run: up. SMTP {smtp}, API http://{config.api.host}:{config.api.port}, "
            f"delivered mail lands in {mail_dir}. Ctrl-C stops.",
            flush=True,
        )
        while not stopping:
            if exited := system.check():
                print(f"run: {exited} exited; stopping everything", flush=True)
                break
            time.sleep(0.2)
    finally:
        system.stop()
        if sink is not None:
            sink.stop()
        for server in reversed(infrastructure):
            server.stop()
        print("run: stopped", flush=True)


if __name__ == "__main__":
    cli()
