"""How every service process starts and stops: config, logging, signals, its connections
to PostgreSQL, NATS and Redis, and its /metrics and /health endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
import uvloop
from redis.asyncio import Redis

from . import bus as zbus
from . import logging as zlogging
from . import metrics
from .config import Config, ConfigError, load_config
from .hooks import PluginError
from .store import Store

log = logging.getLogger(__name__)

Main = Callable[[Config, asyncio.Event], Awaitable[None]]


# Collections of the youngest generation after this many allocations (Python's default: 700).
GC_THRESHOLDS = (20000, 10, 10)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]


def command(service: str, main: Main, help_text: str) -> typer.Typer:
    """The command line of a service that takes nothing but ``--config``."""
    app = typer.Typer(add_completion=False)

    @app.command(help=help_text)
    def start(config: ConfigOption = None) -> None:
        run(service, main, config)

    return app


def run(service: str, main: Main, config_path: Path | None) -> None:
    """Load the config, set up logging and run ``main`` until SIGINT or SIGTERM sets ``stop``."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    zlogging.setup(service, config.log_level)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(config, stop)

    # What was made so far (modules, config) lives as long as the process: frozen, the
    # cyclic garbage collector no longer walks it; and it runs less often, as the garbage
    # of a message is nearly all freed by reference counting the moment it is dropped.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        # uvloop: the same asyncio API, a faster loop (libuv) for every service.
        uvloop.run(runner())
    except PluginError as exc:
        log.error("bad plugin", extra={"error": str(exc)})
        print(f"{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        log.exception("service failed")
        raise SystemExit(1) from None
    log.info("stopped")


async def every(interval: float, chore: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str) -> None:
    """Run ``chore`` now and then every ``interval`` seconds until ``stop`` is set.

    A failing round (the store down, say) is logged and tried again next time.
    """
    while not stop.is_set():
        try:
            await chore()
        except Exception as exc:
            log.warning(f"{what} failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@dataclass(frozen=True, slots=True)
class Connections:
    """What a service talks to: the queue's store, the bus and Redis."""

    store: Store
    bus: zbus.Bus
    redis: Redis


@contextlib.asynccontextmanager
async def connections(config: Config, client_name: str) -> AsyncIterator[Connections]:
    """Connect to PostgreSQL, NATS and Redis (Redis lazily, at first use); each is closed
    again, in reverse order, however the service ends (a failed start-up included)."""
    async with contextlib.AsyncExitStack() as stack:
        store = await Store.connect(
            config.dbs.postgres,
            config.dbs.postgres_pool_size,
            commit_check_time=config.dbs.commit_check_time,
            log_enabled=config.delivery_log.retention_days > 0,
        )
        stack.push_async_callback(store.close)
        bus = await zbus.connect(config.dbs.nats, client_name)
        stack.push_async_callback(bus.close)
        redis = Redis.from_url(config.dbs.redis)
        stack.push_async_callback(redis.aclose)
        yield Connections(store, bus, redis)


@contextlib.asynccontextmanager
async def health_endpoint(config: Config, port: int, health: metrics.HealthCheck) -> AsyncIterator[None]:
    """Serve /metrics and /health on ``port`` for as long as the block runs."""
    task = await metrics.serve(config.metrics.host, port, health)
    try:
        yield
    finally:
        task.cancel()
