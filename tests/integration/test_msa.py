"""STARTTLS, implicit TLS, AUTH (argon2 users and an HTTP hook) and relay networks, against
the real ingest process with the standard library's SMTP client."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import argon2
import pytest
import trustme
import yaml

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory
from zmta_devtools.servers import free_port, wait_for_port

PASSWORD = "correct horse battery staple"
UNTRUSTED = ("127.0.0.9", 0)  # a loopback address outside the interfaces' relay_networks
MESSAGE = b"From: alice@origin.test\r\nTo: bob@a.test\r\nSubject: hello\r\n\r\nHello.\r\n"


@dataclass
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    issued = ca.issue_cert("mta.test", "127.0.0.1")
    directory = tmp_path_factory.mktemp("certs")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    return Certs(ca, cert, key)


@dataclass
class AuthEndpoint:
    """A tiny HTTP server in the role of the operator's auth service."""

    server: ThreadingHTTPServer
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/smtp-auth?realm=test"


@pytest.fixture(scope="module")
def auth_endpoint() -> Iterator[AuthEndpoint]:
    endpoint: AuthEndpoint

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            header = self.headers.get("Authorization", "")
            user, _, password = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
            query = parse_qs(urlsplit(self.path).query)
            endpoint.requests.append({"method": "GET", "user": user, "query": query})
            if user == "flaky":
                status = 503
            elif (user, password) == ("carol", PASSWORD):
                status = 200
            else:
                status = 403
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint = AuthEndpoint(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield endpoint
    server.shutdown()
    server.server_close()


@dataclass
class Msa:
    deployment: Deployment
    ports: dict[str, int]


@pytest.fixture(scope="module")
async def msa(module_deploy: DeploymentFactory, certs: Certs, auth_endpoint: AuthEndpoint) -> Msa:
    users = {"alice": argon2.PasswordHasher().hash(PASSWORD)}
    tls = {"tls_cert": str(certs.cert), "tls_key": str(certs.key)}
    ports = {name: free_port() for name in ("submission", "smtps", "relay", "httpauth", "httpdown", "guarded")}
    only_local = ["127.0.0.1/32"]
    interfaces = {
        "feeder": {**tls},  # the feeder keeps its loopback relay_networks and no AUTH
        "submission": {"port": ports["submission"], **tls, "auth": True, "users": users, "relay_networks": only_local},
        "smtps": {
            "port": ports["smtps"],
            **tls,
            "implicit_tls": True,
            "auth": True,
            "users": users,
            "relay_networks": only_local,
        },
        "relay": {"port": ports["relay"], "relay_networks": only_local},
        "httpauth": {
            "port": ports["httpauth"],
            "auth": True,
            "auth_without_tls": True,
            "auth_url": auth_endpoint.url,
            "auth_timeout": 5,
            "relay_networks": only_local,
        },
        "guarded": {  # tight limits on guessing, over plain text for the raw client
            "port": ports["guarded"],
            "auth": True,
            "auth_without_tls": True,
            "users": users,
            "relay_networks": only_local,
            "auth_max_failures": 3,
            "auth_concurrency": 1,
        },
        "httpdown": {  # an auth service that does not answer
            "port": ports["httpdown"],
            "auth": True,
            "auth_without_tls": True,
            "auth_url": f"http://127.0.0.1:{free_port()}/smtp-auth",
            "relay_networks": only_local,
        },
    }
    deployment = await module_deploy({"smtp_interfaces": interfaces}, senders={})
    for port in ports.values():
        wait_for_port("127.0.0.1", port)
    return Msa(deployment, ports)


def queued_id(text: bytes | str) -> str:
    match = re.search(r"queued as ([0-9a-f]+)", text.decode() if isinstance(text, bytes) else text)
    assert match, text
    return match.group(1)


def send(client: smtplib.SMTP) -> str:
    """One message over an open session; the queue id."""
    code, text = client.mail("alice@origin.test")
    assert code == 250, (code, text)
    code, text = client.rcpt("bob@a.test")
    assert code == 250, (code, text)
    code, text = client.data(MESSAGE)
    assert code == 250, (code, text)
    return queued_id(text)


def ingest_log(d: Deployment) -> str:
    path = d.system.get("ingest").log_path
    assert path is not None
    return path.read_text(errors="replace")


async def test_starttls_on_the_feeder(msa: Msa, certs: Certs) -> None:
    d = msa.deployment
    with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # the feeder has no AUTH
        code, _ = client.starttls(context=certs.client_context())  # verifies against the test CA
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        message_id = send(client)
    message = await d.store.get_message(message_id)
    assert message is not None
    assert message.meta["transtype"] == "ESMTPS"
    assert message.meta["user"] is None


async def test_auth_is_not_offered_before_starttls(msa: Msa) -> None:
    with smtplib.SMTP("127.0.0.1", msa.ports["submission"], timeout=30, source_address=UNTRUSTED) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 538
        code, text = client.mail("alice@origin.test")
    assert (code, text) == (530, b"5.7.0 Authentication required")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response", [True, False], ids=["initial-response", "challenge"])
async def test_auth_on_the_submission_port(msa: Msa, certs: Certs, mechanism: str, initial_response: bool) -> None:
    d = msa.deployment
    with smtplib.SMTP("127.0.0.1", msa.ports["submission"], timeout=30, source_address=UNTRUSTED) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        assert client.has_extn("auth")
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        client.user, client.password = "alice", PASSWORD
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, text = client.auth(mechanism, method, initial_response_ok=initial_response)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        message_id = send(client)
    message = await d.store.get_message(message_id)
    assert message is not None
    assert message.meta["user"] == "alice"
    assert message.meta["transtype"] == "ESMTPSA"
    assert message.meta["origin"] == "127.0.0.9"


async def test_wrong_password_gets_535_and_cannot_send(msa: Msa, certs: Certs) -> None:
    with smtplib.SMTP("127.0.0.1", msa.ports["submission"], timeout=30, source_address=UNTRUSTED) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("alice", "not the password")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            535,
            b"5.7.8 Authentication credentials invalid",
        )
        code, _ = client.mail("alice@origin.test")
        assert code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("mallory", PASSWORD)  # unknown user: the same answer
    log = ingest_log(msa.deployment)
    assert '"event": "auth refused"' in log
    assert '"user": "mallory"' in log
    assert "not the password" not in log


async def test_untrusted_client_without_auth_cannot_send(msa: Msa, certs: Certs) -> None:
    with smtplib.SMTP("127.0.0.1", msa.ports["submission"], timeout=30, source_address=UNTRUSTED) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        code, text = client.mail("alice@origin.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        code, _ = client.rcpt("bob@a.test")
        assert code == 503  # no transaction was opened


async def test_trusted_client_may_send_without_auth(msa: Msa) -> None:
    with smtplib.SMTP("127.0.0.1", msa.ports["submission"], timeout=30) as client:  # from 127.0.0.1
        client.ehlo("client.test")
        message_id = send(client)
    message = await msa.deployment.store.get_message(message_id)
    assert message is not None
    assert message.meta["user"] is None


async def test_implicit_tls_port(msa: Msa, certs: Certs) -> None:
    d = msa.deployment
    context = certs.client_context()
    with smtplib.SMTP_SSL(
        "127.0.0.1", msa.ports["smtps"], timeout=30, source_address=UNTRUSTED, context=context
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        code, _ = client.login("alice", PASSWORD)
        assert code == 235
        message_id = send(client)
    message = await d.store.get_message(message_id)
    assert message is not None
    assert message.meta["user"] == "alice"
    assert message.meta["interface"] == "smtps"
    log = ingest_log(d)
    accepted = [line for line in log.splitlines() if '"event": "auth accepted"' in line]
    assert any('"user": "alice"' in line and '"client": "127.0.0.9"' in line for line in accepted)
    assert PASSWORD not in log


async def test_relay_denied_from_a_network_that_is_not_allowed(msa: Msa) -> None:
    port = msa.ports["relay"]
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=UNTRUSTED) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
        assert code == 502
        code, text = client.mail("alice@origin.test")
    assert code == 554
    assert text == b"5.7.1 Relaying denied: 127.0.0.9 is not allowed to send through this server"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # 127.0.0.1 is in relay_networks
        client.ehlo("client.test")
        send(client)


@pytest.mark.parametrize(
    ("user", "password", "code"),
    [("carol", PASSWORD, 235), ("carol", "wrong", 535), ("flaky", "whatever", 454)],
    ids=["accepted", "refused", "endpoint-failing"],
)
async def test_http_auth_hook(msa: Msa, auth_endpoint: AuthEndpoint, user: str, password: str, code: int) -> None:
    d = msa.deployment
    before = len(auth_endpoint.requests)
    with smtplib.SMTP("127.0.0.1", msa.ports["httpauth"], timeout=30, source_address=UNTRUSTED) as client:
        client.ehlo("client.test")
        assert client.has_extn("auth")  # auth_without_tls: offered in plain text
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        reply_code, _ = client.docmd("AUTH", f"PLAIN {plain}")
        assert reply_code == code
        if code == 235:
            message_id = send(client)
        else:
            mail_code, _ = client.mail("alice@origin.test")
            assert mail_code == 530
    request = auth_endpoint.requests[before]
    assert request["user"] == user
    assert request["query"] == {"realm": ["test"], "transport": ["SMTP"]}
    if code == 235:
        message = await d.store.get_message(message_id)
        assert message is not None
        assert message.meta["user"] == "carol"
        assert message.meta["transtype"] == "ESMTPA"


async def test_unreachable_http_auth_is_a_temporary_failure(msa: Msa) -> None:
    with smtplib.SMTP("127.0.0.1", msa.ports["httpdown"], timeout=30, source_address=UNTRUSTED) as client:
        client.ehlo("client.test")
        plain = base64.b64encode(f"\0carol\0{PASSWORD}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {plain}")
    assert code == 454
    assert text.startswith(b"4.7.0 ")


async def test_hash_password_cli_output_verifies() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zmta_ingest", "hash-password"],
        input=f"{PASSWORD}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(hashed, PASSWORD)
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        argon2.PasswordHasher().verify(hashed, "another")


@pytest.mark.parametrize("problem", ["missing", "not-pem"])
async def test_a_bad_certificate_stops_ingest_with_the_key_named(tmp_path: Path, problem: str) -> None:
    cert = tmp_path / "cert.pem"
    if problem == "not-pem":
        cert.write_text("not a certificate\n")
    config = tmp_path / "zmta.yaml"
    config.write_text(yaml.safe_dump({"smtp_interfaces": {"submission": {"port": free_port(), "tls_cert": str(cert)}}}))
    result = subprocess.run(
        [sys.executable, "-m", "zmta_ingest", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "smtp_interfaces.submission.tls_cert" in result.stderr
    assert str(cert) in result.stderr


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def guarded_session(msa: Msa, source: str) -> SmtpWire:
    wire = SmtpWire(msa.ports["guarded"], source=source)
    assert wire.command("EHLO client.test")[0] == 250
    return wire


async def test_an_address_that_keeps_guessing_is_locked_out_across_connections(msa: Msa) -> None:
    def run() -> tuple[list[int], tuple[int, str], int]:
        failures = []
        for _ in range(3):  # auth_max_failures, each on a connection of its own
            with guarded_session(msa, "127.0.0.61") as wire:
                failures.append(wire.command(auth_plain("alice", "a wrong guess"))[0])
        with guarded_session(msa, "127.0.0.61") as wire:
            locked = wire.command(auth_plain("alice", PASSWORD))  # even the right password, for the window
        with guarded_session(msa, "127.0.0.62") as wire:
            other = wire.command(auth_plain("alice", PASSWORD))[0]  # another address is not affected
        return failures, locked, other

    failures, locked, other = await asyncio.to_thread(run)
    assert failures == [535, 535, 535]
    assert locked[0] == 454, locked
    assert "Too many failed authentications from 127.0.0.61" in locked[1]
    assert other == 235
    assert '"event": "auth locked out"' in ingest_log(msa.deployment)


async def test_password_checks_in_flight_are_bounded(msa: Msa) -> None:
    # Six guesses at once from six addresses: one check runs, one waits (auth_concurrency 1),
    # the rest are told to come back later at once instead of each costing 64 MiB.
    wires = [await asyncio.to_thread(guarded_session, msa, f"127.0.0.{70 + n}") for n in range(6)]
    try:
        line = (auth_plain("alice", "a wrong guess") + "\r\n").encode()
        for wire in wires:
            wire.send(line)
        replies = await asyncio.gather(*(asyncio.to_thread(wire.reply) for wire in wires))
    finally:
        for wire in wires:
            wire.close()
    codes = sorted(code for code, _ in replies)
    assert codes.count(535) == 2, replies
    assert codes.count(454) == 4, replies
    assert all("Temporary authentication failure" in text for code, text in replies if code == 454)


async def test_a_connection_that_keeps_guessing_is_closed(msa: Msa) -> None:
    def run() -> tuple[list[int], tuple[int, str]]:
        with guarded_session(msa, "127.0.0.63") as wire:
            codes = [wire.command(auth_plain("alice", f"guess {n}"))[0] for n in range(20)]
            return codes, wire.reply()

    codes, closing = await asyncio.to_thread(run)
    # Three refusals use up the address's failures; the rest are 454 at once; the 20th error
    # reply of the connection closes it (max_errors_per_connection).
    assert codes == [535] * 3 + [454] * 17
    assert closing[0] == 421 and "Too many errors" in closing[1]
