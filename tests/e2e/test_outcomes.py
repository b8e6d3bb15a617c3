"""What happens after the sender tries: defers, rejects, smarthost, pool address, durable results."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
from redis.asyncio import Redis

from tests.support import Deployment, DeploymentFactory, eventually, log_entries
from zmta_common import bus as zbus
from zmta_common import redis_keys
from zmta_common.events import DELIVERED, STREAM_RESULTS, DeliveryReport, WorkRequest, reported_subject, work_subject
from zmta_queue.results import CONSUMER as RESULTS_CONSUMER


async def queue_metrics(d: Deployment) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{d.config.metrics.queue_port}/metrics")).text


def queued_id(reply: str) -> str:
    match = re.search(r"queued as ([0-9a-f]+)", reply)
    assert match, reply
    return match.group(1)


async def test_temporary_failure_is_deferred_and_permanent_one_bounces(deploy: DeploymentFactory, sinks: dict) -> None:
    # No DSN here: its own delivery (to origin.test, which does not resolve) would move the counters.
    d = await deploy({"bounce": {"dsn": False}})
    sink = sinks["127.0.0.2"]
    sink.handler.scripted["later@a.test"] = ["451 4.7.1 Greylisted, please try again later"]
    sink.handler.scripted["gone@a.test"] = ["550 5.1.1 <gone@a.test>: Recipient address rejected: User unknown"]
    message_id = queued_id(
        await asyncio.to_thread(
            d.smtp_send,
            "s@origin.test",
            ["later@a.test", "gone@a.test", "ok@a.test"],
            b"Subject: outcomes\r\n\r\nx\r\n",
        )
    )
    await eventually(lambda: len(sink.messages) == 1, what="the good delivery")

    async def settled() -> list:
        rows = await d.store.deliveries_of(message_id)
        return rows if [r.recipient for r in rows] == ["later@a.test"] and rows[0].attempts == 1 else []

    (deferred,) = await eventually(settled, what="one deferred row left")
    assert deferred.last_response == "451 4.7.1 Greylisted, please try again later"
    delay = (deferred.next_attempt - deferred.last_deferred).total_seconds()
    assert 299 <= delay <= 301  # the first step of the retry schedule: 5 minutes

    async with httpx.AsyncClient(base_url=d.api_url) as api:
        status = (await api.get(f"/message/{message_id}")).json()
    (row,) = status["messages"]
    assert row["status"] == "DEFERRED"
    assert row["deferred"]["count"] == 1
    assert row["deferred"]["response"].startswith("451 4.7.1")
    assert row["deferred"]["next"] > row["deferred"]["last"] >= row["deferred"]["first"] > 0

    metrics = await queue_metrics(d)
    assert 'zonemta_delivery_status{result="rejected",status="rejected",zone="default"} 1.0' in metrics
    assert 'zonemta_delivery_status{result="deferred",status="deferred",zone="default"} 1.0' in metrics
    assert "zonemta_bounce_generation 1.0" in metrics
    bounce_log = (d.log_dir / "bounce.log").read_text()
    assert '"event": "bounce"' in bounce_log
    assert '"category": "recipient_unknown"' in bounce_log


async def test_smarthost_replaces_mx_lookup(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"smarthost": f"127.0.0.5:{sinks['127.0.0.5'].port}"}}})
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@b.test"], b"Subject: relay\r\n\r\nx\r\n")
    await eventually(lambda: sinks["127.0.0.5"].messages, what="delivery to the smarthost")
    assert sinks["127.0.0.3"].messages == []  # b.test's own MX never saw it


async def test_delivery_leaves_from_the_pool_address_with_its_name(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"pool": [{"name": "out9.mta.test", "address": "127.0.0.9"}]}}})
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@a.test"], b"Subject: pool\r\n\r\nx\r\n")
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="delivery")
    assert sink.messages[0].peer[0] == "127.0.0.9"
    assert sink.messages[0].helo == "out9.mta.test"
    assert b" by out9.mta.test (ZoneMTA) with ESMTP id " in sink.messages[0].data


async def test_null_mx_and_unknown_domain_bounce_at_once(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy()
    message_id = queued_id(
        await asyncio.to_thread(
            d.smtp_send, "s@origin.test", ["x@nullmx.test", "y@nowhere.test"], b"Subject: dns\r\n\r\nx\r\n"
        )
    )
    await eventually(lambda: _no_rows(d, message_id), what="both deliveries rejected")

    def queue_log() -> str:
        return "".join(p.tail_log(200) for p in d.system.processes if p.name == "queue")

    # The queue logs an outcome after it has committed it: the lines may come a moment later.
    await eventually(lambda: "nowhere.test does not exist" in queue_log(), what="the NXDOMAIN rejection logged")
    assert "accepts no mail (null MX)" in queue_log()


async def _no_rows(d: Deployment, message_id: str) -> bool:
    return not await d.store.deliveries_of(message_id)


async def test_results_wait_on_the_stream_while_the_queue_is_down(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy()
    sink = sinks["127.0.0.4"]
    sink.handler.data_delay = 2.0
    message_id = queued_id(
        await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@slow.test"], b"Subject: durable\r\n\r\nx\r\n")
    )
    await eventually(lambda: _leased(d, message_id), what="the delivery leased")
    queue = d.system.get("queue")
    await asyncio.to_thread(queue.stop)  # the sender finishes and reports while no queue runs
    await eventually(lambda: sink.messages, what="delivery", timeout=10)
    # The sender logs an outcome once its report is on the stream.
    sender_log = d.log_dir / "sender-default-0.log"
    await eventually(lambda: _logged(sender_log, "delivered", message_id), what="the report on the stream")
    assert await d.store.deliveries_of(message_id)  # nobody applied the report yet
    await asyncio.to_thread(queue.start)
    await asyncio.to_thread(queue.wait_ready)
    await eventually(lambda: _no_rows(d, message_id), what="the report applied after the restart")
    assert len(sink.messages) == 1


async def _leased(d: Deployment, message_id: str) -> bool:
    rows = await d.store.deliveries_of(message_id)
    return bool(rows) and rows[0].leased


def _logged(log: Path, event: str, message_id: str) -> bool:
    """Whether the service logged ``event`` for the message (with its id)."""
    return any(entry.get("id") == message_id for entry in log_entries(log, event))


async def test_a_rejected_delivery_sends_a_dsn_to_the_sender(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy()
    sinks["127.0.0.2"].handler.scripted["nobody@a.test"] = ["550 5.1.1 <nobody@a.test>: User unknown"]
    original = (
        b"From: Sender <sender@b.test>\r\nTo: nobody@a.test\r\nSubject: hello\r\n"
        b"Message-ID: <orig-1@b.test>\r\n\r\nbody\r\n"
    )
    message_id = queued_id(await asyncio.to_thread(d.smtp_send, "sender@b.test", ["nobody@a.test"], original))
    sink = sinks["127.0.0.3"]  # b.test's MX: where the sender's mail goes
    await eventually(lambda: sink.messages, what="the DSN at the sender's MX")
    (dsn,) = sink.messages
    assert dsn.mail_from in ("", "<>")  # the null sender (the test sink records MAIL FROM:<> as "<>")
    assert dsn.rcpt_tos == ["sender@b.test"]
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Subject"] == "Delivery Status Notification (Failure: nobody@a.test)"
    assert report["In-Reply-To"] == "<orig-1@b.test>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert "X-Sending-Zone" not in report
    parts = [part.get_content_type() for part in report.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = dsn.data.decode()
    assert "Final-Recipient: rfc822; nobody@a.test" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 <nobody@a.test>: User unknown" in status
    assert "Remote-MTA: dns; mx.a.test" in status
    assert f"X-ZoneMTA-Queue-ID: {message_id}" in status
    assert "Message-ID: <orig-1@b.test>" in status  # the original's headers come back
    # The DSN went through the bounces zone.
    # (the sink has the DSN a moment before its sender has the 250 and logs it)
    await eventually(
        lambda: (
            '"event": "delivered"'
            in "".join(p.tail_log(500) for p in d.system.processes if p.name.startswith("sender-bounces"))
        ),
        what="the bounces zone's sender logging the DSN delivered",
    )


async def test_no_dsn_for_null_senders_or_automatic_mail(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy()
    for rcpt in ("n1@a.test", "n2@a.test", "n3@a.test"):
        sinks["127.0.0.2"].handler.scripted[rcpt] = ["550 5.1.1 User unknown"]
    await asyncio.to_thread(d.smtp_send, "", ["n1@a.test"], b"Subject: bounce of a bounce\r\n\r\nx\r\n")
    await asyncio.to_thread(d.smtp_send, "s@b.test", ["n2@a.test"], b"Auto-Submitted: auto-replied\r\n\r\nx\r\n")
    await asyncio.to_thread(d.smtp_send, "s@b.test", ["n3@a.test"], b"Precedence: bulk\r\n\r\nx\r\n")
    await eventually(lambda: len(log_entries(d.log_dir / "bounce.log", "no dsn")) == 3, what="3 skips")
    # Then a refusal that does get a DSN: the bounce service handles its events in order and the
    # bounces zone sends the oldest DSN first, so a DSN for any of the three would come before it.
    sinks["127.0.0.2"].handler.scripted["n4@a.test"] = ["550 5.1.1 User unknown"]
    await asyncio.to_thread(d.smtp_send, "s@b.test", ["n4@a.test"], b"Subject: plain mail\r\n\r\nx\r\n")
    await eventually(lambda: sinks["127.0.0.3"].messages, what="the DSN of the plain message")
    assert [m.rcpt_tos for m in sinks["127.0.0.3"].messages] == [["s@b.test"]]
    assert b"Final-Recipient: rfc822; n4@a.test" in sinks["127.0.0.3"].messages[0].data
    assert len(log_entries(d.log_dir / "bounce.log", "dsn queued")) == 1


async def test_a_soft_failure_past_the_maximum_age_bounces(deploy: DeploymentFactory, sinks: dict) -> None:
    # Ten retries a second apart would be allowed, but the age of 2.5 s runs out first.
    d = await deploy({"zones": {"default": {"defer_times": [1] * 10, "max_age": 2.5}}, "bounce": {"dsn": False}})
    sinks["127.0.0.2"].handler.scripted["stuck@a.test"] = ["451 4.3.0 Try later"] * 10
    message_id = queued_id(
        await asyncio.to_thread(d.smtp_send, "s@origin.test", ["stuck@a.test"], b"Subject: old\r\n\r\nx\r\n")
    )
    await eventually(lambda: _no_rows(d, message_id), timeout=30, what="the bounce after the maximum age")
    log = (d.log_dir / "bounce.log").read_text()
    assert '"event": "bounce"' in log
    attempts = int(re.search(r"gave up after (\d+) attempts", log).group(1))  # type: ignore[union-attr]
    assert 2 <= attempts <= 4  # stopped by the age, not by the end of the schedule


async def test_a_delivery_longer_than_its_lease_is_not_sent_twice(deploy: DeploymentFactory, sinks: dict) -> None:
    # Leases of 2 s, a server that takes 4 s to answer DATA, and a second sender that would
    # take over any lease that runs out: only renewal keeps the delivery with its sender.
    lease_time = 2.0
    d = await deploy({"queue": {"lease_time": lease_time}}, senders={"default": 2, "bounces": 1})
    sink = sinks["127.0.0.2"]
    sink.handler.data_delay = 4.0
    message_id = queued_id(
        await asyncio.to_thread(d.smtp_send, "s@origin.test", ["slow@a.test"], b"Subject: slow\r\n\r\nx\r\n")
    )
    redis = Redis.from_url(d.config.dbs.redis)
    try:

        async def places() -> list[tuple[str, float]]:
            key = redis_keys.inflight_prefix("default") + "d:a.test"
            found = cast(list[tuple[bytes, float]], await redis.zrange(key, 0, -1, withscores=True))
            return [(member.decode(), score) for member, score in found]

        ((_, first_expiry),) = await eventually(places, what="the delivery's place under the domain's limit")

        async def renewed_past_first_lease() -> list[tuple[str, float]]:
            # A renewal made after the first lease ran out sets an expiry past this.
            current = await places()
            return current if any(score > first_expiry + lease_time for _, score in current) else []

        held = await eventually(renewed_past_first_lease, what="the place renewed after its first lease")
    finally:
        await redis.aclose()
    # Past its first lease, the delivery still holds its place under the domain's limit.
    assert [(member, score > time.time()) for member, score in held] == [(f"{message_id}.001", True)]
    await eventually(lambda: sink.messages, timeout=30, what="the slow delivery")
    await eventually(lambda: _no_rows(d, message_id), what="the row removed")
    # Only a lease sends a copy, and the row is leased no more once it is gone: one lease, one copy.
    leases = [e["count"] for e in log_entries(d.log_dir / "queue.log", "leased") if e["zone"] == "default"]
    assert leases == [1], leases
    assert len(sink.messages) == 1


async def test_a_report_published_twice_is_counted_once(deploy: DeploymentFactory) -> None:
    """JetStream may hand the queue a report again (a redelivery, or the sender re-publishing
    it after a lost acknowledgement): its outcome is applied, counted and logged once."""
    d = await deploy(senders={})
    ids = [
        queued_id(await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"{name}@a.test"], b"Subject: x\r\n\r\nx\r\n"))
        for name in ("twice", "marker")
    ]
    leases = {lease.id: lease for lease in await d.store.lease("default", 10, 60, "test-sender")}
    bus = await zbus.connect(d.nats.url, "test")
    try:
        reports = [
            DeliveryReport(
                id=i,
                seq=leases[i].seq,
                zone="default",
                lease_token=leases[i].lease_token,
                status=DELIVERED,
                response="250 ok",
            )
            for i in ids
        ]
        # The same report under two message ids (so that JetStream's duplicate filter lets both
        # through), then another message's report, which is applied after them.
        for n, report in enumerate([reports[0], reports[0], reports[1]]):
            await bus.js.publish(reported_subject("default"), report.encode(), headers={"Nats-Msg-Id": f"r{n}"})
    finally:
        await bus.close()

    def queue_log() -> str:
        return d.system.get("queue").tail_log(400)

    # The queue counts an outcome, then logs it: the marker's line follows the duplicate's.
    marker = f'"event": "delivered", "id": "{ids[1]}"'
    await eventually(lambda: marker in queue_log(), what="the last report applied and logged")
    metrics = await queue_metrics(d)
    counted = [line for line in metrics.splitlines() if line.startswith("zonemta_delivery_status{")]
    assert counted == ['zonemta_delivery_status{result="delivered",status="delivered",zone="default"} 2.0'], (
        counted,
        queue_log()[-3000:],
    )
    assert queue_log().count(f'"event": "delivered", "id": "{ids[0]}"') == 1


async def test_reports_come_back_well_inside_the_lease(deploy: DeploymentFactory) -> None:
    """A report the queue fetched and never acknowledged (killed in between) is handed out
    again long before the lease it reports on runs out."""
    d = await deploy({"queue": {"lease_time": 12}}, senders={})
    bus = await zbus.connect(d.nats.url, "test")
    try:

        async def consumer_ack_wait() -> float | None:
            try:
                info = await bus.js.consumer_info(STREAM_RESULTS, RESULTS_CONSUMER)
            except Exception:  # not created yet
                return None
            return float(info.config.ack_wait) if info.config.ack_wait is not None else None

        ack_wait = await eventually(consumer_ack_wait, what="the queue's results consumer")
    finally:
        await bus.close()
    assert ack_wait == 4.0  # a third of the lease


async def test_a_lease_is_kept_while_its_report_waits_for_nats(deploy: DeploymentFactory, sinks: dict) -> None:
    """NATS goes away while a delivery is in DATA and stays away for longer than the lease:
    the sender keeps the lease until its report is on the stream, so the message is not
    handed out and sent a second time."""
    lease_time = 2.0
    d = await deploy({"queue": {"lease_time": lease_time}})
    sink = sinks["127.0.0.2"]
    sink.handler.data_delay = 2.0
    try:
        message_id = queued_id(
            await asyncio.to_thread(d.smtp_send, "s@origin.test", ["once@a.test"], b"Subject: once\r\n\r\nx\r\n")
        )

        async def leased() -> bool:
            rows = await d.store.deliveries_of(message_id)
            return bool(rows) and rows[0].leased

        await eventually(leased, what="the delivery leased")
        await asyncio.to_thread(d.nats.stop)  # the delivery goes on; its report cannot be published
        await eventually(lambda: len(sink.messages) == 1, what="the message delivered")
        delivered = datetime.now(UTC)

        async def renewed_a_lease_later() -> bool:
            # A renewal made more than a whole lease after the delivery sets an expiry past this.
            rows = await d.store.deliveries_of(message_id)
            expires = rows[0].lease_expires if rows else None
            return expires is not None and expires > delivered + timedelta(seconds=2 * lease_time)

        # Past a whole lease after the delivery, with NATS still down: the lease still holds.
        await eventually(renewed_a_lease_later, what="the lease renewed a whole lease after the delivery")
        assert await leased(), "the lease ran out while the report waited for NATS"
        await asyncio.to_thread(d.nats.start)
        await eventually(lambda: _rows_gone(d, message_id), timeout=30, what="the report applied")
    finally:
        sink.handler.data_delay = 0.0
    # Only a lease sends a copy, and the row is leased no more once it is gone: one lease, one copy.
    assert [e["count"] for e in log_entries(d.log_dir / "queue.log", "leased") if e["zone"] == "default"] == [1]
    assert len(sink.messages) == 1


async def _rows_gone(d: Deployment, message_id: str) -> bool:
    return not await d.store.deliveries_of(message_id)


async def test_deliveries_whose_work_reply_was_lost_come_back_soon(deploy: DeploymentFactory) -> None:
    """A sender asks for work and is gone before the answer (or the answer is lost): the
    deliveries leased for it are free again after the short claim, not after a whole lease."""
    d = await deploy({"queue": {"lease_time": 120, "claim_time": 2}}, senders={})
    message_id = queued_id(
        await asyncio.to_thread(d.smtp_send, "s@origin.test", ["lost@a.test"], b"Subject: lost\r\n\r\nx\r\n")
    )
    bus = await zbus.connect(d.nats.url, "test")
    try:
        request = WorkRequest(zone="default", sender="gone-sender", max=10, slice_index=0, slice_count=1)
        # A reply subject nobody listens on: the answer is lost.
        await bus.nc.publish(work_subject("default"), request.encode(), reply="_INBOX.nobody.listens")
    finally:
        await bus.close()

    async def leased() -> bool:
        rows = await d.store.deliveries_of(message_id)
        return bool(rows) and rows[0].leased

    (row,) = await eventually(lambda: _leased_rows(d, message_id), what="the delivery leased for the lost request")
    # Leased for the claim (2 s here), not for the lease of 120 s; and free again after it.
    assert row.lease_expires is not None
    assert (row.lease_expires - datetime.now(UTC)).total_seconds() <= 2.5
    await eventually(lambda: _not_leased(d, message_id), timeout=30, what="the claim run out")


async def _leased_rows(d: Deployment, message_id: str) -> list[Any]:
    rows = await d.store.deliveries_of(message_id)
    return rows if rows and rows[0].leased else []


async def _not_leased(d: Deployment, message_id: str) -> bool:
    rows = await d.store.deliveries_of(message_id)
    return bool(rows) and not rows[0].leased


async def test_a_redis_outage_is_not_a_delivery_attempt(deploy: DeploymentFactory, sinks: dict) -> None:
    """Redis goes away while a delivery is under way: the delivery is given back without an
    attempt counted (no "delivery crashed", no deferral), and goes out once Redis is back."""
    d = await deploy({"plugins": {"tests.slow_fetch_plugin": {"seconds": 2.0}}})
    redis = d.infra.redis

    def sender_log() -> str:
        return d.system.get("sender-default-0").tail_log(300)

    try:
        message_id = queued_id(
            await asyncio.to_thread(d.smtp_send, "s@origin.test", ["slow@a.test"], b"Subject: r\r\n\r\nx\r\n")
        )
        await eventually(lambda: '"event": "fetch held"' in sender_log(), what="the delivery held at sender:fetch")
        await asyncio.to_thread(redis.stop)
        await eventually(
            lambda: "redis unavailable, delivery given back" in sender_log(), what="the delivery given back"
        )
        (row,) = await d.store.deliveries_of(message_id)
        assert row.attempts == 0 and row.last_response is None, row
        assert "delivery crashed" not in sender_log()
    finally:
        await asyncio.to_thread(redis.start)
    await eventually(lambda: len(sinks["127.0.0.2"].messages) == 1, timeout=40, what="delivered after Redis is back")
