"""The whole pipeline on real servers: SMTP and HTTP in, the recipients' MX sinks out."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re

import httpx
import pytest

from tests.support import Deployment, DeploymentFactory, eventually

SMTP_MESSAGE = (
    b"From: Sender <sender@origin.test>\r\n"
    b"To: one@a.test, two@a.test\r\n"
    b"Cc: three@b.test\r\n"
    b"Subject: pipeline test\r\n"
    b"Message-ID: <pipeline-1@origin.test>\r\n"
    b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
    b"X-Folded: first part\r\n"
    b"\tsecond part\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
    b"\r\n"
    b"\r\n"
)


def strip_received(data: bytes) -> tuple[bytes, bytes]:
    """Split off the Received header our sender put on top: (received, rest)."""
    assert data.startswith(b"Received: "), data[:200]
    match = re.match(rb"Received: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", data)
    assert match is not None
    return match.group(0), data[match.end() :]


async def test_smtp_and_http_messages_reach_their_mx(deploy: DeploymentFactory, sinks: dict) -> None:
    d: Deployment = await deploy(senders={})
    reply = await asyncio.to_thread(
        d.smtp_send, "sender@origin.test", ["one@a.test", "two@a.test", "three@b.test"], SMTP_MESSAGE
    )
    smtp_id = re.search(r"queued as ([0-9a-f]+)", reply).group(1)  # type: ignore[union-attr]

    async with httpx.AsyncClient(base_url=d.api_url) as api:
        sent = await api.post(
            "/send",
            json={"from": "Api <api@origin.test>", "to": "four@b.test", "subject": "via api", "text": "json body"},
            headers={"X-Authenticated-User": "andris", "X-Originating-IP": "192.0.2.7"},
        )
        assert sent.status_code == 200, sent.text
        api_reply = sent.json()
        assert api_reply["from"] == "api@origin.test"
        assert api_reply["to"] == ["four@b.test"]
        assert api_reply["response"] == f"Message queued as {api_reply['id']}"

        # Before delivery: /message lists every queued delivery with the original's shape.
        status = (await api.get(f"/message/{smtp_id}")).json()
        assert status["meta"]["id"] == smtp_id
        assert status["meta"]["from"] == "sender@origin.test"
        assert status["meta"]["to"] == ["one@a.test", "two@a.test", "three@b.test"]
        assert status["meta"]["messageId"] == "<pipeline-1@origin.test>"
        assert {"key": "subject", "line": "Subject: pipeline test"} in status["meta"]["headers"]
        assert [(m["seq"], m["recipient"], m["status"], m["zone"]) for m in status["messages"]] == [
            ("001", "one@a.test", "QUEUED", "default"),
            ("002", "two@a.test", "QUEUED", "default"),
            ("003", "three@b.test", "QUEUED", "default"),
        ]
        api_status = (await api.get(f"/message/{api_reply['id']}")).json()
        assert api_status["meta"]["user"] == "andris"
        assert api_status["meta"]["origin"] == "192.0.2.7"
        counters = (await api.get("/counter/zone/default")).json()
        assert counters["active"]["rows"] == 4
        assert {"key": "a.test", "value": 2} in counters["active"]["entries"]

        # Now let the default zone's sender work.
        await asyncio.to_thread(d.system.start_sender, "default")
        a, b = sinks["127.0.0.2"], sinks["127.0.0.3"]
        await eventually(lambda: len(a.messages) == 2 and len(b.messages) == 2, what="4 deliveries")

        for item in a.messages + [m for m in b.messages if m.rcpt_tos == ["three@b.test"]]:
            assert item.mail_from == "sender@origin.test"
            received, rest = strip_received(item.data)
            assert rest == SMTP_MESSAGE  # byte for byte, apart from our Received header
            assert f"id {smtp_id}.".encode() in received
            assert b"by mta.test (ZoneMTA)" in received
        assert sorted(m.rcpt_tos[0] for m in a.messages) == ["one@a.test", "two@a.test"]

        via_api = next(m for m in b.messages if m.rcpt_tos == ["four@b.test"])
        parsed = email.message_from_bytes(strip_received(via_api.data)[1], policy=email.policy.default)
        assert parsed["Subject"] == "via api"
        assert parsed["From"] == "Api <api@origin.test>"
        assert parsed["Message-ID"] and parsed["Date"]  # added at intake
        assert parsed.get_content().strip() == "json body"

        # After delivery the queue forgets the messages, and the store is empty.
        await eventually(lambda: _gone(api, smtp_id, api_reply["id"]), what="/message 404 for both messages")
    assert await d.store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}

    # Each service counts what it did, under the original's metric names.
    async with httpx.AsyncClient() as http:
        ingest = (await http.get(f"http://127.0.0.1:{d.config.metrics.ingest_port}/metrics")).text
        queue = (await http.get(f"http://127.0.0.1:{d.config.metrics.queue_port}/metrics")).text
    assert 'zonemta_message_push{result="success"} 1.0' in ingest
    assert 'zonemta_delivery_status{result="delivered",status="delivered",zone="default"} 4.0' in queue
    assert 'zonemta_queue_size{type="queued",zone="default"}' in queue


async def _gone(api: httpx.AsyncClient, *ids: str) -> bool:
    for message_id in ids:
        response = await api.get(f"/message/{message_id}")
        if response.status_code != 404:
            return False
        assert "error" in response.json()
    return True


async def test_missing_message_id_and_date_are_added(deploy: DeploymentFactory, sinks: dict) -> None:
    d: Deployment = await deploy()
    body = b"From: s@origin.test\r\nTo: x@a.test\r\nSubject: bare\r\n\r\nbody\r\n"
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@a.test"], body)
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="delivery")
    _, rest = strip_received(sink.messages[0].data)
    head, _, tail = rest.partition(b"\r\n\r\n")
    assert tail == b"body\r\n"
    assert head.startswith(b"From: s@origin.test\r\nTo: x@a.test\r\nSubject: bare\r\n")
    assert re.search(rb"\r\nMessage-ID: <[0-9a-f-]+@origin\.test>", head)
    assert re.search(rb"\r\nDate: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", head)


async def test_delivery_to_a_records_when_there_is_no_mx(deploy: DeploymentFactory, sinks: dict) -> None:
    d: Deployment = await deploy()
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@amx.test"], b"Subject: a\r\n\r\nhi\r\n")
    await eventually(lambda: sinks["127.0.0.5"].messages, what="delivery via A record")


@pytest.mark.slow
async def test_kill_9_of_a_sender_loses_nothing(deploy: DeploymentFactory, sinks: dict) -> None:
    d: Deployment = await deploy({"queue": {"lease_time": 4}, "zones": {"default": {"slot_ttl": 3}}}, senders={})
    slow = sinks["127.0.0.4"]
    slow.handler.data_delay = 30.0  # the sender sits in DATA until we kill it
    total = 12
    for n in range(total):
        data = f"Message-ID: <kill-{n}@origin.test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()
        await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"r{n}@slow.test"], data)

    first = await asyncio.to_thread(d.system.start_sender, "default")
    # Wait until the sender holds leases: as many as the domain's connection limit (5 by default),
    # each stuck in DATA. Its connection slots die with it and expire slot_ttl (3 s) later.
    await eventually(lambda: _leased(d), what="leases held by the first sender")
    first.kill()
    assert not first.alive
    slow.handler.data_delay = 0.0
    assert slow.messages == []  # nothing was accepted while the sender was alive

    await asyncio.to_thread(d.system.start_sender, "default")
    await eventually(lambda: len({_mid(m.data) for m in slow.messages}) == total, timeout=90, what="all messages")
    assert {_mid(m.data) for m in slow.messages} == {f"<kill-{n}@origin.test>" for n in range(total)}
    await eventually(lambda: _empty(d), what="empty store")


async def _leased(d: Deployment) -> bool:
    count: int = await d.store.pool.fetchval("SELECT count(*) FROM deliveries WHERE lease_expires > now()")
    return count >= 5


async def _empty(d: Deployment) -> bool:
    return await d.store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}


def _mid(data: bytes) -> str:
    match = re.search(rb"Message-ID: (<[^>]+>)", data)
    assert match is not None
    return match.group(1).decode()


async def test_a_connection_carries_the_next_message_to_the_same_server(deploy: DeploymentFactory, sinks: dict) -> None:
    d: Deployment = await deploy()
    sink = sinks["127.0.0.3"]
    for n in range(4):
        await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"r{n}@b.test"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        # n=n: bound now (mypy cannot type a lambda with a default)
        await eventually(lambda n=n: len(sink.messages) == n + 1, what=f"delivery {n}")  # type: ignore[misc]
    # One after the other, within the idle time: all four over one connection.
    assert len({m.peer for m in sink.messages}) == 1
