"""Routing to sending zones, through SMTP and the API alike, and each zone's own senders."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory, eventually, work_requests

ZONES = {
    "zones": {
        "vip": {"routing_headers": {"X-User-ID": "123"}},
        "brand": {"sender_domains": ["brand.test"]},
        "bulk": {"recipient_domains": ["b.test"]},
    },
    "smtp_interfaces": {"feeder": {"allow_routing_headers": True}},
}


@pytest.fixture(scope="module")
async def routed(module_deploy: DeploymentFactory) -> Deployment:
    return await module_deploy(ZONES, senders={})


def smtp(d: Deployment, mail_from: str, rcpts: list[str], head: str) -> tuple[int, str]:
    with SmtpWire(d.smtp_port) as wire:
        wire.command("EHLO client.test")
        assert wire.command(f"MAIL FROM:<{mail_from}>")[0] == 250
        for rcpt in rcpts:
            assert wire.command(f"RCPT TO:<{rcpt}>")[0] == 250
        assert wire.command("DATA")[0] == 354
        return wire.command(f"{head}Subject: routing\r\n\r\nbody\r\n.".encode())


async def zones_of(d: Deployment, reply: tuple[int, str]) -> list[str]:
    assert reply[0] == 250, reply
    message_id = re.search(r"queued as ([0-9a-f]+)", reply[1]).group(1)  # type: ignore[union-attr]
    return [row.zone for row in await d.store.deliveries_of(message_id)]


@pytest.mark.parametrize(
    ("mail_from", "rcpts", "head", "expected"),
    [
        # X-Sending-Zone beats everything else
        ("s@brand.test", ["x@b.test"], "X-Sending-Zone: VIP\r\nX-User-ID: 9\r\n", ["vip"]),
        # then routing_headers
        ("s@brand.test", ["x@b.test"], "X-User-ID: 123\r\n", ["vip"]),
        # then the sender's domain
        ("s@brand.test", ["x@b.test"], "", ["brand"]),
        # then each recipient's domain: one message fans out to two zones
        ("s@origin.test", ["x@a.test", "y@b.test", "z@a.test"], "", ["default", "bulk", "default"]),
    ],
)
async def test_smtp_routing_precedence(
    routed: Deployment, mail_from: str, rcpts: list, head: str, expected: list
) -> None:
    assert await zones_of(routed, await asyncio.to_thread(smtp, routed, mail_from, rcpts, head)) == expected


async def test_smtp_unknown_zone_is_refused_clearly(routed: Deployment) -> None:
    code, text = await asyncio.to_thread(smtp, routed, "s@origin.test", ["x@a.test"], "X-Sending-Zone: nowhere\r\n")
    assert code == 550
    assert "sending zone 'nowhere' does not exist" in text


async def test_api_routes_the_same_way(routed: Deployment) -> None:
    async with httpx.AsyncClient(base_url=routed.api_url) as api:
        fan_out = await api.post("/send", json={"from": "s@origin.test", "to": ["x@a.test", "y@b.test"], "text": "x"})
        by_header = await api.post(
            "/send", json={"from": "s@origin.test", "to": "x@a.test", "text": "x", "headers": {"X-User-ID": "123"}}
        )
        unknown = await api.post(
            "/send-raw", content=b"From: s@origin.test\r\nTo: x@a.test\r\nX-Sending-Zone: nowhere\r\n\r\nx\r\n"
        )
        fan_out_status = (await api.get(f"/message/{fan_out.json()['id']}")).json()
        header_status = (await api.get(f"/message/{by_header.json()['id']}")).json()
    assert [m["zone"] for m in fan_out_status["messages"]] == ["default", "bulk"]
    assert [m["zone"] for m in header_status["messages"]] == ["vip"]
    assert unknown.status_code == 400
    assert "nowhere" in unknown.json()["error"]


async def test_each_zone_is_delivered_by_its_own_senders(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy(ZONES, senders={"bulk": 1})
    async with work_requests(d, "*") as requests:
        await asyncio.to_thread(d.smtp_send, "s@origin.test", ["x@a.test", "y@b.test"], b"Subject: z\r\n\r\nx\r\n")
        await eventually(lambda: sinks["127.0.0.3"].messages, what="the bulk zone's delivery")
        await requests.two_more()  # the queue has answered with the default zone's delivery ready
    assert set(requests.zones) == {"bulk"}  # no sender asks for the default zone's work
    assert sinks["127.0.0.2"].messages == []  # nobody delivers for the default zone here
    rows = await d.store.pool.fetch("SELECT zone, recipient, lease_token IS NOT NULL AS leased FROM deliveries")
    assert [(r["zone"], r["recipient"], r["leased"]) for r in rows] == [("default", "x@a.test", False)]
