"""A 200 MB message streams through the ingest without the process growing with it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading

import psutil
import pytest

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory, eventually

MB = 1024 * 1024
LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"  # 78 bytes
BLOCK = LINE * (MB // len(LINE))


class PeakRss:
    """Samples a process's resident memory in a thread and keeps the highest value."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def send(port: int, blocks: int) -> tuple[tuple[int, str], bytes]:
    """Send a message of ``blocks`` MB; return the final reply and the body's sha256."""
    digest = hashlib.sha256()
    with SmtpWire(port, timeout=300) as wire:
        wire.command("EHLO client.test")
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command("RCPT TO:<big@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        wire.send(b"Subject: big\r\n\r\n")
        for _ in range(blocks):
            wire.send(BLOCK)
            digest.update(BLOCK)
        return wire.command(b"."), digest.digest()


@pytest.mark.slow
async def test_200_mb_message_does_not_grow_the_ingest_by_50_mb(deploy: DeploymentFactory) -> None:
    d = await deploy({"smtp_interfaces": {"feeder": {"max_size": 300 * MB}}}, senders={})
    ingest_pid = d.system.get("ingest").proc.pid  # type: ignore[union-attr]
    warm, _ = await asyncio.to_thread(send, d.smtp_port, 1)  # pools, imports, first chunks
    assert warm[0] == 250, warm
    baseline = psutil.Process(ingest_pid).memory_info().rss

    with PeakRss(ingest_pid) as rss:
        reply, sha = await asyncio.to_thread(send, d.smtp_port, 200)
    assert reply[0] == 250, reply
    growth = rss.peak - baseline
    assert growth < 50 * MB, f"ingest grew by {growth / MB:.1f} MB"

    message_id = reply[1].rsplit(" ", 1)[-1]
    message = await d.store.get_message(message_id)
    assert message is not None
    assert message.body_size == 200 * len(BLOCK)
    # These lines have no whitespace to canonicalise: the relaxed body hash is the plain sha256.
    assert message.meta["dkim"]["bodyHash"] == base64.b64encode(sha).decode()


async def has_chunks(d: Deployment) -> bool:
    return (await d.store.row_counts())["message_chunks"] > 0


async def nothing_stored(d: Deployment) -> bool:
    return await d.store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}


async def test_a_client_gone_in_the_middle_of_a_big_message_leaves_nothing(deploy: DeploymentFactory) -> None:
    """Chunks are written while the client goes on sending; when it goes away, the chunks
    written (and the one being written) go with the message."""
    d = await deploy(senders={})
    with SmtpWire(d.smtp_port, timeout=60) as wire:
        wire.command("EHLO client.test")
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command("RCPT TO:<gone@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        wire.send(b"Subject: big\r\n\r\n" + BLOCK * 3)
        await eventually(lambda: has_chunks(d), what="leading chunks stored")
        for _ in range(4):
            wire.send(BLOCK)
    # The connection is closed without the end of DATA.
    await eventually(lambda: nothing_stored(d), what="the abandoned message removed")
