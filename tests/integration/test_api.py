"""The HTTP API against a running deployment: submission routes, views and errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support import Deployment, DeploymentFactory


@pytest.fixture(scope="module")
async def api(module_deploy: DeploymentFactory) -> Deployment:
    return await module_deploy({"api": {"max_body": 65536}}, senders={})


async def test_send_raw_takes_the_envelope_from_the_headers(api: Deployment) -> None:
    raw = (
        b"From: Sender <sender@origin.test>\n"  # bare LF, as curl --data-binary sends a file
        b"To: one@a.test, Two <two@b.test>\n"
        b"Cc: one@a.test\n"
        b"Bcc: hidden@a.test\n"
        b"Subject: Hello!\n"
        b"\n"
        b"Hello world\n"
    )
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        response = await client.post("/send-raw", content=raw, headers={"Content-Type": "message/rfc822"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["from"] == "sender@origin.test"
        assert body["to"] == ["one@a.test", "two@b.test", "hidden@a.test"]
        status = (await client.get(f"/message/{body['id']}")).json()
    message = await api.store.get_message(body["id"])
    assert message is not None
    assert b"Bcc" not in message.headers
    assert message.headers.startswith(b"From: Sender <sender@origin.test>\r\nTo: one@a.test, Two <two@b.test>\r\n")
    assert b"".join([c async for c in api.store.iter_body(body["id"])]) == b"Hello world\r\n"
    assert status["meta"]["parsedEnvelope"]["bcc"] == ["hidden@a.test"]
    assert status["meta"]["transtype"] == "HTTP"
    assert [m["recipient"] for m in status["messages"]] == ["one@a.test", "two@b.test", "hidden@a.test"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"to": "x@a.test", "text": "no sender"}, "from"),
        ({"from": "not an address", "to": "x@a.test"}, "from"),
        ({"from": "s@origin.test", "to": "bad@@a.test"}, "to"),
        ({"from": "s@origin.test"}, "to"),
        ({"from": "s@origin.test", "to": "x@a.test", "attachments": [{"path": "/etc/passwd"}]}, "attachments.0.path"),
        ({"from": "s@origin.test", "to": "x@a.test", "headers": {"X-Bad": "a\r\nBcc: x@y.test"}}, "headers"),
    ],
)
async def test_send_refuses_bad_input_naming_the_field(api: Deployment, payload: dict, field: str) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        response = await client.post("/send", json=payload)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert response.json()["error"]


async def test_send_refuses_broken_json(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        response = await client.post("/send", content=b'{"from": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "error" in response.json()


async def test_send_raw_without_recipients_is_refused(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        response = await client.post("/send-raw", content=b"From: s@origin.test\r\nSubject: x\r\n\r\nbody\r\n")
    assert response.status_code == 400
    assert "No recipients" in response.json()["error"]


async def test_send_raw_refuses_a_line_smtp_would_refuse(api: Deployment) -> None:
    """One rule for both intakes: a line of more than 1000 octets (RFC 5321 4.5.3.1.6)."""
    head = b"From: s@origin.test\r\nTo: x@a.test\r\nSubject: long\r\n\r\n"
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        longest = await client.post("/send-raw", content=head + b"y" * 998 + b"\r\n")
        too_long = await client.post("/send-raw", content=head + b"y" * 999 + b"\r\n")
    assert longest.status_code == 200, longest.text
    assert too_long.status_code == 400
    assert "Line too long" in too_long.json()["error"]


async def test_oversized_bodies_get_413(api: Deployment) -> None:
    big = b"From: s@origin.test\r\nTo: x@a.test\r\n\r\n" + b"x" * 70000
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        declared = await client.post("/send-raw", content=big)
        assert declared.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while streaming
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        streamed = await client.post("/send-raw", content=chunks())
        assert streamed.status_code == 413


async def test_unknown_message_is_404_unknown_zone_is_empty(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        message = await client.get("/message/1a2b3c4d5e6f700000")
        zone = await client.get("/counter/zone/atlantis")
    assert message.status_code == 404
    # As the original: a zone it does not know has nothing queued, which is no error.
    assert zone.status_code == 200
    assert zone.json() == {
        "zone": "atlantis",
        "active": {"entries": [], "rows": 0},
        "deferred": {"entries": [], "rows": 0},
    }


async def test_counters_cover_all_zones(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        await client.post("/send", json={"from": "s@origin.test", "to": ["c1@b.test", "c2@b.test"], "text": "x"})
        everything = (await client.get("/counter/zone/")).json()
        default = (await client.get("/counter/zone/default")).json()
        bounces = (await client.get("/counter/zone/bounces")).json()
    assert everything["zone"] == "all"
    assert everything["active"]["rows"] == default["active"]["rows"] >= 2
    # One entry per zone, keyed by its name, zeros included: what the web admin's home page reads.
    entries = {e["key"]: e["value"] for e in everything["active"]["entries"]}
    assert entries == {"bounces": 0, "default": default["active"]["rows"]}
    assert {e["key"] for e in everything["deferred"]["entries"]} == {"bounces", "default"}
    assert bounces["active"] == {"entries": [], "rows": 0}
    assert default["deferred"]["rows"] == 0


async def test_health_and_metrics(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        await client.post("/send", json={"from": "s@origin.test", "to": "m@a.test", "text": "x"})
        health = await client.get("/health")
        metrics = await client.get("/metrics")
    assert health.json()["status"] == "ok"
    assert 'zonemta_message_push{result="success"}' in metrics.text
