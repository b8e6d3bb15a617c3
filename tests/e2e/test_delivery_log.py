"""The delivery log through the whole system: what intake, the senders' outcomes and the
operator's actions write, how it is searched, paged and summed up, and holds."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from tests.support import DeploymentFactory, eventually
from zmta_common.events import LogEvent
from zmta_devtools.servers import free_port


async def send(client: httpx.AsyncClient, to: str, sender: str = "News@Origin.test") -> str:
    response = await client.post("/send", json={"from": sender, "to": to, "text": "logged"})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def entries(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/log", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["entries"])


async def test_a_message_life_is_logged_searchable_and_summed_up(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"defer_times": [3600]}}}, senders={"default": 1})
    sinks["127.0.0.2"].handler.scripted["later@a.test"] = ["451 4.3.0 Please try again later"]
    async with httpx.AsyncClient(base_url=d.api_url) as client:
        delivered = await send(client, "Bob@B.test")
        deferred = await send(client, "later@a.test")

        async def bob_accepted() -> list[dict[str, Any]]:
            found = await entries(client, recipient="bob@b.test")  # any case finds it
            return found if [e["action"] for e in found] == ["ACCEPTED", "QUEUED"] else []

        accepted, queued = await eventually(bob_accepted, what="Bob's QUEUED and ACCEPTED entries")
        assert (queued["id"], queued["seq"], queued["zone"], queued["to"]) == (
            delivered,
            "001",
            "default",
            "bob@b.test",
        )
        assert (queued["from"], queued["domain"], queued["interface"]) == ("news@origin.test", "b.test", "api")
        assert queued["size"] > 0
        assert accepted["response"].startswith("250") and accepted["mx"] == "mx.b.test"
        assert accepted["tls"] and accepted["time"] >= queued["time"]
        assert accepted["ip"] == "127.0.0.3" and accepted["timer_ms"] >= 0

        async def deferral() -> list[dict[str, Any]]:
            return await entries(client, id=deferred, action="deferred")

        (entry,) = await eventually(deferral, what="the DEFERRED entry")
        assert entry["response"] == "451 4.3.0 Please try again later" and entry["next_attempt"]
        # Per message, oldest first, in GET /message/<id> (the original's shape, with "log").
        status = (await client.get(f"/message/{deferred}")).json()
        assert [e["action"] for e in status["log"]] == ["QUEUED", "DEFERRED"]

        # Held: listed as held, never attempted, logged; released: delivered.
        held = await client.post(f"/message/{deferred}/hold")
        assert held.json() == {"success": True, "held": 1}
        shown = await client.get(f"/message/{deferred}")  # a held delivery waits for 'infinity'
        assert shown.status_code == 200, shown.text
        assert shown.json()["messages"][0]["deferred"]["next"] > 250_000_000_000_000  # the year 9999, in ms
        listed = (await client.get("/queued/held/default")).json()
        assert [(r["id"], r["seq"]) for r in listed["list"]] == [(deferred, "001")] and listed["type"] == "held"
        assert (await client.get("/queued/deferred/default")).json()["list"] == []
        assert (await client.post("/retry/default")).json() == {"success": True, "retried": 0}  # held stays held
        sinks["127.0.0.2"].handler.scripted.clear()
        released = await client.delete(f"/message/{deferred}/hold")
        assert released.json() == {"success": True, "released": 1}

        async def later_accepted() -> bool:
            return bool(await entries(client, id=deferred, action="ACCEPTED"))

        await eventually(later_accepted, what="the released delivery accepted")
        actions = [e["action"] for e in reversed(await entries(client, id=deferred))]
        assert actions == ["QUEUED", "DEFERRED", "HELD", "RELEASED", "ACCEPTED"]

        # Filters combine; a page at a time, newest first, with a cursor for the older ones.
        by_sender = await entries(client, sender="<news@origin.test>", action="QUEUED")
        assert {e["id"] for e in by_sender} == {delivered, deferred}
        first = (await client.get("/log", params={"domain": "A.test", "limit": 2})).json()
        second = (await client.get("/log", params={"domain": "a.test", "limit": 2, "cursor": first["next"]})).json()
        third = (await client.get("/log", params={"domain": "a.test", "limit": 2, "cursor": second["next"]})).json()
        paged = [e["action"] for page in (first, second, third) for e in page["entries"]]
        assert paged == ["ACCEPTED", "RELEASED", "HELD", "DEFERRED", "QUEUED"] and third["next"] is None

        stats = (await client.get("/log/stats", params={"hours": 2})).json()
        totals = {k: sum(h[k] for h in stats["hours"]) for k in ("queued", "delivered", "deferred", "bounced")}
        assert totals == {"queued": 2, "delivered": 2, "deferred": 1, "bounced": 0}
        assert {"domain": "a.test", "count": 1} in stats["domains"]

        for bad, field in (
            (("action", "LOST"), "action"),
            (("since", "yesterday"), "since"),
            (("cursor", "!"), "cursor"),
        ):
            response = await client.get("/log", params=dict([bad]))
            assert (response.status_code, response.json()["field"]) == (400, field)


async def test_a_suppressed_recipient_and_a_dropped_message_are_logged(deploy: DeploymentFactory) -> None:
    d = await deploy(senders={})
    async with httpx.AsyncClient(base_url=d.api_url) as client:
        assert (await client.post("/suppressionlist", json={"address": "gone@a.test"})).status_code == 200
        message_id = (
            await client.post(
                "/send", json={"from": "s@origin.test", "to": ["gone@a.test", "kept@a.test"], "text": "x"}
            )
        ).json()["id"]
        assert (await client.delete(f"/message/{message_id}")).json() == {"success": True}
        found = {(e["to"], e["action"], e.get("reason")) for e in await entries(client, id=message_id)}
        assert found == {
            ("gone@a.test", "DROP", "suppressed"),
            ("kept@a.test", "QUEUED", None),
            ("kept@a.test", "DELETED", "dropped through the api"),
        }


class Hook(BaseHTTPRequestHandler):
    """A webhook receiver that keeps every batch it is sent."""

    batches: ClassVar[list[list[dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.batches.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    Hook.batches.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/log"
    server.shutdown()
    server.server_close()


async def test_the_log_is_streamed_on_nats_and_to_a_webhook(deploy: DeploymentFactory, hook: str) -> None:
    d = await deploy({"delivery_log": {"stream": True, "webhook_url": hook, "stream_lag": 1}})
    nc = await nats.connect(d.nats.url)
    events: list[LogEvent] = []

    async def record(msg: Msg) -> None:
        events.append(LogEvent.decode(msg.data))

    try:
        await nc.subscribe("zmta.log.>", cb=record)
        await nc.flush()
        async with httpx.AsyncClient(base_url=d.api_url) as client:
            message_id = await send(client, "someone@b.test")
        await eventually(lambda: [e.action for e in events] == ["QUEUED", "ACCEPTED"], what="both entries on NATS")
    finally:
        await nc.close()
    assert {(e.id, e.recipient, e.zone) for e in events} == {(message_id, "someone@b.test", "default")}
    assert events[1].details["mx"] == "mx.b.test"
    posted = [entry for batch in Hook.batches for entry in batch]
    assert [(e["action"], e["id"], e["to"]) for e in posted] == [
        ("QUEUED", message_id, "someone@b.test"),
        ("ACCEPTED", message_id, "someone@b.test"),
    ]


async def test_a_bounce_and_its_dsn_are_logged(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy()
    sinks["127.0.0.2"].handler.scripted["gone@a.test"] = ["550 5.1.1 <gone@a.test>: Recipient address rejected"]
    async with httpx.AsyncClient(base_url=d.api_url) as client:
        message_id = await send(client, "gone@a.test", sender="s@origin.test")

        async def bounced() -> list[dict[str, Any]]:
            found = await entries(client, id=message_id)
            return found if [e["action"] for e in found] == ["QUEUE_BOUNCE", "REJECTED", "QUEUED"] else []

        dsn, rejected, _ = await eventually(bounced, what="the REJECTED and QUEUE_BOUNCE entries")
        assert (rejected["category"], rejected["ip"]) == ("recipient_unknown", "127.0.0.2")
        assert (dsn["reason"], dsn["category"], dsn["to"]) == ("failure", "recipient_unknown", "gone@a.test")
        # The DSN is a message of its own, with its own log, to the sender.
        (its_queued,) = await entries(client, id=dsn["bounce_id"], action="QUEUED")
        assert (its_queued["to"], its_queued["from"], its_queued["interface"]) == ("s@origin.test", "", "bounce")
