"""Outbound TLS: the zone and domain ``tls`` modes against sinks that offer STARTTLS, and
MTA-STS policies served over HTTPS (port 443 on Infra.sts_address) for the MTA_STS domains.

Certificates come from trustme: ``ca`` is the test CA that the deployments trust
(``tls.ca_file``), and its certificate for the sinks names every MX host of the test
domains; ``self_signed`` serves a certificate nobody trusts.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest
import trustme
from redis.asyncio import Redis

from tests.support import (
    MTA_STS,
    MX_HOSTS,
    STS_ID,
    Deployment,
    DeploymentFactory,
    Infra,
    deferred_reason,
    eventually,
    log_entries,
    send_one,
)

MX_NAMES = [f"mx.{domain}" for domain in (*MX_HOSTS, *MTA_STS)]
POLICIES = {
    "sts.test": "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmax_age: 86400\r\n",
    "sts-mismatch.test": "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n",
    "sts-testing.test": "version: STSv1\nmode: testing\nmx: mail.elsewhere.test\nmax_age: 86400\n",
}


@pytest.fixture(scope="module")
def trusted(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate of the test CA for every MX host name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*MX_NAMES).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context whose certificate is signed by itself (a CA certificate nobody trusts)."""
    own = trustme.CA()
    folder = tmp_path_factory.mktemp("self-signed")
    own.cert_pem.write_to_path(str(folder / "cert.pem"))
    own.private_key_pem.write_to_path(str(folder / "key.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


class PolicyServer:
    """https://mta-sts.<domain>/.well-known/mta-sts.txt for the MTA_STS domains, on port 443."""

    def __init__(self, address: str, context: ssl.SSLContext) -> None:
        self.policies = dict(POLICIES)
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").removeprefix("mta-sts.")
                server.requests.append(f"{host}{self.path}")
                policy = server.policies.get(host)
                if self.path != "/.well-known/mta-sts.txt" or policy is None:
                    self.send_error(404)
                    return
                body = policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 443), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def fetches(self, domain: str) -> int:
        return self.requests.count(f"{domain}/.well-known/mta-sts.txt")


@pytest.fixture(scope="module")
def policy_server(infra: Infra, ca: trustme.CA) -> Iterator[PolicyServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(f"mta-sts.{domain}" for domain in MTA_STS)).configure_cert(context)
    server = PolicyServer(infra.sts_address, context)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def policies(policy_server: PolicyServer) -> PolicyServer:
    """The policy server with the standard policies and no requests seen, for one test."""
    policy_server.policies = dict(POLICIES)
    policy_server.requests.clear()
    return policy_server


def sender_events(d: Deployment, event: str) -> list[dict[str, Any]]:
    return log_entries(d.log_dir / "sender-default-0.log", event)


async def sender_metrics(d: Deployment) -> str:
    port = d.system.get("sender-default-0").ready_port
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/metrics")).text


async def test_opportunistic_tls_takes_a_self_signed_certificate_unverified(
    deploy: DeploymentFactory, sinks: dict, self_signed: ssl.SSLContext
) -> None:
    d = await deploy()
    sink = sinks["127.0.0.2"]
    sink.use_tls(self_signed)
    await send_one(d, "x@a.test", "tls")
    await eventually(lambda: sink.messages, what="the delivery")
    assert sink.messages[0].tls.startswith("TLSv1.")

    (delivered,) = await eventually(lambda: sender_events(d, "delivered"), what="the delivery log line")
    assert re.fullmatch(r"version=TLSv1\.[23] cipher=\S+ verified=no", delivered["tls"]), delivered
    version = delivered["tls"].split()[0].removeprefix("version=")
    metrics = await sender_metrics(d)
    assert f'zonemta_delivery_tls{{verified="no",version="{version}",zone="default"}} 1.0' in metrics


async def test_required_tls_defers_an_untrusted_certificate(
    deploy: DeploymentFactory, sinks: dict, self_signed: ssl.SSLContext
) -> None:
    d = await deploy({"zones": {"default": {"domains": {"a.test": {"tls": "required"}}}}})
    sinks["127.0.0.2"].use_tls(self_signed)
    message_id = await send_one(d, "x@a.test", "tls")
    reason = await deferred_reason(d, message_id)
    assert reason == "TLS required by policy: mx.a.test[127.0.0.2] certificate verify failed: self-signed certificate"
    assert sinks["127.0.0.2"].messages == []
    # Connections that failed their handshake are counted closed by the sink as well.
    await eventually(lambda: sinks["127.0.0.2"].handler.open_now == 0, what="the failed connections closed")


async def test_required_tls_defers_a_server_without_starttls(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"tls": "required"}}})
    message_id = await send_one(d, "x@a.test", "tls")
    reason = await deferred_reason(d, message_id)
    assert reason == "TLS required by policy but mx.a.test[127.0.0.2] does not offer STARTTLS"
    assert sinks["127.0.0.2"].messages == []


async def test_required_tls_delivers_with_a_certificate_of_the_configured_ca(
    deploy: DeploymentFactory, sinks: dict, trusted: ssl.SSLContext, ca_file: str
) -> None:
    d = await deploy({"tls": {"ca_file": ca_file}, "zones": {"default": {"tls": "required"}}})
    sink = sinks["127.0.0.2"]
    sink.use_tls(trusted)
    await send_one(d, "x@a.test", "tls")
    await eventually(lambda: sink.messages, what="the delivery")
    assert sink.messages[0].tls.startswith("TLSv1.")
    (delivered,) = await eventually(lambda: sender_events(d, "delivered"), what="the delivery log line")
    assert delivered["tls"].endswith("verified=yes")


async def test_tls_none_sends_plain_text_to_a_server_offering_starttls(
    deploy: DeploymentFactory, sinks: dict, trusted: ssl.SSLContext
) -> None:
    # The zone says none; b.test's own entry overrides it back to opportunistic.
    d = await deploy({"zones": {"default": {"tls": "none", "domains": {"b.test": {"tls": "opportunistic"}}}}})
    for ip in ("127.0.0.2", "127.0.0.3"):
        sinks[ip].use_tls(trusted)
    await send_one(d, "x@a.test", "tls")
    await send_one(d, "y@b.test", "tls")
    await eventually(lambda: sinks["127.0.0.2"].messages and sinks["127.0.0.3"].messages, what="both deliveries")
    assert sinks["127.0.0.2"].messages[0].tls == ""
    assert sinks["127.0.0.3"].messages[0].tls.startswith("TLSv1.")
    events = await eventually(lambda: len(sender_events(d, "delivered")) == 2 and sender_events(d, "delivered"))
    assert sorted(e["tls"] == "none" for e in events) == [False, True]


async def test_mta_sts_enforce_defers_when_no_mx_matches(
    deploy: DeploymentFactory, sinks: dict, policies: PolicyServer, ca_file: str
) -> None:
    d = await deploy({"tls": {"ca_file": ca_file}})
    message_id = await send_one(d, "x@sts-mismatch.test", "tls")
    reason = await deferred_reason(d, message_id)
    assert reason == "MTA-STS policy of sts-mismatch.test (enforce) allows none of its MX hosts: mx.sts-mismatch.test"
    assert sinks["127.0.0.3"].messages == []


async def test_mta_sts_enforce_delivers_over_verified_tls_and_caches_the_policy(
    deploy: DeploymentFactory, sinks: dict, policies: PolicyServer, ca_file: str, trusted: ssl.SSLContext
) -> None:
    d = await deploy({"tls": {"ca_file": ca_file}})
    sink = sinks["127.0.0.3"]
    sink.use_tls(trusted)
    for n in range(3):
        await send_one(d, f"x{n}@sts.test", "tls")
    await eventually(lambda: len(sink.messages) == 3, what="the deliveries")
    assert all(m.tls.startswith("TLSv1.") for m in sink.messages)
    events = await eventually(lambda: len(sender_events(d, "delivered")) == 3 and sender_events(d, "delivered"))
    assert all(e["tls"].endswith("verified=yes") for e in events)
    assert policies.fetches("sts.test") == 1  # then from the cache

    redis = Redis.from_url(d.config.dbs.redis)
    try:
        cached = json.loads(cast(bytes, await redis.get("zmta:sts:sts.test")))
        ttl = await redis.ttl("zmta:sts:sts.test")
    finally:
        await redis.aclose()
    assert cached == {
        "id": STS_ID,
        "policy": {"version": "STSv1", "mode": "enforce", "mx": ["*.sts.test"], "max_age": 86400},
    }
    assert 86000 < ttl <= 86400


async def test_mta_sts_enforce_defers_an_untrusted_certificate(
    deploy: DeploymentFactory, sinks: dict, policies: PolicyServer, ca_file: str, self_signed: ssl.SSLContext
) -> None:
    d = await deploy({"tls": {"ca_file": ca_file}})
    sinks["127.0.0.3"].use_tls(self_signed)
    message_id = await send_one(d, "x@sts.test", "tls")
    reason = await deferred_reason(d, message_id)
    assert reason == (
        "TLS required by MTA-STS policy of sts.test: mx.sts.test[127.0.0.3] certificate verify failed: "
        "self-signed certificate"
    )


async def test_mta_sts_cached_policy_is_used_until_the_txt_id_changes(
    deploy: DeploymentFactory, sinks: dict, policies: PolicyServer, ca_file: str, trusted: ssl.SSLContext
) -> None:
    d = await deploy({"tls": {"ca_file": ca_file}})
    sinks["127.0.0.3"].use_tls(trusted)
    redis = Redis.from_url(d.config.dbs.redis)
    stale = {"version": "STSv1", "mode": "enforce", "mx": ["mail.elsewhere.test"], "max_age": 86400}
    try:
        # The same id as in DNS: the cached policy holds, even though the served one differs.
        await redis.set("zmta:sts:sts.test", json.dumps({"id": STS_ID, "policy": stale}), ex=600)
        message_id = await send_one(d, "x@sts.test", "tls")
        reason = await deferred_reason(d, message_id)
        assert reason.startswith("MTA-STS policy of sts.test (enforce) allows none of its MX hosts")
        assert policies.fetches("sts.test") == 0

        # Another id: the policy is fetched again, and the delivery goes.
        await redis.set("zmta:sts:sts.test", json.dumps({"id": "older1", "policy": stale}), ex=600)
        await send_one(d, "y@sts.test", "tls")
        await eventually(lambda: sinks["127.0.0.3"].messages, what="the delivery under the new policy")
        assert policies.fetches("sts.test") == 1
        assert json.loads(cast(bytes, await redis.get("zmta:sts:sts.test")))["id"] == STS_ID
    finally:
        await redis.aclose()


async def test_mta_sts_testing_mode_and_unavailable_policies_do_not_hold_mail(
    deploy: DeploymentFactory, sinks: dict, policies: PolicyServer, ca_file: str
) -> None:
    del policies.policies["sts-mismatch.test"]  # its policy host answers 404 now
    d = await deploy({"tls": {"ca_file": ca_file}})
    await send_one(d, "x@sts-testing.test", "tls")
    await send_one(d, "y@sts-mismatch.test", "tls")
    await eventually(lambda: len(sinks["127.0.0.3"].messages) == 2, what="both deliveries")
    (warning,) = sender_events(d, "mta-sts testing: mx not in policy")
    assert (warning["domain"], warning["mx"]) == ("sts-testing.test", ["mx.sts-testing.test"])
    (unavailable,) = sender_events(d, "mta-sts policy unavailable")
    assert unavailable["domain"] == "sts-mismatch.test" and "404" in unavailable["error"]
