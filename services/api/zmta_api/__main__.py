"""``python -m zmta_api``: the HTTP API on ``api.host:api.port``."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from zmta_common import bus as zbus
from zmta_common import service
from zmta_common.config import Config
from zmta_common.metrics import EmbeddedServer
from zmta_common.store import Store

from .app import Services, create_app

log = logging.getLogger("zmta_api")


async def main(config: Config, stop: asyncio.Event) -> None:
    store = await Store.connect(config.dbs.postgres, config.dbs.postgres_pool_size)
    bus = await zbus.connect(config.dbs.nats, "api")
    app = create_app(Services(config, store, bus))
    server = EmbeddedServer(
        uvicorn.Config(app, host=config.api.host, port=config.api.port, log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    log.info("listening", extra={"host": config.api.host, "port": config.api.port})
    await asyncio.wait([task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    await bus.close()
    await store.close()


cli = service.command("api", main, "Run the HTTP API.")

if __name__ == "__main__":
    cli()
