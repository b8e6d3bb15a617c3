"""``make run``: the whole system in the foreground, for development.

Starts NATS, Redis and PostgreSQL only where nothing answers at the configured
URLs (their data then lives under ``.run/``), creates the database if it is
missing, starts the catch-all sink that the development zones relay to, and the
five services: ingest, queue, one sender per zone, bounce and api. Ctrl-C stops
everything it started, services first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import asyncpg
import typer

from zmta_common.config import Config, ConfigError, load_config

from .servers import ChildServer, NatsServer, PostgresCluster, RedisServer, port_open

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
        server = kind(workdir=state / kind.name, port=port)
        print(f"run: starting {kind.name} on {host}:{port} (data in {server.workdir})", flush=True)
        server.start()
        started.append(server)
    return started


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


def service_commands(config: Config, config_path: Path, mail_dir: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    cfg = ["--config", str(config_path)]
    commands = [("sink", [py, "-m", "zmta_devtools.sink", "--folder", str(mail_dir), "--port", "2526"])]
    commands += [
        ("queue", [py, "-m", "zmta_queue", *cfg]),
        ("bounce", [py, "-m", "zmta_bounce", *cfg]),
    ]
    for index, zone in enumerate(config.zones):
        port = config.metrics.sender_port + index * 10
        commands.append(
            (f"sender:{zone}", [py, "-m", "zmta_sender", "--zone", zone, "--metrics-port", str(port), *cfg])
        )
    commands += [("ingest", [py, "-m", "zmta_ingest", *cfg]), ("api", [py, "-m", "zmta_api", *cfg])]
    return commands


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
    infrastructure = start_infrastructure(config, state.resolve())
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(ensure_database(config.dbs.postgres))
        mail_dir = (state / "mail").resolve()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, cmd in service_commands(config, config_path.resolve(), mail_dir):
            children.append((name, subprocess.Popen(cmd, env=env, start_new_session=True)))
            if name == "queue":
                time.sleep(1.0)  # lets the first service create the schema alone
        smtp = ", ".join(f"{i.host}:{i.port}" for i in config.smtp_interfaces.values() if i.enabled)
        print(
            f"run: up. SMTP {smtp}, API http://{config.api.host}:{config.api.port}, "
            f"delivered mail lands in {mail_dir}. Ctrl-C stops.",
            flush=True,
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"run: {name} exited with {proc.returncode}; stopping everything", flush=True)
                    stopping = True
            time.sleep(0.2)
    finally:
        for _, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(children):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in reversed(infrastructure):
            server.stop()
        print("run: stopped", flush=True)


if __name__ == "__main__":
    cli()
