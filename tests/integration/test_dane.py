"""DANE (zmta_sender.dane) against real servers: NSD serving zones signed by ldns-signzone,
unbound validating them with their keys as trust anchors, Redis for the cache, and an SMTP
sink presenting a real certificate chain. Each delivery goes the way the sender's goes
(``Deliverer._targets`` and ``_tls``): the MX lookup, :meth:`Dane.apply`, then
``smtp_client.deliver``.

The zones (every host is the sink, 127.0.0.1 on its port P; TLSA records at ``_P._tcp``):

- ``dane.test``, signed and anchored: ``good`` (DANE-EE 3 1 1 of the sink's key), ``ta``
  (DANE-TA 2 0 1 of the intermediate CA the sink presents), ``mismatch`` (two records that
  match nothing), ``pkix`` (PKIX usages only: unusable), ``bogus`` (its TLSA signature
  spoiled), ``backup`` (the bogus host first, then the good one), ``offsite`` (a secure MX
  that names a host of the insecure zone);
- ``expired.test``, signed with signatures that expired years ago: bogus;
- ``insecure.test``, unsigned: its MX names ``mx-bad.dane.test`` (whose secure TLSA records
  match nothing), and its own host has TLSA records that match nothing either.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common.config import Dns, Tls
from zmta_common.mx import MxLookup
from zmta_devtools.servers import Nsd, RedisServer, Unbound, free_port
from zmta_devtools.sink import Sink
from zmta_sender.connections import ConnectionPool
from zmta_sender.dane import Dane, DaneLookupError, spki
from zmta_sender.errors import DeliveryError
from zmta_sender.mx import MxResolver
from zmta_sender.outgoing import wire_chunks
from zmta_sender.smtp_client import Accepted, Attempt, deliver
from zmta_sender.tls import OPPORTUNISTIC, TlsContexts, TlsPolicy

HOSTS = ["mx-ee", "mx-ta", "mx-bad", "mx-pkix", "mx-bogus"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def der(pem: trustme.Blob) -> bytes:
    return x509.load_pem_x509_certificate(pem.bytes()).public_bytes(Encoding.DER)


class Certificates:
    """A root CA, an intermediate, and the sink's certificate from the intermediate (for every host)."""

    def __init__(self) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        self.leaf = self.intermediate.issue_cert(*(f"{host}.dane.test" for host in HOSTS), "mx.insecure.test")
        self.leaf_spki = spki(x509.load_pem_x509_certificate(self.leaf.cert_chain_pems[0].bytes()))
        self.root_spki = spki(x509.load_pem_x509_certificate(self.root.cert_pem.bytes()))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf.configure_cert(context)  # presents the leaf and the intermediate
        return context


def dane_records(certs: Certificates, port: int) -> list[str]:
    tlsa = f"_{port}._tcp"
    return [
        "good MX 10 mx-ee",
        "ta MX 10 mx-ta",
        "mismatch MX 10 mx-bad",
        "pkix MX 10 mx-pkix",
        "bogus MX 10 mx-bogus",
        "backup MX 10 mx-bogus",
        "backup MX 20 mx-ee",
        "offsite MX 10 mx.insecure.test.",
        *(f"{host} A 127.0.0.1" for host in HOSTS),
        f"{tlsa}.mx-ee TLSA 3 1 1 {sha256(certs.leaf_spki)}",
        f"{tlsa}.mx-ta TLSA 2 0 1 {sha256(der(certs.intermediate.cert_pem))}",
        f"{tlsa}.mx-bad TLSA 3 1 1 {'00' * 32}",
        f"{tlsa}.mx-bad TLSA 2 1 1 {sha256(certs.root_spki)}",  # the root is not presented
        f"{tlsa}.mx-pkix TLSA 1 1 1 {sha256(certs.leaf_spki)}",
        f"{tlsa}.mx-pkix TLSA 0 0 1 {sha256(der(certs.root.cert_pem))}",
        f"{tlsa}.mx-bogus TLSA 3 1 1 {sha256(certs.leaf_spki)}",
    ]


@pytest.fixture(scope="module")
def certs() -> Certificates:
    return Certificates()


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    server = Sink("127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolver(certs: Certificates, sink: Sink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    """unbound, validating the zones NSD serves."""
    nsd = Nsd(tmp_path_factory.mktemp("nsd"))
    nsd.add_zone("dane.test", dane_records(certs, sink.port), bogus=[(f"_{sink.port}._tcp.mx-bogus.dane.test", "TLSA")])
    nsd.add_zone("expired.test", ["@ MX 10 mx", "mx A 127.0.0.1"], expired=True)
    insecure = ["@ MX 10 mx-bad.dane.test.", "mx A 127.0.0.1", f"_{sink.port}._tcp.mx TLSA 3 1 1 {'00' * 32}"]
    nsd.add_zone("insecure.test", insecure, signed=False)
    unbound = Unbound(tmp_path_factory.mktemp("unbound"))
    unbound.serve(nsd)
    try:
        nsd.start()
        unbound.start()
        yield unbound
    finally:
        unbound.stop()
        nsd.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def dns_config(resolver: Unbound) -> Dns:
    return Dns(nameservers=[resolver.host], port=resolver.port, timeout=2, dnssec=True)


@pytest.fixture
def dane(dns_config: Dns, redis: Redis) -> Dane:
    return Dane(dns_config, Tls(), redis)


@pytest.fixture
def tls_sink(sink: Sink, certs: Certificates) -> Sink:
    """The sink, emptied, offering STARTTLS with its certificate chain."""
    sink.reset()
    sink.use_tls(certs.server_context())
    return sink


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool()
    yield connections
    await connections.close_all()


async def body() -> AsyncIterator[bytes]:
    async def source() -> AsyncIterator[bytes]:
        yield b"DANE.\r\n"

    async for chunk in wire_chunks(b"Subject: dane\r\n", source()):
        yield chunk


async def send(dane: Dane, dns_config: Dns, sink: Sink, pool: ConnectionPool, recipient: str) -> Accepted:
    """One delivery to ``recipient``, as the sender makes it."""
    domain = recipient.partition("@")[2]
    targets = await MxResolver(MxLookup(dns_config)).targets(domain, sink.port, ipv6=False)
    tls, targets = await dane.apply(domain, TlsPolicy(OPPORTUNISTIC, TlsContexts(None)), targets)
    attempt = Attempt("s@origin.test", recipient, "client.test", None, 5, 5, tls)
    return await deliver(attempt, targets, body, pool, None)


Setup = tuple[Dane, Dns, Sink, ConnectionPool]


@pytest.fixture
def setup(dane: Dane, dns_config: Dns, tls_sink: Sink, pool: ConnectionPool) -> Setup:
    return dane, dns_config, tls_sink, pool


async def test_secure_records_are_found_and_cached_for_their_ttl(setup: Setup, redis: Redis) -> None:
    dane, _, sink, _ = setup
    assert await dane.mx_secure("good.dane.test")
    host = await dane.host("mx-ee.dane.test", sink.port)
    assert [str(r)[:6] for r in host.records] == ["3 1 1 "]
    key = redis_keys.tlsa("mx-ee.dane.test", sink.port)
    assert await redis.get(redis_keys.dane("good.dane.test")) == b"secure"
    assert 0 < await redis.ttl(key) <= 60  # the zone's TTL
    # From the cache now: what Redis says is what counts.
    await redis.set(key, '{"records": [[3, 1, 1, "ff"]]}')
    assert [str(r) for r in (await dane.host("mx-ee.dane.test", sink.port)).records] == ["3 1 1 ff"]


async def test_dane_ee_delivers_over_authenticated_tls(setup: Setup) -> None:
    accepted = await send(*setup, "x@good.dane.test")
    assert accepted.tls.dane == "DANE-EE" and accepted.tls.verified
    assert str(accepted.tls).endswith("verified=yes dane=DANE-EE")
    assert setup[2].messages[0].tls.startswith("TLSv1.")


async def test_dane_ta_delivers_with_the_presented_intermediate_as_anchor(setup: Setup) -> None:
    accepted = await send(*setup, "x@ta.dane.test")
    assert (accepted.tls.dane, accepted.tls.verified) == ("DANE-TA", True)


async def test_a_certificate_matching_no_record_defers_and_nothing_is_sent(setup: Setup) -> None:
    with pytest.raises(DeliveryError) as error:
        await send(*setup, "x@mismatch.dane.test")
    assert str(error.value) == (
        "451 4.7.5 DANE: certificate of mx-bad.dane.test[127.0.0.1] matches none of its 2 TLSA records"
    )
    assert error.value.category == "tls" and not error.value.permanent
    assert setup[2].messages == []


async def test_a_dane_host_without_starttls_defers(setup: Setup) -> None:
    setup[2].use_tls(None)
    with pytest.raises(DeliveryError) as error:
        await send(*setup, "x@good.dane.test")
    assert str(error.value) == (
        "451 4.7.5 DANE: mx-ee.dane.test[127.0.0.1] does not offer STARTTLS, which its TLSA records require"
    )
    assert setup[2].messages == []


async def test_unusable_records_demand_tls_but_no_certificate_check(setup: Setup) -> None:
    accepted = await send(*setup, "x@pkix.dane.test")
    assert (accepted.tls.dane, accepted.tls.verified) == ("unusable", False)
    await setup[3].close_all()  # else the next one goes over the parked connection, as it may
    setup[2].use_tls(None)
    with pytest.raises(DeliveryError, match="does not offer STARTTLS, which its TLSA records require"):
        await send(*setup, "y@pkix.dane.test")
    assert len(setup[2].messages) == 1


async def test_a_bogus_tlsa_answer_defers_and_is_not_cached(setup: Setup, redis: Redis) -> None:
    port = setup[2].port
    with pytest.raises(DeliveryError) as error:
        await send(*setup, "x@bogus.dane.test")
    assert str(error.value).startswith(f"451 4.7.5 DANE: TLSA lookup error for mx-bogus.dane.test:{port} (SERVFAIL")
    assert setup[2].messages == []
    assert await redis.get(redis_keys.tlsa("mx-bogus.dane.test", port)) is None


async def test_a_host_with_bogus_records_is_skipped_for_the_next_one(setup: Setup) -> None:
    accepted = await send(*setup, "x@backup.dane.test")
    assert (accepted.target.host, accepted.tls.dane) == ("mx-ee.dane.test", "DANE-EE")


async def test_a_bogus_mx_answer_defers(setup: Setup) -> None:
    dane = setup[0]
    with pytest.raises(DeliveryError, match=r"DNS lookup of expired\.test failed") as error:
        await send(*setup, "x@expired.test")  # the MX lookup itself fails first
    assert error.value.category == "dns" and not error.value.permanent
    with pytest.raises(DaneLookupError, match=r"MX lookup error for expired\.test \(SERVFAIL"):
        await dane.mx_secure("expired.test")


async def test_an_insecure_mx_means_no_dane(setup: Setup, redis: Redis) -> None:
    # Its MX host has secure records that match nothing; the MX answer being insecure, they do not count.
    accepted = await send(*setup, "x@insecure.test")
    assert (accepted.target.host, accepted.tls.dane, accepted.tls.verified) == ("mx-bad.dane.test", "", False)
    assert accepted.tls.version.startswith("TLSv1.")
    assert await redis.get(redis_keys.dane("insecure.test")) == b"insecure"


async def test_an_insecure_mx_host_means_no_dane(setup: Setup) -> None:
    accepted = await send(*setup, "x@offsite.dane.test")
    assert (accepted.target.host, accepted.tls.dane) == ("mx.insecure.test", "")
    assert (await setup[0].host("mx.insecure.test", setup[2].port)).records == ()


def test_the_resolver_validates(resolver: Unbound) -> None:
    """What the tests stand on: unbound sets AD on the signed zone's answers, and not elsewhere."""

    def flags(name: str, rdtype: str) -> tuple[str, bool]:
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        response = dns.query.udp(query, resolver.host, port=resolver.port, timeout=2)
        return dns.rcode.to_text(response.rcode()), bool(response.flags & dns.flags.AD)

    assert flags("good.dane.test", "MX") == ("NOERROR", True)
    assert flags("insecure.test", "MX") == ("NOERROR", False)
    assert flags("expired.test", "MX") == ("SERVFAIL", False)
