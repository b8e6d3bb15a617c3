"""``python -m zmta_ingest``: every enabled SMTP interface of the config, in one process."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import bus as zbus
from zmta_common import metrics, service
from zmta_common.config import Config
from zmta_common.store import Store

from .handler import IngestHandler
from .smtp_server import IngestSMTP

log = logging.getLogger("zmta_ingest")


async def main(config: Config, stop: asyncio.Event) -> None:
    store = await Store.connect(config.dbs.postgres, config.dbs.postgres_pool_size)
    bus = await zbus.connect(config.dbs.nats, "ingest")
    loop = asyncio.get_running_loop()
    servers = []
    for name, iface in config.smtp_interfaces.items():
        if not iface.enabled:
            continue
        handler = IngestHandler(config, name, store, bus)

        def factory(handler: IngestHandler = handler, iface_max: int = iface.max_size) -> IngestSMTP:
            return IngestSMTP(
                handler,
                hostname=handler.interface.hostname or config.hostname,
                ident=config.name,
                data_size_limit=iface_max,
                enable_SMTPUTF8=True,
                timeout=handler.interface.socket_timeout,
                loop=loop,
            )

        server = await loop.create_server(factory, iface.host, iface.port)
        servers.append(server)
        log.info("listening", extra={"interface": name, "host": iface.host, "port": iface.port})

    async def health() -> dict[str, object]:
        await store.pool.fetchval("SELECT 1")
        return {"interfaces": len(servers), "nats": bus.nc.is_connected}

    metrics_task = await metrics.serve(config.metrics.host, config.metrics.ingest_port, health)
    await stop.wait()
    log.info("stopping")
    for server in servers:
        server.close()  # no new connections; open sessions finish on their own
    await asyncio.gather(*(s.wait_closed() for s in servers), return_exceptions=True)
    metrics_task.cancel()
    await bus.close()
    await store.close()


cli = service.command("ingest", main, "Run the SMTP ingest interfaces.")

if __name__ == "__main__":
    cli()
