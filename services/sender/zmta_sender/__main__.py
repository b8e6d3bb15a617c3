"""``python -m zmta_sender --zone default``: one sender process for one sending zone."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import Annotated

import typer

from zmta_common import hooks, service, shaping, slices
from zmta_common.config import Config
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.mx import MxLookup
from zmta_common.shaping import Overrides, Shaper
from zmta_common.slices import Slice

from .dane import Dane
from .delivery import Deliverer
from .mta_sts import MtaSts
from .mx import MxResolver
from .signing import DkimKeyError, Signer, load_keys
from .tls import verifying_context
from .tlsrpt import Recorder
from .worker import Sender

log = logging.getLogger("zmta_sender")
cli = typer.Typer(add_completion=False)


def make_main(zone: str, part: Slice, metrics_port: int | None, grace: float | None = None) -> service.Main:
    async def main(config: Config, stop: asyncio.Event) -> None:
        if zone not in config.zones:
            raise SystemExit(f"sender: zone {zone!r} is not in the config ({', '.join(sorted(config.zones))})")
        try:
            keys = load_keys(config)
        except DkimKeyError as exc:
            raise SystemExit(f"sender: {exc}") from None
        try:
            verifying_context(config.tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"sender: tls.ca_file {config.tls.ca_file}: {exc}") from None
        try:
            rules = shaping.load_all(config.shaping.rules_files) if config.shaping.enabled else []
        except shaping.RulesError as exc:
            raise SystemExit(f"sender: {exc}") from None
        async with service.connections(config, f"sender-{zone}") as conn:
            name = f"{socket.gethostname()}:{os.getpid()}:{zone}:{part}"
            limits = ZoneLimits(conn.redis, zone, config.zones[zone])
            pool = part.of(config.zones[zone].pool)  # this process's slice of the zone's pool
            reporting = config.tls_reporting
            recorder = Recorder(conn.redis, reporting.retention_days) if reporting.enabled else None
            deliverer = Deliverer(
                config,
                zone,
                pool,
                conn.store,
                conn.bus,
                MxResolver(MxLookup(config.dns, conn.redis)),
                limits,
                Blacklist(conn.redis),
                Signer(config, config.zones[zone], keys),
                hooks.load(config, "sender"),
                sts=MtaSts(config.dns, conn.redis, config.tls, recorder) if config.tls.mta_sts else None,
                shaper=Shaper(Overrides(conn.redis), zone, config.zones[zone], rules) if rules else None,
                dane=Dane(config.dns, config.tls, conn.redis) if config.dns.dnssec else None,
                tlsrpt=recorder,
            )
            sender = Sender(config, zone, conn.store, conn.bus, name, part, limits, deliverer)

            async def health() -> dict[str, object]:
                await conn.store.pool.fetchval("SELECT 1")
                return {
                    "zone": zone,
                    "in_flight": sender.in_flight,
                    "idle_connections": sender.connections.idle,
                    "nats": conn.bus.nc.is_connected,
                }

            port = config.metrics.sender_port if metrics_port is None else metrics_port
            async with service.health_endpoint(config, port, health):
                log.info("running", extra={"zone": zone, "sender": name, "pool": [a.address for a in pool]})
                try:
                    await sender.run(stop, grace)
                finally:
                    if recorder is not None:
                        await recorder.close()  # the TLS reporting counts not written yet

    return main


@cli.command()
def run(
    zone: Annotated[str, typer.Option("--zone", "-z", help="the sending zone to deliver for")] = "default",
    config: service.ConfigOption = None,
    slice_: Annotated[
        str | None, typer.Option("--slice", help="N/M: use slice N (from 0) of M of the zone's address pool")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="port for /metrics and /health (0: any free port)")
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            "--shutdown-grace",
            min=0,
            help="seconds to finish deliveries in flight on SIGTERM; the rest are given back to the queue"
            " (default: the zone's command_timeout)",
        ),
    ] = None,
) -> None:
    """Deliver the mail of one sending zone."""
    try:
        part = slices.resolve(slice_, os.environ)
    except slices.SliceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--slice") from None
    service.run("sender", make_main(zone, part, metrics_port, shutdown_grace), config)


if __name__ == "__main__":
    cli()
