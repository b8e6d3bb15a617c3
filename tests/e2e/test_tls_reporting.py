"""SMTP TLS reporting (RFC 8460) end to end: a deployment delivers to the MTA-STS domains of
the test DNS (policies and reports served over HTTPS on port 443 of Infra.sts_address), its
senders count the sessions, and ``python -m zmta_bounce tls-report --day <today>`` reports the
day: by mail through the bounces zone (``_smtp._tls.sts.test``: ``mailto:tlsrpt@a.test``, a.test's
sink) and by HTTPS POST (``_smtp._tls.sts-testing.test``: ``https://tlsrpt.sts.test/v1/tlsrpt``);
``sts-mismatch.test`` publishes a version nobody speaks and is skipped. Once per domain and day.
"""

from __future__ import annotations

import asyncio
import calendar
import email
import email.policy
import functools
import gzip
import ipaddress
import json
import re
import ssl
import threading
from collections.abc import Iterator
from datetime import date
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme
from redis.asyncio import Redis

from tests.support import MTA_STS, MX_HOSTS, Deployment, DeploymentFactory, Infra, eventually, log_entries
from zmta_bounce.tlsrpt import filename
from zmta_common import redis_keys
from zmta_common import tlsrpt as counts
from zmta_devtools.forking import ForkedProcess

POLICIES = {
    "sts.test": "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n",
    "sts-mismatch.test": "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n",
    "sts-testing.test": "version: STSv1\nmode: testing\nmx: mail.elsewhere.test\nmax_age: 86400\n",
}
REPORTS_HOST = "tlsrpt.sts.test"


@pytest.fixture(scope="module")
def trusted(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate of the test CA for every MX host name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(f"mx.{domain}" for domain in (*MX_HOSTS, *MTA_STS))).configure_cert(context)
    return context


class HttpsHost:
    """Port 443 of Infra.sts_address: the MTA-STS policies (GET) and the TLS reports (POST)."""

    def __init__(self, address: str, context: ssl.SSLContext) -> None:
        self.reports: list[tuple[str, dict[str, str], bytes]] = []  # path, headers, body
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                policy = POLICIES.get((self.headers.get("Host") or "").removeprefix("mta-sts."))
                if self.path != "/.well-known/mta-sts.txt" or policy is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(policy)))
                self.end_headers()
                self.wfile.write(policy.encode())

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                host.reports.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 443), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture(scope="module")
def https_host(infra: Infra, ca: trustme.CA) -> Iterator[HttpsHost]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(f"mta-sts.{domain}" for domain in MTA_STS), REPORTS_HOST).configure_cert(context)
    host = HttpsHost(infra.sts_address, context)
    host.thread.start()
    yield host
    host.httpd.shutdown()
    host.httpd.server_close()


async def send(d: Deployment, rcpt: str) -> str:
    reply = await asyncio.to_thread(d.smtp_send, "s@origin.test", [rcpt], b"Subject: tls\r\n\r\nx\r\n")
    match = re.search(r"queued as ([0-9a-f]+)", reply)
    assert match, reply
    return match.group(1)


async def tls_report(d: Deployment, day: str, run: int) -> list[str]:
    """Run ``python -m zmta_bounce tls-report`` (forked, as the services are); the lines it printed."""
    log_path = d.log_dir / f"tls-report-{run}.log"
    process = ForkedProcess("zmta_bounce", ["tls-report", "--config", str(d.config_path), "--day", day], str(log_path))
    assert await asyncio.to_thread(process.wait, 60) == 0, log_path.read_text()
    return [line for line in log_path.read_text().splitlines() if not line.startswith("{")]


async def counted(d: Deployment, day: str, domain: str) -> dict[str, str]:
    redis = Redis.from_url(d.config.dbs.redis, decode_responses=True)
    try:
        return {str(k): str(v) for k, v in (await redis.hgetall(redis_keys.tlsrpt(day, domain))).items()}
    finally:
        await redis.aclose()


def sts_policy(domain: str) -> dict[str, Any]:
    lines = [line for line in POLICIES[domain].splitlines() if line]
    mx = [line.removeprefix("mx: ") for line in lines if line.startswith("mx: ")]
    return {"policy-type": "sts", "policy-string": lines, "policy-domain": domain, "mx-host": mx}


def report_mails(sink_messages: list[Any]) -> list[tuple[Any, EmailMessage]]:
    found = []
    for item in sink_messages:
        message = email.message_from_bytes(item.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        if message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt":
            found.append((item, message))
    return found


def check_header(report: dict[str, Any], day: str, domain: str) -> None:
    assert list(report) == ["organization-name", "date-range", "contact-info", "report-id", "policies"]
    assert report["organization-name"] == "Test Org"
    assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    assert report["contact-info"] == "tls-reports@mta.test"
    assert report["report-id"] == f"{day}.{domain}@mta.test"


async def test_the_day_is_reported_by_mail_and_https_once_per_domain(
    deploy: DeploymentFactory, sinks: dict, https_host: HttpsHost, ca_file: str, trusted: ssl.SSLContext
) -> None:
    settings = {"enabled": True, "organization_name": "Test Org", "contact_info": "tls-reports@mta.test"}
    d = await deploy({"tls": {"ca_file": ca_file}, "tls_reporting": settings})
    https_host.reports.clear()
    sinks["127.0.0.3"].use_tls(trusted)
    await send(d, "x@sts.test")  # enforce: verified TLS to mx.sts.test
    await send(d, "y@sts-testing.test")  # testing: delivered, but its MX host is not in the policy
    held = await send(d, "z@sts-mismatch.test")  # enforce, no MX host allowed: deferred
    await eventually(lambda: len(sinks["127.0.0.3"].messages) == 2, what="the two deliveries")

    async def deferred() -> bool:
        rows = await d.store.deliveries_of(held)
        return bool(rows) and rows[0].attempts >= 1

    await eventually(deferred, what="the deferral under sts-mismatch.test's policy")
    day = counts.day_of()
    # The senders write their counts in the background, right after each session.
    for domain in ("sts.test", "sts-testing.test", "sts-mismatch.test"):
        await eventually(functools.partial(counted, d, day, domain), what=f"the counts of {domain}")

    printed = await tls_report(d, day, 1)
    assert printed[:3] == ["sts-mismatch.test: skipped", "sts-testing.test: sent", "sts.test: sent"]
    (skipped,) = log_entries(d.log_dir / "tls-report-1.log", "tls report skipped")
    assert (skipped["domain"], skipped["reason"]) == ("sts-mismatch.test", "no v=TLSRPTv1 record")

    # sts.test: a mail through the bounces zone to a.test's sink.
    start = calendar.timegm(date.fromisoformat(day).timetuple())
    (item, mail), *_ = await eventually(lambda: report_mails(sinks["127.0.0.2"].messages), what="the report mail")
    assert (item.mail_from, item.rcpt_tos) == ("noreply-tlsrpt@mta.test", ["tlsrpt@a.test"])
    assert mail["Subject"] == f"Report Domain: sts.test Submitter: mta.test Report-ID: <{day}.sts.test@mta.test>"
    assert (mail["TLS-Report-Domain"], mail["TLS-Report-Submitter"]) == ("sts.test", "mta.test")
    assert mail["From"] == "noreply-tlsrpt@mta.test" and mail["X-Sending-Zone"] is None
    text, attachment = mail.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == filename("mta.test", "sts.test", date.fromisoformat(day))
    assert attachment.get_filename() == f"mta.test!sts.test!{start}!{start + 86399}.json.gz"
    report = json.loads(gzip.decompress(attachment.get_content()))
    check_header(report, day, "sts.test")
    assert report["policies"] == [
        {
            "policy": sts_policy("sts.test"),
            "summary": {"total-successful-session-count": 1, "total-failure-session-count": 0},
            "failure-details": [],
        }
    ]

    # sts-testing.test: POSTed to https://tlsrpt.sts.test/v1/tlsrpt.
    ((path, headers, body),) = https_host.reports
    assert (path, headers["content-type"], headers["host"]) == ("/v1/tlsrpt", "application/tlsrpt+gzip", REPORTS_HOST)
    report = json.loads(gzip.decompress(body))
    check_header(report, day, "sts-testing.test")
    (policy,) = report["policies"]
    assert policy["policy"] == sts_policy("sts-testing.test")
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    (detail,) = policy["failure-details"]
    assert ipaddress.ip_address(detail.pop("sending-mta-ip")).is_loopback
    assert detail == {
        "result-type": "validation-failure",
        "receiving-mx-hostname": "mx.sts-testing.test",
        "receiving-ip": "127.0.0.3",
        "failure-reason-code": "mx-not-in-policy",
        "failed-session-count": 1,
    }

    # Again: every domain is taken already; nothing is queued or POSTed a second time.
    printed = await tls_report(d, day, 2)
    assert printed[:3] == ["sts-mismatch.test: taken", "sts-testing.test: taken", "sts.test: taken"]
    assert log_entries(d.log_dir / "tls-report-2.log", "tls report queued") == []
    assert len(https_host.reports) == 1
    # The service's own daily round looked at the days before (nothing counted there) and did not fail.
    assert log_entries(d.log_dir / "bounce.log", "tls reporting failed") == []
