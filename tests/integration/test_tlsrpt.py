"""TLS reporting (RFC 8460) in the senders (zmta_sender.tlsrpt): the sessions of real
deliveries (smtp_client.deliver against the scripted SMTP server of test_smtp_session, over
real TLS) under MTA-STS and DANE, counted in a real Redis by result type; policies that cannot
be fetched from a real HTTPS server (MtaSts, the test DNS) and failed DNSSEC lookups (Dane).
Then the bounce service's daily round (zmta_bounce.tlsrpt.TlsReporter): which days, and each
domain's day taken once across replicas (the report itself: tests/e2e/test_tls_reporting.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.integration.test_smtp_session import MX, ScriptedServer, attempt, body, server_context, target
from tests.support import Infra
from zmta_bounce.tlsrpt import TlsReporter
from zmta_common import redis_keys
from zmta_common import tlsrpt as counts
from zmta_common.bus import Bus
from zmta_common.config import Dns, Tls, load_config
from zmta_common.store import Store
from zmta_devtools.servers import free_port
from zmta_sender.connections import ConnectionPool
from zmta_sender.dane import Dane, HostDane, Tlsa
from zmta_sender.errors import DeliveryError
from zmta_sender.mta_sts import MtaSts, StsPolicy, apply
from zmta_sender.mx import Target
from zmta_sender.smtp_client import deliver
from zmta_sender.tls import OPPORTUNISTIC, REQUIRED, TlsContexts, TlsPolicy
from zmta_sender.tlsrpt import Recorder

DOMAIN = "session.test"  # the recipients' domain (rcpt@session.test); its MX host is MX
ENFORCE = StsPolicy("enforce", 86400, ("*.session.test",), "id1")
TESTING_ELSEWHERE = StsPolicy("testing", 86400, ("mail.elsewhere.test",), "id2")
RETENTION_DAYS = 3


@pytest.fixture
async def recorder(redis: Redis) -> AsyncIterator[Recorder]:
    found = Recorder(redis, RETENTION_DAYS)
    yield found
    await found.close()


@pytest.fixture
def contexts(ca: trustme.CA, tmp_path: Path, recorder: Recorder) -> TlsContexts:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TlsContexts(str(ca_file), recorder)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool()
    yield connections
    await connections.close_all()


def leaf_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


async def counted(recorder: Recorder, redis: Redis, domain: str = DOMAIN) -> list[dict[str, Any]]:
    """What the recorder wrote for ``domain`` today, as the report's ``policies``."""
    await recorder.close()  # written now
    fields = await redis.hgetall(redis_keys.tlsrpt(counts.day_of(), domain))
    return counts.policies({text(k): text(v) for k, v in fields.items()})


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def sts_policy_object(policy: StsPolicy) -> dict[str, Any]:
    lines = ["version: STSv1", f"mode: {policy.mode}", *(f"mx: {mx}" for mx in policy.mx), "max_age: 86400"]
    return {"policy-type": "sts", "policy-string": lines, "policy-domain": DOMAIN, "mx-host": list(policy.mx)}


def failure(result: str, reason: str, count: int = 1, mx: str = MX, ip: str = "127.0.0.1") -> dict[str, Any]:
    found = {"result-type": result, "receiving-mx-hostname": mx, "failure-reason-code": reason}
    found |= {"sending-mta-ip": ip, "receiving-ip": "127.0.0.1"} if ip else {}
    return found | {"failed-session-count": count}


async def test_sessions_under_an_enforce_policy_are_counted_per_domain_and_day(
    server: ScriptedServer,
    ca: trustme.CA,
    contexts: TlsContexts,
    pool: ConnectionPool,
    recorder: Recorder,
    redis: Redis,
) -> None:
    server.tls = server_context(ca, [])
    tls, targets = apply(ENFORCE, DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), target(server))
    assert tls.mode == REQUIRED and tls.sts == ENFORCE
    await deliver(attempt(tls), targets, body, pool, None)
    await deliver(attempt(tls), targets, body, pool, None)  # over the parked connection: no new session
    assert len(server.messages) == 2

    assert await counted(recorder, redis) == [
        {
            "policy": sts_policy_object(ENFORCE),
            "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
            "failure-details": [],
        }
    ]
    day = counts.day_of()
    assert await redis.smembers(redis_keys.tlsrpt_domains(day)) == {DOMAIN.encode()}
    for key in (redis_keys.tlsrpt(day, DOMAIN), redis_keys.tlsrpt_domains(day)):
        assert RETENTION_DAYS * 86400 - 60 < await redis.ttl(key) <= RETENTION_DAYS * 86400


@pytest.mark.parametrize(
    ("setup", "result", "reason"),
    [
        ("untrusted", "certificate-not-trusted", "certificate verify failed: unable to get local issuer certificate"),
        (
            "other-name",
            "certificate-host-mismatch",
            f"certificate verify failed: Hostname mismatch, certificate is not valid for '{MX}'.",
        ),
        ("expired", "certificate-expired", "certificate verify failed: certificate has expired"),
        ("plain", "starttls-not-supported", "no STARTTLS"),
        ("refused", "starttls-not-supported", "refused STARTTLS: 454 4.7.0 TLS not available"),
    ],
)
async def test_failed_sessions_under_an_enforce_policy_by_result_type(
    server: ScriptedServer,
    ca: trustme.CA,
    contexts: TlsContexts,
    pool: ConnectionPool,
    recorder: Recorder,
    redis: Redis,
    setup: str,
    result: str,
    reason: str,
) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    server.tls = {
        "untrusted": server_context(trustme.CA(), []),
        "other-name": leaf_context(ca.issue_cert("mx.other.test")),
        "expired": leaf_context(ca.issue_cert(MX, not_before=yesterday - timedelta(days=9), not_after=yesterday)),
        "plain": None,
        "refused": server_context(ca, []),
    }[setup]
    server.replies["STARTTLS"] = ["454 4.7.0 TLS not available"] if setup == "refused" else []
    tls, targets = apply(ENFORCE, DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), target(server))
    with pytest.raises(DeliveryError, match=r"^TLS required by MTA-STS policy of session\.test"):
        await deliver(attempt(tls), targets, body, pool, None)
    (policy,) = await counted(recorder, redis)
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert policy["failure-details"] == [failure(result, reason)]


async def test_an_enforce_policy_that_allows_no_mx_counts_a_failure(
    contexts: TlsContexts, recorder: Recorder, redis: Redis
) -> None:
    policy = StsPolicy("enforce", 86400, ("mail.elsewhere.test",), "id3")
    targets = [Target(MX, "192.0.2.1", 25)]
    with pytest.raises(DeliveryError, match="allows none of its MX hosts"):
        apply(policy, DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), targets)
    (counted_policy,) = await counted(recorder, redis)
    assert counted_policy["policy"] == sts_policy_object(policy)
    assert counted_policy["failure-details"] == [
        {
            "result-type": "validation-failure",
            "receiving-mx-hostname": MX,
            "receiving-ip": "192.0.2.1",
            "failure-reason-code": "mx-not-in-policy",
            "failed-session-count": 1,
        }
    ]


async def test_a_testing_policy_counts_failures_and_mail_still_goes(
    server: ScriptedServer, ca: trustme.CA, contexts: TlsContexts, recorder: Recorder, redis: Redis
) -> None:
    async def once() -> None:
        tls, targets = apply(TESTING_ELSEWHERE, DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), target(server))
        assert tls.mode == OPPORTUNISTIC and tls.sts == TESTING_ELSEWHERE
        pool = ConnectionPool()
        try:
            await deliver(attempt(tls), targets, body, pool, None)
        finally:
            await pool.close_all()

    await once()  # plain text
    server.tls = server_context(ca, [])
    await once()  # verified TLS, but the MX host is not in the policy
    server.tls = server_context(trustme.CA(), [])
    await once()  # unverified TLS: the certificate failed
    await once()  # again, the verified try skipped: the server is remembered as unverifiable
    assert len(server.messages) == 4

    (policy,) = await counted(recorder, redis)
    assert policy["policy"] == sts_policy_object(TESTING_ELSEWHERE)
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 4}
    untrusted = "certificate verify failed: unable to get local issuer certificate"
    assert policy["failure-details"] == [
        failure("certificate-not-trusted", untrusted, count=2),
        failure("validation-failure", "mx-not-in-policy"),
        failure("starttls-not-supported", "no STARTTLS"),
    ]


async def test_sessions_without_a_policy_are_not_counted(
    server: ScriptedServer,
    ca: trustme.CA,
    contexts: TlsContexts,
    pool: ConnectionPool,
    recorder: Recorder,
    redis: Redis,
) -> None:
    server.tls = server_context(ca, [])
    await deliver(attempt(TlsPolicy(OPPORTUNISTIC, contexts)), target(server), body, pool, None)
    await deliver(attempt(TlsPolicy(REQUIRED, contexts)), target(server), body, ConnectionPool(), None)
    tls, targets = apply(None, DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), target(server))
    await deliver(attempt(tls), targets, body, pool, None)
    await recorder.close()
    assert await redis.dbsize() == 0


def spki_sha256(cert: trustme.LeafCert) -> bytes:
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    return hashlib.sha256(leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


@pytest.mark.parametrize(
    ("records", "result", "reason"),
    [
        ("match", "", ""),
        ("wrong", "validation-failure", "certificate matches none of its 1 TLSA records"),
        ("pkix", "tlsa-invalid", "no usable TLSA record (PKIX usages only)"),
    ],
)
async def test_sessions_under_dane_are_counted_with_the_tlsa_records(
    server: ScriptedServer,
    ca: trustme.CA,
    contexts: TlsContexts,
    pool: ConnectionPool,
    recorder: Recorder,
    redis: Redis,
    records: str,
    result: str,
    reason: str,
) -> None:
    cert = ca.issue_cert(MX)
    server.tls = leaf_context(cert)
    digest = spki_sha256(cert)
    tlsa = {
        "match": Tlsa(3, 1, 1, digest),
        "wrong": Tlsa(3, 1, 1, hashlib.sha256(b"another key").digest()),
        "pkix": Tlsa(1, 1, 1, digest),
    }[records]
    dane = HostDane(MX, server.port, (tlsa,))
    tls = TlsPolicy(OPPORTUNISTIC, contexts, dane={MX: dane})
    if records == "wrong":
        with pytest.raises(DeliveryError, match=r"^451 4\.7\.5 DANE: certificate of"):
            await deliver(attempt(tls), target(server), body, pool, None)
    else:
        await deliver(attempt(tls), target(server), body, pool, None)
    (policy,) = await counted(recorder, redis)
    assert policy["policy"] == {
        "policy-type": "tlsa",
        "policy-string": [str(tlsa)],
        "policy-domain": DOMAIN,
        "mx-host": [MX],
    }
    ok = 0 if result else 1
    assert policy["summary"] == {"total-successful-session-count": ok, "total-failure-session-count": 1 - ok}
    assert policy["failure-details"] == ([failure(result, reason)] if result else [])


async def test_a_failed_dnssec_lookup_counts_for_dane(contexts: TlsContexts, recorder: Recorder, redis: Redis) -> None:
    # No nameserver answers: the validating resolver's lookup fails, as it does for bogus answers.
    dane = Dane(Dns(nameservers=["127.0.0.1"], port=free_port(), timeout=1, dnssec=True), Tls(), None)
    with pytest.raises(DeliveryError, match=r"^451 4\.7\.5 DANE: MX lookup error for session\.test"):
        await dane.apply(DOMAIN, TlsPolicy(OPPORTUNISTIC, contexts), [Target(MX, "192.0.2.1", 25)])
    (policy,) = await counted(recorder, redis)
    assert policy["policy"] == {"policy-type": "tlsa", "policy-string": [], "policy-domain": DOMAIN, "mx-host": []}
    (detail,) = policy["failure-details"]
    assert detail["result-type"] == "dnssec-invalid" and detail["failed-session-count"] == 1
    assert detail["failure-reason-code"].startswith("MX lookup error for session.test")


class PolicyHost:
    """https://mta-sts.<domain>/.well-known/mta-sts.txt on port 443 of Infra.sts_address, where the
    test DNS points the MTA_STS domains: a policy per domain, and a certificate nobody trusts
    for the domains in ``untrusted``."""

    def __init__(self, address: str, trusted: ssl.SSLContext, untrusted: ssl.SSLContext, names: set[str]) -> None:
        self.policies: dict[str, str] = {}

        def choose(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if name in names:
                sock.context = untrusted

        trusted.sni_callback = choose
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                policy = host.policies.get((self.headers.get("Host") or "").removeprefix("mta-sts."))
                if policy is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(policy)))
                self.end_headers()
                self.wfile.write(policy.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 443), Handler)
        self.httpd.socket = trusted.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def policy_host(infra: Infra, ca: trustme.CA) -> Iterator[PolicyHost]:
    names = [f"mta-sts.{domain}" for domain in ("sts.test", "sts-mismatch.test", "sts-testing.test")]
    host = PolicyHost(
        infra.sts_address,
        leaf_context(ca.issue_cert(*names)),
        leaf_context(trustme.CA().issue_cert(*names)),
        {"mta-sts.sts-testing.test"},
    )
    host.thread.start()
    yield host
    host.httpd.shutdown()
    host.httpd.server_close()


@pytest.mark.parametrize(
    ("domain", "result", "reason"),
    [
        ("sts.test", "sts-policy-invalid", "mode 'sometimes' is not one of enforce, testing, none"),
        ("sts-mismatch.test", "sts-policy-fetch-error", "answered HTTP 404"),
        ("sts-testing.test", "sts-webpki-invalid", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
async def test_an_mta_sts_policy_that_cannot_be_had_is_counted_once_per_delivery(
    infra: Infra,
    policy_host: PolicyHost,
    ca: trustme.CA,
    tmp_path: Path,
    recorder: Recorder,
    redis: Redis,
    domain: str,
    result: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy_host.policies = {"sts.test": "version: STSv1\nmode: sometimes\nmx: *.sts.test\nmax_age: 86400\n"}
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sts = MtaSts(
        Dns(nameservers=["127.0.0.1"], port=infra.dns.port, timeout=2), None, Tls(ca_file=str(ca_file)), recorder
    )
    try:
        with caplog.at_level(logging.WARNING, "zmta_sender.mta_sts"):
            assert await sts.policy(domain) is None
            assert await sts.policy(domain) is None  # not fetched again for a while, and counted again
    finally:
        await sts.close()
    (policy,) = await counted(recorder, redis, domain)
    assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": domain}
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 2}
    (detail,) = policy["failure-details"]
    assert detail["result-type"] == result and detail["failed-session-count"] == 2
    assert reason in detail["failure-reason-code"]
    assert len([r for r in caplog.records if r.getMessage() == "mta-sts policy unavailable"]) == 1


async def test_counts_redis_refuses_are_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    redis = Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))  # nothing listens there
    recorder = Recorder(redis, RETENTION_DAYS)
    try:
        with caplog.at_level(logging.WARNING, "zmta_sender.tlsrpt"):
            recorder.record(DOMAIN, json.dumps({"policy-type": "sts"}))
            await recorder.close()
    finally:
        await redis.aclose()
    (lost,) = [r for r in caplog.records if r.getMessage() == "tls reporting counts lost"]
    assert lost.__dict__["sessions"] == 1


async def test_the_daily_round_takes_each_domain_of_a_day_once_across_replicas(
    infra: Infra, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Counts of yesterday for two domains; neither has a usable _smtp._tls record, so no store or
    # bus is needed: a.test has none, sts-mismatch.test one of a version nobody speaks.
    now = datetime.now(UTC).replace(hour=5)
    yesterday = (now - timedelta(days=1)).date()
    for domain in ("a.test", "sts-mismatch.test"):
        key = redis_keys.tlsrpt(yesterday.isoformat(), domain)
        await redis.hset(key, mapping={"policy:k": json.dumps({"policy-type": "sts"}), "ok:k": 1})
        await redis.sadd(redis_keys.tlsrpt_domains(yesterday.isoformat()), domain)
    config = load_config(
        None,
        hostname="mta.test",
        dns={"nameservers": ["127.0.0.1"], "port": infra.dns.port, "timeout": 2},
        tls_reporting={"enabled": True, "hour": 6},
    )
    store, bus = cast(Store, None), cast(Bus, None)
    first, second = TlsReporter(config, store, bus, redis), TlsReporter(config, store, bus, redis)
    with caplog.at_level(logging.INFO, "zmta_bounce.tlsrpt"):
        await first.tick(now)  # 05:00: the day before yesterday only, which has nothing
        assert not [r for r in caplog.records if r.getMessage() == "tls report skipped"]
        await first.tick(now.replace(hour=6))  # 06:00: yesterday is due
        skipped = {
            r.__dict__["domain"]: r.__dict__["reason"] for r in caplog.records if r.getMessage() == "tls report skipped"
        }
        assert skipped == {"a.test": "no TXT record at _smtp._tls", "sts-mismatch.test": "no v=TLSRPTv1 record"}
        await first.tick(now.replace(hour=7))  # done by this replica: not looked at again
        assert await second.report_day(yesterday) == {"a.test": "taken", "sts-mismatch.test": "taken"}
    marker = redis_keys.tlsrpt_sent(yesterday.isoformat(), "a.test")
    assert await redis.get(marker) == b"mta.test"
    assert 3 * 86400 - 60 < await redis.ttl(marker) <= 3 * 86400
    assert await first.report_day(date(2000, 1, 1)) == {}
