"""The fixtures: real servers for the tests (NATS, Redis, PostgreSQL, DNS and SMTP sinks on
loopback), started once for the session, and deployments of the services on them.

Session-wide: one PostgreSQL cluster, one Redis, one dnsmasq with the test domains of
:mod:`tests.support`, and SMTP sinks on 127.0.0.2-127.0.0.6 that share one port. Each test
that runs the services gets a :class:`tests.support.Deployment` from ``deploy`` (its own)
or ``module_deploy`` (shared by a module's tests). Helpers live in :mod:`tests.support`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme
from redis.asyncio import Redis

from tests.support import (
    A_ONLY,
    IDN,
    IPV6_ONLY,
    MANY_DOMAINS,
    MANY_DOMAINS_MX,
    MTA_STS,
    MX_HOSTS,
    NULL_MX,
    REFUSING,
    STS_ID,
    Deployer,
    Infra,
    publish_dkim_keys,
)
from zmta_devtools.servers import Dnsmasq, PostgresCluster, RedisServer, free_address, free_port
from zmta_devtools.sink import Sink


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    workdir = Path(tempfile.mkdtemp(prefix="zmta-tests-"))
    workdir.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data dir
    # pg_stat_statements: tests that bound the rows a piece of work reads.
    postgres = PostgresCluster(workdir / "pg", statements=True)
    redis = RedisServer(workdir / "redis")
    redis.databases = 4096  # one for each deployment (see Deployer); 0 for the tests of Redis alone
    dns = Dnsmasq(workdir / "dns")
    for domain, ip in MX_HOSTS.items():
        dns.add_mx(domain, f"mx.{domain}", 10)
        dns.add_host(f"mx.{domain}", ip)
    for domain, ip in A_ONLY.items():
        dns.add_host(domain, ip)
    for domain in NULL_MX:
        dns.add_mx(domain, ".", 0)
    publish_dkim_keys(dns, workdir / "dkim")
    for domain in MANY_DOMAINS:
        dns.add_mx(domain, "mx.many.test", 10)
    dns.add_host("mx.many.test", MANY_DOMAINS_MX)
    for domain, ip in (IPV6_ONLY | REFUSING | {d.encode("idna").decode(): ip for d, ip in IDN.items()}).items():
        dns.add_mx(domain, f"mx.{domain}", 10)
        dns.add_host(f"mx.{domain}", ip)
    sts_address = free_address(443)
    for domain, ip in MTA_STS.items():
        dns.add_mx(domain, f"mx.{domain}", 10)
        dns.add_host(f"mx.{domain}", ip)
        dns.add_host(f"mta-sts.{domain}", sts_address)
        dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={STS_ID}")
    # Where the MTA-STS domains want their TLS reports (RFC 8460; dnsmasq cannot put a comma
    # in a TXT string, so one rua each): mailed to a.test's sink, POSTed to tlsrpt.sts.test
    # (on Infra.sts_address, port 443), and a version nobody speaks.
    dns.add_txt("_smtp._tls.sts.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")
    dns.add_txt("_smtp._tls.sts-testing.test", "v=TLSRPTv1; rua=https://tlsrpt.sts.test/v1/tlsrpt")
    dns.add_txt("_smtp._tls.sts-mismatch.test", "v=TLSRPTv2; rua=mailto:tlsrpt@a.test")
    dns.add_host("tlsrpt.sts.test", sts_address)
    sink_port = free_port()
    sink_ips = set(MX_HOSTS.values()) | set(A_ONLY.values()) | {MANY_DOMAINS_MX} | set(IPV6_ONLY.values())
    sinks = {ip: Sink(ip, sink_port) for ip in sorted(sink_ips)}
    started: list[Any] = []
    try:
        servers: list[Any] = [postgres, redis, dns, *sinks.values()]
        for server in servers:
            server.start()
            started.append(server)
        yield Infra(workdir, postgres, redis, dns, sink_port, sinks, sts_address)
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest_asyncio.fixture
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    """A client of the test Redis's database 0 (the deployments use the others), emptied."""
    client = Redis.from_url(infra.redis.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A certificate authority of the module's own, for servers whose certificates it signs."""
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """That authority's certificate as a PEM file (for ``tls.ca_file``)."""
    path = tmp_path_factory.mktemp("tls") / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def sinks(infra: Infra) -> dict[str, Sink]:
    """The sinks, emptied and with no scripted replies, for one test."""
    for sink in infra.sinks.values():
        sink.reset()
    return infra.sinks


@pytest_asyncio.fixture
async def deploy(infra: Infra, tmp_path: Path) -> AsyncIterator[Deployer]:
    """``await deploy(overrides, senders={zone: n})`` gives a running Deployment for this test."""
    deployer = Deployer(infra, tmp_path)
    yield deployer
    await deployer.close()


@pytest_asyncio.fixture(scope="module")
async def module_deploy(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployer]:
    """Like ``deploy``, for a deployment that every test of a module shares."""
    deployer = Deployer(infra, tmp_path_factory.mktemp("module"))
    yield deployer
    await deployer.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start a whole deployment: ``make test-fast`` runs the others."""
    for item in items:
        # fixturenames is the closure, so a fixture built on module_deploy counts too.
        if {"deploy", "module_deploy"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.deployment)
