"""``python -m zmta_api``: the HTTP API on ``api.host:api.port``."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated

import typer
import uvicorn
import yaml

from zmta_common import hooks, service
from zmta_common.config import Config
from zmta_common.metrics import EmbeddedServer

from . import security
from .app import Services, create_app

log = logging.getLogger("zmta_api")


async def main(config: Config, stop: asyncio.Event) -> None:
    try:
        security.load_keys(config.api)
    except security.KeyFileError as exc:
        print(f"api: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    async with service.connections(config, "api") as conn:
        app = create_app(Services(config, conn.store, conn.bus, hooks.load(config, "api"), redis=conn.redis))
        server = EmbeddedServer(
            uvicorn.Config(app, host=config.api.host, port=config.api.port, log_config=None, access_log=False)
        )
        task = asyncio.create_task(server.serve())
        log.info("listening", extra={"host": config.api.host, "port": config.api.port})
        try:
            await asyncio.wait([task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            await task


cli = typer.Typer(add_completion=False)


@cli.callback(invoke_without_command=True)
def start(ctx: typer.Context, config: service.ConfigOption = None) -> None:
    """Run the HTTP API (what happens without a command)."""
    if ctx.invoked_subcommand is None:
        service.run("api", main, config)


@cli.command("new-key")
def new_key_command(
    name: Annotated[str, typer.Option(help="a name for the key (logged, recorded as the sender)")] = "app",
    scopes: Annotated[str, typer.Option(help="comma-separated: send, admin")] = "send",
) -> None:
    """Print a new random API key, and the api.keys entry (with its hash) for the config."""
    key, digest = security.new_key()
    print(f"key: {key}")
    entry = {"name": name, "hash": digest, "scopes": [s.strip() for s in scopes.split(",") if s.strip()]}
    print(yaml.safe_dump({"api": {"keys": [entry]}}, sort_keys=False), end="")


if __name__ == "__main__":
    cli()
