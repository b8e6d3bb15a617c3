"""Several ingest processes behind one port (SO_REUSEPORT): each takes its share of the
connections, and every message is stored once."""

from __future__ import annotations

import asyncio

from tests.smtpwire import SmtpWire
from tests.support import DeploymentFactory


def send_one(port: int, n: int) -> str:
    with SmtpWire(port) as wire:
        assert wire.command("EHLO client.test")[0] == 250
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command(f"RCPT TO:<r{n}@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        code, text = wire.command(f"Subject: {n}\r\n\r\nbody {n}\r\n.".encode())
        assert code == 250, text
        return text


async def test_two_ingest_processes_share_the_port(deploy: DeploymentFactory) -> None:
    d = await deploy(senders={}, start=False)
    await asyncio.to_thread(d.system.start, {}, True, 2)
    replies = [await asyncio.to_thread(send_one, d.smtp_port, n) for n in range(40)]

    assert len(set(replies)) == 40
    assert (await d.store.row_counts())["messages"] == 40
    for name in ("ingest-0", "ingest-1"):
        process = d.system.get(name)
        assert process.alive
        log = process.log_path.read_text() if process.log_path else ""
        # The kernel spreads connections by their addresses: 40 never all go to one.
        assert '"event": "queued"' in log, f"{name} took no connection"
