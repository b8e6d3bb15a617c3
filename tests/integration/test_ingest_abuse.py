"""One client must not starve the others: idle and slow connections, errors, EHLO injection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory, eventually
from zmta_common.intake import CHUNK_SIZE

SLOW_CLIENT = "127.0.0.8"  # sends one and a half chunks, then a byte a second
IDLE_CLIENT = "127.0.0.9"  # opens connections and says nothing
LEGIT_CLIENT = "127.0.0.10"


class AsyncWire:
    """A raw SMTP client on asyncio streams, for tests that hold hundreds of connections."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str) -> AsyncWire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(reader, writer)

    async def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line.decode(errors="replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(x[4:] for x in lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


@pytest.fixture(scope="module")
async def ingest(module_deploy: DeploymentFactory) -> Deployment:
    # No minimum data rate here: the slow clients must stay as long as the test wants.
    # Ten database connections for the ingest, fewer than the slow clients.
    overrides = {
        "smtp_interfaces": {"feeder": {"min_data_rate": 0}},
        "dbs": {"postgres_pool_size": 10},
    }
    return await module_deploy(overrides, senders={})


async def start_slow_client(port: int) -> AsyncWire:
    wire = await AsyncWire.open(port, SLOW_CLIENT)
    assert (await wire.reply())[0] == 220
    for line in ("EHLO slow.example", "MAIL FROM:<s@origin.test>", "RCPT TO:<a@a.test>"):
        assert (await wire.command(line))[0] == 250
    assert (await wire.command("DATA"))[0] == 354
    wire.writer.write(
        b"Subject: slow\r\n\r\n" + (b"s" * 998 + b"\r\n") * (CHUNK_SIZE * 3 // 2000)
    )  # past the first chunk
    await wire.writer.drain()
    return wire


class Trickle:
    """Slow clients in DATA: a byte a second from each wire."""

    def __init__(self, wires: list[AsyncWire]) -> None:
        self.wires = wires
        self.rounds = 0  # bytes sent by each wire so far

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Trickle until ``done()`` holds; AssertionError if it does not within ``timeout`` seconds."""

        def one_more() -> bool:
            if done():
                return True
            for wire in self.wires:
                wire.writer.write(b"s")
            self.rounds += 1
            return False

        await eventually(one_more, timeout=timeout, interval=1.0, what=what)


def legit_transaction(port: int, body: bytes) -> tuple[float, tuple[int, str]]:
    """Seconds from connect to the reply after DATA, and that reply."""
    started = time.monotonic()
    with SmtpWire(port, source=LEGIT_CLIENT, timeout=60) as wire:
        assert wire.command("EHLO legit.example")[0] == 250
        assert wire.command("MAIL FROM:<l@origin.test>")[0] == 250
        assert wire.command("RCPT TO:<b@b.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        reply = wire.command(body + b".")
    return time.monotonic() - started, reply


async def test_slow_and_idle_clients_do_not_starve_a_legitimate_one(ingest: Deployment) -> None:
    port = ingest.smtp_port
    slow = await asyncio.gather(*(start_slow_client(port) for _ in range(25)))
    idle = await asyncio.gather(*(AsyncWire.open(port, IDLE_CLIENT) for _ in range(300)))
    stop = asyncio.Event()
    trickle = Trickle(slow)
    trickling = asyncio.create_task(trickle.until(stop.is_set, timeout=240, what="the end of the test"))
    try:
        # All 300 are answered at once (a listen backlog of asyncio's default 100 lost some).
        greetings = await asyncio.wait_for(asyncio.gather(*(wire.reply() for wire in idle)), timeout=20)
        refused = [text for code, text in greetings if code == 421]
        assert sum(code == 220 for code, _ in greetings) == 50  # max_connections_per_client
        assert len(refused) == 250
        assert "too many connections from 127.0.0.9" in refused[0]
        # The slow clients are well into their trickle: each past its first chunk, which the
        # ingest stored, and two more bytes sent.
        await eventually(lambda: _chunks_stored(ingest, 25), what="the slow clients' first chunks stored")
        await eventually(lambda: trickle.rounds >= 2, what="two trickled bytes from each slow client")
        small = b"Subject: small\r\n\r\nhello\r\n"
        big = b"Subject: big\r\n\r\n" + (b"b" * 998 + b"\r\n") * (CHUNK_SIZE * 2 // 1000)  # chunk writes of its own
        for body in (small, big, small):
            seconds, reply = await asyncio.to_thread(legit_transaction, port, body)
            assert reply[0] == 250, reply
            assert seconds < 1.0, f"a legitimate message took {seconds:.2f} s"
    finally:
        stop.set()
        await trickling
        for wire in (*slow, *idle):
            wire.close()


async def test_ehlo_with_a_line_break_or_control_character_is_refused(ingest: Deployment) -> None:
    with SmtpWire(ingest.smtp_port) as wire:
        for argument in ("probe.example\rX-Injected: yes", "probe.example\r.\r", "a\x0bb", "two words"):
            for verb in ("EHLO", "HELO"):
                code, text = wire.command(f"{verb} {argument}")
                assert code == 501, (verb, argument, text)
        code, _ = wire.command("MAIL FROM:<s@origin.test>")
        assert code == 503  # no EHLO was taken
        assert wire.command("EHLO client.example")[0] == 250


async def test_a_connection_is_closed_after_too_many_errors(ingest: Deployment) -> None:
    with SmtpWire(ingest.smtp_port, source="127.0.0.11") as wire:
        assert wire.command("EHLO client.example")[0] == 250
        codes = [wire.command("MAIL FROM:no-brackets@origin.test")[0] for _ in range(20)]
        assert codes == [501] * 20  # max_errors_per_connection
        code, text = wire.reply()
        assert code == 421, text
        assert "Too many errors" in text
        with pytest.raises(ConnectionError):
            wire.reply()


async def test_a_client_under_the_minimum_data_rate_is_cut_off(deploy: DeploymentFactory) -> None:
    d = await deploy({"smtp_interfaces": {"feeder": {"min_data_rate": 1000, "data_rate_window": 1}}}, senders={})
    wire = await AsyncWire.open(d.smtp_port, SLOW_CLIENT)
    try:
        assert (await wire.reply())[0] == 220
        for line in ("EHLO slow.example", "MAIL FROM:<s@origin.test>", "RCPT TO:<a@a.test>"):
            assert (await wire.command(line))[0] == 250
        assert (await wire.command("DATA"))[0] == 354
        wire.writer.write(b"Subject: slow\r\n\r\n" + b"x" * 300_000)  # one fast second, then almost nothing
        started = time.monotonic()
        answer = asyncio.create_task(wire.reply())
        try:
            await Trickle([wire]).until(answer.done, timeout=10, what="the slow client cut off")
        finally:
            answer.cancel()  # nothing to cancel once it came
        code, text = answer.result()
        assert code == 421, text
        assert "DATA too slow" in text
        assert time.monotonic() - started < 10
    finally:
        wire.close()
    # A client at a normal pace is not affected, and the slow one left nothing behind.
    _, reply = await asyncio.to_thread(legit_transaction, d.smtp_port, b"Subject: ok\r\n\r\n" + b"y\r\n" * 200_000)
    assert reply[0] == 250, reply
    counts = await eventually(lambda: _one_message(d), what="only the legitimate message stored")
    assert counts["deliveries"] == 1


async def _chunks_stored(d: Deployment, count: int) -> bool:
    return (await d.store.row_counts())["message_chunks"] == count


async def _one_message(d: Deployment) -> dict[str, int] | None:
    counts = await d.store.row_counts()
    return counts if counts["messages"] == 1 else None
