"""Every way a delivery can fail, against scripted sinks: what is retried, what bounces,
who is told (DSN, HTTP notification) and what is suppressed or collected."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import urllib.parse
from collections.abc import Iterator
from email.message import EmailMessage, Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from tests.e2e.test_outcomes import queued_id
from tests.support import MANY_DOMAINS, MANY_DOMAINS_MX, Deployment, DeploymentFactory, eventually
from zmta_bounce.consumer import CONSUMER as BOUNCE_CONSUMER
from zmta_bounce.notifications import CONSUMER as NOTIFY_CONSUMER
from zmta_common import bus as zbus
from zmta_common.events import STREAM_BOUNCES, STREAM_NOTIFY
from zmta_devtools.servers import free_port

SENDER = "sender@b.test"  # b.test's MX is the sink at 127.0.0.3: DSNs arrive there
FAST_RETRIES = {"defer_times": [0.5] * 6}


def reports(sinks: dict) -> list[EmailMessage]:
    """The delivery status notifications that reached the sender's sink."""
    found = []
    for item in sinks["127.0.0.3"].messages:
        message = email.message_from_bytes(item.data, policy=email.policy.default)
        if message.get_content_type() == "multipart/report":
            found.append(message)
    return found


def delivery_status(report: EmailMessage) -> dict[str, str]:
    """The per-recipient fields of a DSN's message/delivery-status part."""
    (part,) = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2  # per-message, then per-recipient
    recipient = blocks[1]
    assert isinstance(recipient, Message)
    return {key: str(value) for key, value in recipient.items()}


async def send(d: Deployment, rcpts: list[str], subject: str = "test", mail_from: str = SENDER) -> str:
    data = f"From: {mail_from}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return queued_id(await asyncio.to_thread(d.smtp_send, mail_from, rcpts, data))


async def rows_left(d: Deployment, message_id: str) -> int:
    return len(await d.store.deliveries_of(message_id))


async def test_greylisted_delivery_is_retried_and_delivered(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": FAST_RETRIES}})
    sink = sinks["127.0.0.2"]
    sink.handler.scripted_rcpt["grey@a.test"] = ["450 4.2.0 <grey@a.test>: Recipient address rejected: Greylisted"]
    message_id = await send(d, ["grey@a.test"])
    await eventually(lambda: sink.messages, what="the delivery on the second attempt")
    assert sink.messages[0].rcpt_tos == ["grey@a.test"]
    await eventually(lambda: _gone(d, message_id), what="the row removed")
    assert reports(sinks) == []


async def test_each_failure_stage_ends_as_it_should(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": FAST_RETRIES}})
    sinks["127.0.0.2"].handler.scripted_rcpt["nobody@a.test"] = ["550 5.1.1 <nobody@a.test>: User unknown"]
    sinks["127.0.0.2"].handler.scripted["spam@a.test"] = ["554 5.7.1 Message rejected as spam by content filter"]
    sinks["127.0.0.5"].handler.greetings = ["421 4.3.2 Service not available, closing transmission channel"]
    unknown = await send(d, ["nobody@a.test"], "unknown")
    spam = await send(d, ["spam@a.test"], "spam")
    busy = await send(d, ["later@amx.test"], "busy")
    refused = await send(d, ["x@refused.test"], "refused")

    await eventually(lambda: len(reports(sinks)) == 2, what="DSNs for the two refusals")
    statuses = {delivery_status(r)["Final-Recipient"]: delivery_status(r) for r in reports(sinks)}
    assert statuses["rfc822; nobody@a.test"]["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@a.test>: User unknown"
    assert statuses["rfc822; nobody@a.test"]["Status"] == "5.1.1"
    assert statuses["rfc822; spam@a.test"]["Action"] == "failed"
    assert "554 5.7.1 Message rejected as spam" in statuses["rfc822; spam@a.test"]["Diagnostic-Code"]
    assert await rows_left(d, unknown) == 0 and await rows_left(d, spam) == 0
    # 421 at the greeting: retried, and delivered once the server greets again.
    await eventually(lambda: sinks["127.0.0.5"].messages, what="the delivery after the 421 greeting")
    assert sinks["127.0.0.5"].handler.refused == 1
    await eventually(lambda: _gone(d, busy), what="the busy server's row removed")
    # Connection refused: deferred, never bounced while retries last.
    (row,) = await eventually(lambda: _deferred(d, refused, 2), what="the refused delivery retried")
    assert "refused" in (row.last_response or "").lower()
    log = (d.log_dir / "bounce.log").read_text()
    assert '"category": "recipient_unknown"' in log
    assert '"category": "spam"' in log
    assert len(reports(sinks)) == 2  # no DSN for what is still being retried
    # A DSN is queued as any message is (zmta_common.queueing): counted and logged alike.
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{d.config.metrics.bounce_port}/metrics")).text
    assert 'zonemta_message_push{result="success"} 2.0' in text
    assert log.count('"event": "queued"') == 2 and '"interface": "bounce"' in log


async def test_retry_schedule_ends_in_a_bounce_at_the_right_attempt(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"defer_times": [0.3, 0.3, 0.3]}}})
    sink = sinks["127.0.0.2"]
    sink.handler.scripted["stuck@a.test"] = ["451 4.3.0 Temporary local problem"] * 10
    message_id = await send(d, ["stuck@a.test"])
    await eventually(lambda: reports(sinks), timeout=30, what="the DSN after the last retry")
    # Three deferrals on the schedule, then the fourth failure bounces.
    assert len(sink.handler.scripted["stuck@a.test"]) == 10 - 4
    (report,) = reports(sinks)
    status = delivery_status(report)
    assert status["Action"] == "failed"
    assert "gave up after 4 attempts" in status["Diagnostic-Code"]
    assert await rows_left(d, message_id) == 0


async def test_delay_warning_then_delivery(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy(
        {
            "zones": {"default": {"defer_times": [0.4] * 20}},
            "bounce": {"delay_warning": True, "delay_warning_after": 1.5},
        }
    )
    sink = sinks["127.0.0.2"]
    sink.handler.scripted["slow@a.test"] = ["451 4.4.1 Connection timed out"] * 7
    message_id = await send(d, ["slow@a.test"])
    await eventually(lambda: sink.messages, timeout=30, what="the delivery after the retries")
    await eventually(lambda: _gone(d, message_id), what="the row removed")
    await eventually(lambda: reports(sinks), what="the delay warning")
    # Then a refusal: the bounce service handles its events in order and the bounces zone sends
    # the oldest DSN first, so a second warning would come before this refusal's DSN.
    sink.handler.scripted_rcpt["gone@a.test"] = ["550 5.1.1 <gone@a.test>: User unknown"]
    await send(d, ["gone@a.test"], "refused")
    await eventually(lambda: len(reports(sinks)) >= 2, what="the DSN of the refusal")
    # exactly one warning, however many attempts failed after it
    assert [r["Subject"] for r in reports(sinks)] == [
        "Delivery Status Notification (Delay: slow@a.test)",
        "Delivery Status Notification (Failure: gone@a.test)",
    ]
    warning = reports(sinks)[0]
    status = delivery_status(warning)
    assert status["Action"] == "delayed"
    assert status["Status"] == "4.4.1"
    assert "Will-Retry-Until" in status


class Receiver(BaseHTTPRequestHandler):
    """A bounce notification receiver that is down (503) for its first ``failures`` POSTs."""

    failures = 3
    posts: ClassVar[list[dict[str, str]]] = []
    statuses: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
        status = 503 if len(self.statuses) < self.failures else 200
        self.posts.append(form)
        self.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.posts.clear()
    Receiver.statuses.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/bounces"
    server.shutdown()
    server.server_close()


async def test_http_notification_is_retried_until_the_receiver_takes_it(
    deploy: DeploymentFactory, sinks: dict, receiver: str
) -> None:
    d = await deploy({"bounce": {"dsn": False, "notify_urls": [receiver], "notify_backoff": [0.3]}})
    sinks["127.0.0.2"].handler.scripted["gone@a.test"] = ["550 5.1.1 <gone@a.test>: Recipient address rejected"]
    headers = f"From: {SENDER}\r\nX-FBL: campaign-7\r\nSubject: x\r\n\r\nx\r\n".encode()
    message_id = queued_id(await asyncio.to_thread(d.smtp_send, SENDER, ["gone@a.test"], headers))
    await eventually(lambda: 200 in Receiver.statuses, what="the notification accepted")
    # Every bounce event and notification handled and acknowledged: none is left to be posted
    # again, nor waits for its acknowledgement to time out.
    bus = await zbus.connect(d.nats.url, "test")
    try:

        async def all_acknowledged() -> bool:
            for stream, consumer in ((STREAM_BOUNCES, BOUNCE_CONSUMER), (STREAM_NOTIFY, NOTIFY_CONSUMER)):
                info = await bus.js.consumer_info(stream, consumer)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await eventually(all_acknowledged, what="the bounce and its notification acknowledged")
    finally:
        await bus.close()
    assert Receiver.statuses == [503, 503, 503, 200]
    note = Receiver.posts[-1]
    assert note["id"] == message_id
    assert (note["to"], note["seq"], note["returnPath"]) == ("gone@a.test", "001", SENDER)
    assert note["category"] == "recipient_unknown"
    assert note["response"] == "550 5.1.1 <gone@a.test>: Recipient address rejected"
    assert note["fbl"] == "campaign-7"
    assert int(note["time"]) > 1_700_000_000_000  # milliseconds, as the original sends


async def test_hard_unknown_recipient_is_suppressed_and_never_tried_again(
    deploy: DeploymentFactory, sinks: dict
) -> None:
    d = await deploy({"bounce": {"suppress_unknown_recipients": True}})
    sink = sinks["127.0.0.2"]
    sink.handler.scripted_rcpt["left@a.test"] = ["550 5.1.1 <left@a.test>: Recipient address rejected: User unknown"]
    sink.handler.scripted_rcpt["full@a.test"] = ["452 4.2.2 <full@a.test>: Mailbox full"]
    await send(d, ["left@a.test", "full@a.test"], "first")
    await eventually(lambda: reports(sinks), what="the DSN of the first message")
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        listed = await eventually(lambda: _suppressed(api), what="the unknown recipient on the suppression list")
    assert listed == ["left@a.test"]  # a full mailbox is not suppressed

    second = await send(d, ["left@a.test", "ok@a.test"], "second")
    await eventually(lambda: any("ok@a.test" in m.rcpt_tos for m in sink.messages), what="the good recipient")
    await eventually(lambda: _gone(d, second), what="the second message done")
    assert not any("left@a.test" in m.rcpt_tos for m in sink.messages)
    assert len(reports(sinks)) == 1  # the suppressed recipient caused no second DSN


async def test_old_deliveries_bounce_and_orphan_bodies_go(deploy: DeploymentFactory, sinks: dict) -> None:
    # The "idle" zone has no sender, so only the collector can end its deliveries.
    d = await deploy(
        {
            "zones": {"idle": {"recipient_domains": ["w1.test"], "max_age": 1}},
            "queue": {"gc_interval": 0.5},
        },
        senders={"default": 1, "bounces": 1},
    )
    await d.store.pool.execute(
        "INSERT INTO messages (id, created, mail_from, headers, body_size, meta)"
        " VALUES ('orphan', now() - interval '1 hour', 'x@b.test', '', 0, '{}')"
    )
    message_id = await send(d, ["someone@w1.test"], "never sent")
    (report,) = await eventually(lambda: reports(sinks), timeout=30, what="the DSN of the expired delivery")
    status = delivery_status(report)
    assert status["Action"] == "failed"
    assert "Message expired" in status["Diagnostic-Code"]
    assert await rows_left(d, message_id) == 0
    assert await d.store.get_message("orphan") is None


async def _suppressed(api: httpx.AsyncClient) -> list[str]:
    return [e["address"] for e in (await api.get("/suppressionlist")).json()["suppressed"]]


async def _gone(d: Deployment, message_id: str) -> bool:
    return await d.store.get_message(message_id) is None


async def _deferred(d: Deployment, message_id: str, attempts: int) -> list:
    rows = await d.store.deliveries_of(message_id)
    return rows if rows and rows[0].attempts >= attempts else []


async def test_a_dsn_refused_for_good_ends_its_bounce_event(deploy: DeploymentFactory, sinks: dict) -> None:
    """A plugin's 5xx for the DSN (intake hooks run for DSNs too) ends the bounce event: it
    is not handed out again, so its notifications are not published again and again."""
    d = await deploy({"plugins": {"tests.dsn_refusing_plugin": {}}})
    sinks["127.0.0.2"].handler.scripted_rcpt["nobody@a.test"] = ["550 5.1.1 <nobody@a.test>: User unknown"]
    await send(d, ["nobody@a.test"], "refused dsn")

    def bounce_log() -> str:
        return d.system.get("bounce").tail_log(400)

    await eventually(lambda: '"event": "dsn refused"' in bounce_log(), what="the DSN refused")
    bus = await zbus.connect(d.nats.url, "test")
    try:
        info = await bus.js.consumer_info(STREAM_BOUNCES, BOUNCE_CONSUMER)
    finally:
        await bus.close()
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
    assert bounce_log().count('"event": "dsn refused"') == 1
    assert "No delivery status notifications here" in bounce_log()


async def _rows_read(d: Deployment) -> int:
    """Rows the deployment's database returned or changed so far, by pg_stat_statements
    (kept in shared memory as each statement ends, unlike the table statistics)."""
    await d.store.pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    rows = await d.store.pool.fetchval(
        "SELECT coalesce(sum(rows), 0) FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND query ILIKE '%deliveries%'"
    )
    return int(rows)


async def test_the_bounces_of_a_message_read_each_delivery_row_a_bounded_number_of_times(
    deploy: DeploymentFactory, sinks: dict
) -> None:
    """Each rejected report once read every delivery row of its message: n squared rows
    for a message to n recipients that all bounce."""
    # One recipient per domain: no domain limit makes leasing scan the same rows again.
    recipients = [f"gone@{domain}" for domain in MANY_DOMAINS]
    d = await deploy({"bounce": {"dsn": False}}, senders={"default": 1})
    for rcpt in recipients:
        sinks[MANY_DOMAINS_MX].handler.scripted_rcpt[rcpt] = [f"550 5.1.1 <{rcpt}>: Recipient address rejected"]
    before = await _rows_read(d)
    queue_id = await send(d, recipients, "many")
    await eventually(lambda: _gone(d, queue_id), timeout=60, what="every delivery bounced")
    read = await _rows_read(d) - before
    top = await d.store.pool.fetch(
        "SELECT rows, calls, left(query, 100) AS query FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND query ILIKE '%deliveries%' ORDER BY rows DESC LIMIT 8"
    )
    # Intake, leasing, outcomes and collection touch each row a few times; n squared is 10000.
    assert read < 15 * len(recipients), [tuple(r) for r in top]
