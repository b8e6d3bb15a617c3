"""``make bench-shaping``: adaptive traffic shaping against a provider that pushes back.

The provider is a sink (:class:`zmta_devtools.sink.Provider`) that hosts every recipient
domain of the campaign (one MX host: one site): it refuses connections beyond
``--connections`` at the greeting (421) and recipients beyond ``--rate`` per second
(450), and serves a sender again as soon as it slows down. The same campaign (``--messages``
to ``--domains`` domains, through two sender pods) runs three times on a fresh system:

* ``shaping off``: the configured limits only (a site's default 20 connections, no rate);
* ``shaping on``: the shipped rules, nothing configured for the provider;
* ``tuned``: shaping off, the site's limits set to exactly what the provider allows, the
  case an operator who knew the provider's limits would configure.

Each prints the time to deliver all, the temporary failures received per delivered message,
and the connections refused. Shaping should cut the failures per message by 5x or more,
and take at most 1.5 times as long as the tuned case.
"""

from __future__ import annotations

import smtplib
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from zmta_common.config import load_config

from .servers import Dnsmasq, NatsServer, PostgresCluster, RedisServer, free_address, free_port
from .sink import Provider, Sink
from .system import System

cli = typer.Typer(add_completion=False)

PROVIDER_MX = "mx.provider.bench"


@dataclass
class Campaign:
    messages: int
    domains: int
    connections: int  # the provider's
    rate: int  # the provider's, recipients per second


@dataclass
class Outcome:
    mode: str
    seconds: float
    delivered: int
    deferred: int  # temporary failures the provider gave
    refused_connections: int

    def line(self) -> str:
        per = self.deferred / max(self.delivered, 1)
        return (
            f"{self.mode:12} {self.seconds:7.1f} s to deliver {self.delivered}, "
            f"{per:6.3f} temporary failures per message ({self.deferred}), "
            f"{self.refused_connections} connections refused"
        )


def config_for(mode: str, campaign: Campaign, ports: dict[str, object]) -> dict[str, Any]:
    zone: dict[str, Any] = {
        "mx_port": ports["mx"],
        "connections": 40,
        "domains": {"*": {"connections": 5}},
        # Deferred mail comes back soon, so that "off" ends too and the times compare.
        "defer_times": [2.0] * 200,
    }
    if mode == "tuned":
        zone["sites"] = {"connections": campaign.connections, "rate": f"{campaign.rate * 60}/min"}
    return {
        "log_level": "WARNING",
        "hostname": "bench.test",
        "dbs": {"postgres": ports["postgres"], "redis": ports["redis"], "nats": ports["nats"]},
        "smtp_interfaces": {"feeder": {"port": ports["smtp"]}},
        "api": {"port": free_port()},
        "dns": {"nameservers": ["127.0.0.1"], "port": ports["dns"], "timeout": 2},
        "metrics": {f"{s}_port": free_port() for s in ("ingest", "queue", "sender", "bounce")},
        "shaping": {"enabled": mode == "on"},
        "zones": {"default": zone, "bounces": {"mx_port": ports["mx"], "connections": 1}},
    }


def inject(port: int, campaign: Campaign, sessions: int = 8) -> None:
    """The campaign over ``sessions`` SMTP sessions: one recipient a message, domains in turn."""

    def session(part: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for n in range(part, campaign.messages, sessions):
                rcpt = f"user{n}@d{n % campaign.domains}.bench"
                body = f"From: news@origin.bench\r\nTo: {rcpt}\r\nSubject: offer {n}\r\n\r\nHello {n}\r\n"
                client.sendmail("news@origin.bench", [rcpt], body.encode())

    threads = [threading.Thread(target=session, args=(part,)) for part in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run(mode: str, campaign: Campaign, workdir: Path, timeout: float) -> Outcome:
    postgres, redis, nats = (
        PostgresCluster(workdir / "pg"),
        RedisServer(workdir / "redis"),
        NatsServer(workdir / "nats"),
    )
    dns = Dnsmasq(workdir / "dns")
    mx_address = free_address(25, "127.0.9.")
    for n in range(campaign.domains):
        dns.add_mx(f"d{n}.bench", PROVIDER_MX, 10)
    dns.add_host(PROVIDER_MX, mx_address)
    sink = Sink(mx_address, free_port())
    provider = Provider(connections=campaign.connections, messages=campaign.rate, window=1.0)
    servers: list[Any] = [postgres, redis, nats, dns, sink]
    system = None
    started: list[Any] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        sink.handler.provider = provider
        smtp_port = free_port()
        ports: dict[str, object] = {"postgres": postgres.url, "redis": redis.url, "nats": nats.url, "dns": dns.port}
        ports |= {"mx": sink.port, "smtp": smtp_port}
        config_path = workdir / "zmta.yaml"
        config_path.write_text(yaml.safe_dump(config_for(mode, campaign, ports)))
        system = System(config_path, load_config(config_path), workdir / "logs")
        system.start({"default": 2}, with_api=False)
        start = time.monotonic()
        inject(smtp_port, campaign)
        deadline = start + timeout
        while len(sink.messages) < campaign.messages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: {len(sink.messages)} of {campaign.messages} delivered in {timeout} s")
            time.sleep(0.05)
        seconds = time.monotonic() - start
        return Outcome(mode, seconds, len(sink.messages), provider.deferred, provider.refused_connections)
    finally:
        if system is not None:
            system.stop()
        for server in reversed(started):
            server.stop()


@cli.command()
def main(
    messages: Annotated[int, typer.Option(help="messages in the campaign, one recipient each")] = 2000,
    domains: Annotated[int, typer.Option(help="recipient domains, all hosted by the provider")] = 200,
    connections: Annotated[int, typer.Option(help="the provider's connections at once")] = 5,
    rate: Annotated[int, typer.Option(help="the provider's recipients per second")] = 100,
    timeout: Annotated[float, typer.Option(help="seconds a run may take")] = 600.0,
) -> None:
    """Run the campaign with shaping off, on, and with limits tuned to the provider."""
    campaign = Campaign(messages, domains, connections, rate)
    print(
        f"bench-shaping: {messages} messages to {domains} domains of one provider that takes"
        f" {connections} connections and {rate} recipients/s, two sender pods",
        flush=True,
    )
    outcomes = {}
    for mode in ("off", "on", "tuned"):
        with tempfile.TemporaryDirectory(prefix=f"zmta-bench-shaping-{mode}-") as tmp:
            workdir = Path(tmp)
            workdir.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data dir
            outcomes[mode] = run(mode, campaign, workdir, timeout)
        print(outcomes[mode].line(), flush=True)
    off, on, tuned = outcomes["off"], outcomes["on"], outcomes["tuned"]
    failures_off = off.deferred / max(off.delivered, 1)
    failures_on = on.deferred / max(on.delivered, 1)
    print(
        f"shaping cuts the temporary failures per message {failures_off / max(failures_on, 1e-9):.1f}x"
        f" (target >= 5x); time {on.seconds / tuned.seconds:.2f}x the tuned case (target <= 1.5x)"
        f" and {on.seconds / off.seconds:.2f}x shaping off",
        flush=True,
    )


if __name__ == "__main__":
    cli()
