"""What the tests share, imported as ``tests.support`` (never from ``conftest.py``): the
test domains the session's DNS serves and the sinks they lead to, :class:`Deployment`
(one isolated installation: its database, NATS server, Redis database, config file and
service processes, forked from a fork server that has imported them, see
``zmta_devtools.forking``) and the :class:`Deployer` that makes them, and
:func:`eventually`, the one way a test waits: for an event, bounded, never for a time, and
:func:`log_entries`, the events a service logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import smtplib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from nats.aio.msg import Msg

from zmta_common.config import Config, load_config
from zmta_common.events import WorkRequest, work_subject
from zmta_common.store import Store
from zmta_devtools.servers import Dnsmasq, NatsServer, PostgresCluster, RedisServer, free_port
from zmta_devtools.sink import Sink
from zmta_devtools.system import System
from zmta_sender.dkim_signer import load_key, public_txt

# Test domains and the sink address their MX points at.
MX_HOSTS = {
    "a.test": "127.0.0.2",
    "b.test": "127.0.0.3",
    "slow.test": "127.0.0.4",
}
A_ONLY = {"amx.test": "127.0.0.5"}  # no MX record: delivered to its A record
NULL_MX = ["nullmx.test"]
# Many domains with one MX host, for tests that need mail to "many domains".
MANY_DOMAINS = [f"w{n}.test" for n in range(100)]
MANY_DOMAINS_MX = "127.0.0.6"
IPV6_ONLY = {"v6.test": "::1"}  # MX host with an AAAA record only
REFUSING = {"refused.test": "127.0.0.7"}  # MX host where nothing listens: connection refused
# Internationalised domains (published in punycode): one on the SMTPUTF8 sink, one on
# 127.0.0.5, which tests may turn into a sink without SMTPUTF8.
IDN = {"уайлддак.орг": "127.0.0.2", "почта.испытание": "127.0.0.5"}
# Domains with an MTA-STS TXT record (id STS_ID); mta-sts.<domain> is Infra.sts_address,
# where tests serve the policies over HTTPS on port 443.
MTA_STS = {"sts.test": "127.0.0.3", "sts-mismatch.test": "127.0.0.3", "sts-testing.test": "127.0.0.3"}
STS_ID = "20261201T000000"


@dataclass
class Infra:
    workdir: Path
    postgres: PostgresCluster
    redis: RedisServer
    dns: Dnsmasq
    sink_port: int
    sinks: dict[str, Sink] = field(default_factory=dict)
    sts_address: str = ""


# DKIM keys made for the test session: (domain, selector, kind). The private keys are
# written to <workdir>/dkim/<domain>.<selector>.pem (a dkim.key_dir), the public ones
# published in the test DNS.
DKIM_KEYS = [("b.test", "rsa", "rsa2048"), ("b.test", "ed", "ed25519"), ("platform.test", "pf", "rsa1024")]


def publish_dkim_keys(dns: Dnsmasq, folder: Path) -> None:
    folder.mkdir(parents=True)
    for domain, selector, kind in DKIM_KEYS:
        private = (
            ed25519.Ed25519PrivateKey.generate()
            if kind == "ed25519"
            else rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
        )
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{domain}.{selector}.pem").write_bytes(pem)
        record = public_txt(load_key(domain, selector, pem))
        # A TXT character-string holds 255 octets; dnsmasq splits the record at commas.
        dns.add_txt(
            f"{selector}._domainkey.{domain}", ",".join(record[i : i + 250] for i in range(0, len(record), 250))
        )


_db_numbers = itertools.count()
_redis_databases = itertools.count(1)  # a Redis database of its own for each deployment


@dataclass
class Deployment:
    """One isolated installation: its database, NATS, config file and service processes."""

    infra: Infra
    workdir: Path
    nats: NatsServer
    config_path: Path
    config: Config
    system: System
    store: Store

    @property
    def log_dir(self) -> Path:
        """Where the services write their logs, one ``<service>.log`` each."""
        assert self.system.log_dir is not None
        return self.system.log_dir

    @property
    def smtp_port(self) -> int:
        return self.config.smtp_interfaces["feeder"].port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config.api.port}"

    def smtp_send(self, mail_from: str, rcpt_to: list[str], data: bytes) -> str:
        """Submit over SMTP with the standard library's client; return the final reply text."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(mail_from)
            for rcpt in rcpt_to:
                code, text = client.rcpt(rcpt)
                assert code == 250, (code, text)
            code, text = client.data(data)
            assert code == 250, (code, text)
            return text.decode()


def write_config(
    path: Path, infra: Infra, nats_url: str, database: str, overrides: dict[str, Any], redis_url: str | None = None
) -> Config:
    config: dict[str, Any] = {
        "hostname": "mta.test",
        "log_level": "DEBUG",
        "dbs": {
            "postgres": f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/{database}",
            "redis": redis_url or infra.redis.url,
            "nats": nats_url,
            "postgres_pool_size": 10,
        },
        "smtp_interfaces": {"feeder": {"port": free_port()}},
        # Loopback only, so the original's open API; tests of API keys turn it off.
        "api": {"port": free_port(), "open_access": True},
        "dns": {"nameservers": ["127.0.0.1"], "port": infra.dns.port, "timeout": 2},
        "queue": {"lease_time": 30, "housekeeping_interval": 1},
        "metrics": {
            "ingest_port": free_port(),
            "queue_port": free_port(),
            "sender_port": free_port(),
            "bounce_port": free_port(),
        },
        "zones": {
            "default": {"mx_port": infra.sink_port, "connections": 10, "connect_timeout": 5, "command_timeout": 20},
            "bounces": {"mx_port": infra.sink_port, "connections": 1},
        },
    }
    merge(config, overrides)
    for zone in config["zones"].values():
        zone.setdefault("mx_port", infra.sink_port)  # every test domain's MX is a sink on this port
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


async def create_database(infra: Infra) -> str:
    name = f"zmta_{next(_db_numbers)}"
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


class Deployer:
    """Makes deployments under ``workdir`` and tears them all down at the end."""

    def __init__(self, infra: Infra, workdir: Path) -> None:
        self.infra = infra
        self.workdir = workdir
        self.made: list[Deployment] = []

    async def __call__(
        self, overrides: dict[str, Any] | None = None, senders: dict[str, int] | None = None, start: bool = True
    ) -> Deployment:
        """A running deployment; ``senders`` maps zone -> sender processes (default: one per zone)."""
        workdir = self.workdir / f"deploy{len(self.made)}"
        workdir.mkdir(parents=True)
        nats = NatsServer(workdir / "nats")
        nats.start()
        database = await create_database(self.infra)
        config_path = workdir / "zmta.yaml"
        redis_url = self.infra.redis.url_of(next(_redis_databases))
        config = write_config(config_path, self.infra, nats.url, database, overrides or {}, redis_url)
        store = await Store.connect(config.dbs.postgres, max_size=4)
        system = System(config_path, config, workdir / "logs", fork=True)
        deployment = Deployment(self.infra, workdir, nats, config_path, config, system, store)
        self.made.append(deployment)
        if start:
            await asyncio.to_thread(system.start, senders)
        return deployment

    async def close(self) -> None:
        for deployment in self.made:
            await asyncio.to_thread(deployment.system.stop)
            await deployment.store.close()
            deployment.nats.stop()


DeploymentFactory = Deployer


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "") -> Any:
    """Await until ``check()`` (sync or async) returns something true; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)


async def send_one(d: Deployment, rcpt: str, subject: str = "test") -> str:
    """Submit a small message to one recipient over SMTP; its queue id."""
    data = f"Subject: {subject}\r\n\r\nx\r\n".encode()
    reply = await asyncio.to_thread(d.smtp_send, "s@origin.test", [rcpt], data)
    match = re.search(r"queued as ([0-9a-f]+)", reply)
    assert match, reply
    return match.group(1)


async def deferred_reason(d: Deployment, message_id: str) -> str:
    """The reply of the first failed attempt of the message's first delivery, once it has one."""

    async def deferred() -> str:
        rows = await d.store.deliveries_of(message_id)
        return (rows[0].last_response or "") if rows and rows[0].attempts >= 1 else ""

    return str(await eventually(deferred, what="a deferral"))


def log_entries(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines of a service's log file (``Deployment.log_dir / "<service>.log"``), or
    only those of ``event``; a line still being written is left out."""
    entries = []
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or entry.get("event") == event:
            entries.append(entry)
    return entries


@dataclass
class WorkRequests:
    """The work requests senders sent, seen on a deployment's NATS: the zone of each."""

    zones: list[str] = field(default_factory=list)

    async def two_more(self) -> None:
        """Wait for two more requests. A sender asks again only once it has the answer to its
        last request, so after two requests seen since something was queued, the queue has
        answered one of them with it there (leased or, if it may not be, left alone)."""
        target = len(self.zones) + 2
        await eventually(lambda: len(self.zones) >= target, what="two more work requests")


@contextlib.asynccontextmanager
async def work_requests(d: Deployment, zone: str = "default") -> AsyncIterator[WorkRequests]:
    """Watch the work requests of ``zone`` (``"*"``: of every zone) while the block runs."""
    nc = await nats.connect(d.nats.url)
    seen = WorkRequests()

    async def record(msg: Msg) -> None:
        seen.zones.append(WorkRequest.decode(msg.data).zone)

    try:
        await nc.subscribe(work_subject(zone), cb=record)
        await nc.flush()  # subscribed at the server before the block sends anything
        yield seen
    finally:
        await nc.close()
