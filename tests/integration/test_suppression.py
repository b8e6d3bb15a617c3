"""The suppression list: its API routes, and mail to suppressed recipients dropped at intake."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.support import Deployment, DeploymentFactory

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(scope="module")
async def d(module_deploy: DeploymentFactory) -> Deployment:
    return await module_deploy(senders={})


async def test_routes_in_the_originals_shapes(d: Deployment) -> None:
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        added = (await api.post("/suppressionlist", json={"address": "Gone@A.test"})).json()
        domain = (await api.post("/suppressionlist", json={"domain": "blocked.test"})).json()
        again = (await api.post("/suppressionlist", json={"address": "gone@a.test"})).json()
        listing = (await api.get("/suppressionlist")).json()
        bad = await api.post("/suppressionlist", json={"address": "not an address"})
        both = await api.post("/suppressionlist", json={"address": "x@a.test", "domain": "a.test"})
    assert set(added["suppressed"]) == {"id", "address"}
    assert added["suppressed"]["address"] == "gone@a.test"
    assert re.fullmatch(r"[0-9a-f]{24}", added["suppressed"]["id"])
    assert domain["suppressed"]["domain"] == "blocked.test"
    assert again == added  # the same entry, not a second one
    entries = {e["id"]: e for e in listing["suppressed"]}
    assert entries[added["suppressed"]["id"]]["address"] == "gone@a.test"
    assert entries[domain["suppressed"]["id"]]["domain"] == "blocked.test"
    assert all("created" in e for e in listing["suppressed"])
    assert (bad.status_code, bad.json()["field"]) == (400, "address")
    assert both.status_code == 400


async def test_created_is_written_like_every_other_time_of_the_api(d: Deployment) -> None:
    """The format of /queued, /pause and /blacklist (JavaScript's toISOString, as the original's
    JSON writes a Date): UTC, milliseconds, Z."""
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        added = (await api.post("/suppressionlist", json={"address": "when@a.test"})).json()["suppressed"]
        held = (await api.post("/pause/default")).json()["paused"]
        await api.delete("/pause/default")
        listing = (await api.get("/suppressionlist")).json()["suppressed"]
    (entry,) = [e for e in listing if e["id"] == added["id"]]
    assert ISO.fullmatch(entry["created"]), entry["created"]
    assert ISO.fullmatch(held["created"])  # the same format as another route's time
    created = datetime.fromisoformat(entry["created"].replace("Z", "+00:00"))
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)


async def test_the_web_admins_suppression_form(d: Deployment) -> None:
    """zmta-webadmin posts both fields, the one it does not use empty, as JSON or as a form."""
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        as_json = await api.post("/suppressionlist", json={"address": "Admin@A.test", "domain": ""})
        as_form = await api.post("/suppressionlist", data={"address": "", "domain": "Form.test"})
        unknown_field = await api.post("/suppressionlist", json={"mailbox": "x@a.test"})
        not_json = await api.post("/suppressionlist", content=b"{", headers={"Content-Type": "application/json"})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["suppressed"]["address"] == "admin@a.test"
    assert as_form.status_code == 200, as_form.text
    assert as_form.json()["suppressed"]["domain"] == "form.test"
    assert (unknown_field.status_code, unknown_field.json()["field"]) == (400, "mailbox")
    assert not_json.status_code == 400


async def test_suppressed_recipients_are_dropped_at_intake(d: Deployment) -> None:
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        await api.post("/suppressionlist", json={"address": "gone@a.test"})
        await api.post("/suppressionlist", json={"domain": "blocked.test"})
        mixed = (
            await api.post(
                "/send",
                json={"from": "s@origin.test", "to": ["GONE@a.test", "x@blocked.test", "kept@b.test"], "text": "x"},
            )
        ).json()
        rows = (await api.get(f"/message/{mixed['id']}")).json()["messages"]
        assert [(r["seq"], r["recipient"]) for r in rows] == [("003", "kept@b.test")]

        before = await d.store.row_counts()
        reply = await asyncio.to_thread(
            d.smtp_send, "s@origin.test", ["gone@a.test", "y@blocked.test"], b"Subject: x\r\n\r\nx\r\n"
        )
        assert "queued as" in reply  # the client is not told
        assert await d.store.row_counts() == before  # nothing stored
        metrics = (await api.get(f"http://127.0.0.1:{d.config.metrics.ingest_port}/metrics")).text
    assert "zonemta_message_drop 1.0" in metrics


async def test_delete_by_query_or_body(d: Deployment) -> None:
    async with httpx.AsyncClient(base_url=d.api_url) as api:
        one = (await api.post("/suppressionlist", json={"address": "one@c.test"})).json()["suppressed"]["id"]
        two = (await api.post("/suppressionlist", json={"domain": "two.test"})).json()["suppressed"]["id"]
        by_query = await api.delete(f"/suppressionlist?id={one}")
        by_body = await api.request("DELETE", "/suppressionlist", json={"id": two})
        missing = await api.delete(f"/suppressionlist?id={one}")
        listing = (await api.get("/suppressionlist")).json()["suppressed"]
    assert by_query.json() == {"deleted": one}
    assert by_body.json() == {"deleted": two}
    assert missing.status_code == 404
    assert {one, two}.isdisjoint(e["id"] for e in listing)
