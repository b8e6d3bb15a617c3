"""``python -m zmta_bounce``: the classifier responder, the bounce event consumer, the HTTP
notification sender, the delivery log stream and the daily TLS reports; ``python -m
zmta_bounce tls-report`` sends the TLS reports of one day at once."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

import typer

from zmta_common import hooks, service
from zmta_common.config import Config

from .classifier import Classifier, RulesError, load_all
from .consumer import BounceConsumer
from .log_stream import LogStream
from .notifications import NotificationSender
from .responder import ClassifyResponder
from .tlsrpt import TlsReporter

log = logging.getLogger("zmta_bounce")


async def main(config: Config, stop: asyncio.Event) -> None:
    try:
        classifier = Classifier(load_all(config.bounce.rules_files))
    except RulesError as exc:
        log.error("bad bounce rules", extra={"error": str(exc)})
        raise SystemExit(2) from None
    async with service.connections(config, "bounce") as conn:
        await ClassifyResponder(classifier).start(conn.bus.nc)
        plugins = hooks.load(config, "bounce")
        consumer = BounceConsumer(config, conn.store, conn.bus, plugins)
        notification_sender = NotificationSender(config, conn.bus)
        reporter = TlsReporter(config, conn.store, conn.bus, conn.redis, plugins)
        tasks = [consumer.run(stop), notification_sender.run(stop)]
        if config.tls_reporting.enabled:
            tasks.append(reporter.run(stop))
        if config.delivery_log.stream or config.delivery_log.webhook_url is not None:
            tasks.append(LogStream(config, conn.store, conn.bus, conn.redis).run(stop))

        async def health() -> dict[str, object]:
            return {
                "rules": len(classifier.rules),
                "nats": conn.bus.nc.is_connected,
                "bounces": consumer.handled,
                "notifications": notification_sender.sent,
                "tls_reports": reporter.sent,
            }

        async with service.health_endpoint(config, config.metrics.bounce_port, health):
            log.info("running", extra={"rules": len(classifier.rules)})
            await asyncio.gather(*tasks, return_exceptions=True)


def tls_report_main(day: date) -> service.Main:
    async def run(config: Config, stop: asyncio.Event) -> None:
        if not config.tls_reporting.enabled:
            log.warning("tls_reporting.enabled is false: the senders count nothing to report")
        async with service.connections(config, "bounce-tls-report") as conn:
            reporter = TlsReporter(config, conn.store, conn.bus, conn.redis, hooks.load(config, "bounce"))
            async with reporter.client():
                outcomes = await reporter.report_day(day)
        for domain, outcome in outcomes.items():
            print(f"{domain}: {outcome}")
        print(f"{day.isoformat()}: {len(outcomes)} domains, {reporter.sent} reports sent")

    return run


cli = typer.Typer(add_completion=False)


@cli.callback(invoke_without_command=True)
def start(ctx: typer.Context, config: service.ConfigOption = None) -> None:
    """Run the bounce service (what happens without a command)."""
    if ctx.invoked_subcommand is None:
        service.run("bounce", main, config)
    ctx.obj = config


@cli.command("tls-report")
def tls_report(
    ctx: typer.Context,
    day: Annotated[str | None, typer.Option(help="the UTC day to report, YYYY-MM-DD (default: yesterday)")] = None,
    config: service.ConfigOption = None,
) -> None:
    """Send the TLS reports (RFC 8460) of one UTC day now, as the daily job does: once per
    domain whatever replica or command sends it (a domain reported already is left alone)."""
    try:
        when = date.fromisoformat(day) if day else datetime.now(UTC).date() - timedelta(days=1)
    except ValueError:
        raise typer.BadParameter(f"{day!r} is not a day (YYYY-MM-DD)", param_hint="--day") from None
    service.run("bounce", tls_report_main(when), config or ctx.obj)


if __name__ == "__main__":
    cli()
