"""DANE through a whole deployment: its nameserver is unbound (``dns.dnssec: true``), which
validates the signed zone that NSD serves, and the MX hosts of that zone are the session's
sinks, on their port (so the TLSA records are at ``_<sink port>._tcp.<host>``).

``dane.test`` (signed, anchored): ``good`` -> mx-ee (127.0.0.2, DANE-EE 3 1 1 of the sink's
key), ``mismatch`` -> mx-bad (127.0.0.3, two records matching nothing), ``bogus`` -> mx-bogus
(127.0.0.4, its TLSA signature spoiled). ``insecure.test`` (unsigned): its MX is mx-bad.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_asyncio
import trustme
from cryptography import x509
from redis.asyncio import Redis

from tests.support import Deployment, DeploymentFactory, Infra, deferred_reason, eventually, log_entries, send_one
from zmta_common import redis_keys
from zmta_devtools.servers import Nsd, Unbound
from zmta_devtools.sink import Sink
from zmta_sender.dane import spki

NAMES = ["mx-ee.dane.test", "mx-bad.dane.test", "mx-bogus.dane.test"]


@pytest.fixture(scope="module")
def certificate() -> trustme.LeafCert:
    return trustme.CA().issue_cert(*NAMES)


@pytest.fixture(scope="module")
def resolver(
    infra: Infra, certificate: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Unbound]:
    key = hashlib.sha256(spki(x509.load_pem_x509_certificate(certificate.cert_chain_pems[0].bytes()))).hexdigest()
    tlsa = f"_{infra.sink_port}._tcp"
    records = [
        "good MX 10 mx-ee",
        "mismatch MX 10 mx-bad",
        "bogus MX 10 mx-bogus",
        "mx-ee A 127.0.0.2",
        "mx-bad A 127.0.0.3",
        "mx-bogus A 127.0.0.4",
        f"{tlsa}.mx-ee TLSA 3 1 1 {key}",
        f"{tlsa}.mx-bad TLSA 3 1 1 {'00' * 32}",
        f"{tlsa}.mx-bad TLSA 3 0 1 {'00' * 32}",
        f"{tlsa}.mx-bogus TLSA 3 1 1 {key}",
    ]
    nsd = Nsd(tmp_path_factory.mktemp("nsd"))
    nsd.add_zone("dane.test", records, bogus=[(f"{tlsa}.mx-bogus.dane.test", "TLSA")])
    nsd.add_zone("insecure.test", ["@ MX 10 mx-bad.dane.test."], signed=False)
    unbound = Unbound(tmp_path_factory.mktemp("unbound"))
    unbound.serve(nsd)
    try:
        nsd.start()
        unbound.start()
        yield unbound
    finally:
        unbound.stop()
        nsd.stop()


@pytest_asyncio.fixture(scope="module")
async def deployment(module_deploy: DeploymentFactory, resolver: Unbound) -> Deployment:
    return await module_deploy({"dns": {"nameservers": [resolver.host], "port": resolver.port, "dnssec": True}})


@pytest.fixture
def tls_sinks(sinks: dict[str, Sink], certificate: trustme.LeafCert) -> dict[str, Sink]:
    """The sinks, emptied, offering STARTTLS with the certificate the TLSA records are about."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    for sink in sinks.values():
        sink.use_tls(context)
    return sinks


async def delivered(d: Deployment, message_id: str) -> dict[str, Any]:
    def entry() -> dict[str, Any] | None:
        found = [e for e in log_entries(d.log_dir / "sender-default-0.log", "delivered") if e["id"] == message_id]
        return found[0] if found else None

    result: dict[str, Any] = await eventually(entry, what="the delivery log line")
    return result


async def test_a_matching_certificate_delivers_and_the_report_says_dane(
    deployment: Deployment, tls_sinks: dict[str, Sink], infra: Infra
) -> None:
    message_id = await send_one(deployment, "x@good.dane.test", "dane")
    entry = await delivered(deployment, message_id)
    assert re.fullmatch(r"version=TLSv1\.[23] cipher=\S+ verified=yes dane=DANE-EE", entry["tls"]), entry
    assert entry["mx"] == "mx-ee.dane.test"
    assert tls_sinks["127.0.0.2"].messages[0].tls.startswith("TLSv1.")
    redis = Redis.from_url(deployment.config.dbs.redis)
    try:
        assert await redis.get(redis_keys.dane("good.dane.test")) == b"secure"
        assert await redis.exists(redis_keys.tlsa("mx-ee.dane.test", infra.sink_port))
    finally:
        await redis.aclose()


async def test_a_certificate_matching_no_record_is_deferred_with_the_reason(
    deployment: Deployment, tls_sinks: dict[str, Sink]
) -> None:
    message_id = await send_one(deployment, "x@mismatch.dane.test", "dane")
    reason = await deferred_reason(deployment, message_id)
    assert reason == "451 4.7.5 DANE: certificate of mx-bad.dane.test[127.0.0.3] matches none of its 2 TLSA records"
    assert tls_sinks["127.0.0.3"].messages == []


async def test_bogus_tlsa_records_defer(deployment: Deployment, tls_sinks: dict[str, Sink], infra: Infra) -> None:
    message_id = await send_one(deployment, "x@bogus.dane.test", "dane")
    reason = await deferred_reason(deployment, message_id)
    assert reason.startswith(f"451 4.7.5 DANE: TLSA lookup error for mx-bogus.dane.test:{infra.sink_port} (SERVFAIL")
    assert tls_sinks["127.0.0.4"].messages == []


async def test_an_insecure_mx_delivers_without_dane(deployment: Deployment, tls_sinks: dict[str, Sink]) -> None:
    message_id = await send_one(deployment, "x@insecure.test", "dane")
    entry = await delivered(deployment, message_id)
    assert re.fullmatch(r"version=TLSv1\.[23] cipher=\S+ verified=no", entry["tls"]), entry
    assert len(tls_sinks["127.0.0.3"].messages) == 1
