"""SIGTERM, as Kubernetes stops a pod: nothing in flight is lost, and the process exits in time.

A sender stops asking for work, lets the deliveries it can finish within its grace
period finish, and gives the leases of the others back to the queue at once (no
waiting for a lease to expire). Ingest stops accepting connections and lets a
transaction in progress finish; an idle session is told 421.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import Deployment, DeploymentFactory, eventually, log_entries
from zmta_devtools.sink import Sink

GRACE = 6.0  # the sender's --shutdown-grace: 4 s to finish (the fast ones take 3), 2 s to give the rest back
FAST = [f"<fast-{n}@origin.test>" for n in range(6)]  # a.test: 3 s in DATA, finishes in time
SLOW = [f"<slow-{n}@origin.test>" for n in range(6)]  # slow.test: 60 s in DATA, cannot finish


@pytest.fixture
def in_data(sinks: dict[str, Sink], monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Per sink address: the sessions that have sent a whole message there and wait for the
    reply, counted in the sessions opened from now on (a session takes its handler's hooks
    when it opens)."""
    counts: Counter[str] = Counter()
    for address, sink in sinks.items():
        monkeypatch.setitem(vars(sink.handler), "handle_DATA", _counting(sink.handler.handle_DATA, counts, address))
    return counts


DataHook = Callable[[SMTP, Session, Envelope], Awaitable[str]]


def _counting(handle_data: DataHook, counts: Counter[str], address: str) -> DataHook:
    async def counted(server: SMTP, session: Session, envelope: Envelope) -> str:
        counts[address] += 1
        return await handle_data(server, session, envelope)

    return counted


@pytest.mark.slow
async def test_sigterm_to_a_sender_with_leases_in_flight_loses_nothing(
    deploy: DeploymentFactory, sinks: dict[str, Sink], in_data: Counter[str]
) -> None:
    # Leases that outlive the test: whatever comes back to the queue was given back.
    d: Deployment = await deploy({"queue": {"lease_time": 600}}, senders={}, start=False)
    await asyncio.to_thread(d.system.start, {}, False)  # queue, bounce, ingest; no sender yet
    fast, slow = sinks["127.0.0.2"], sinks["127.0.0.4"]
    fast.handler.data_delay = 3.0
    slow.handler.data_delay = 60.0
    for n, message_id in enumerate(FAST):
        await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"r{n}@a.test"], _message(message_id))
    for n, message_id in enumerate(SLOW):
        await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"r{n}@slow.test"], _message(message_id))

    sender = await asyncio.to_thread(d.system.start_sender, "default", True, "--shutdown-grace", str(GRACE))
    # In flight: both domains' connection limit (5 each, 10 in all) reached, every one in DATA.
    await eventually(
        lambda: in_data["127.0.0.2"] >= 5 and in_data["127.0.0.4"] >= 5, timeout=30, what="deliveries in DATA"
    )
    assert await _leased(d) == 10
    assert fast.messages == [] and slow.messages == []

    assert sender.proc is not None
    started = time.monotonic()
    sender.proc.send_signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(sender.proc.wait, GRACE + 15)
    took = time.monotonic() - started
    assert returncode == 0, sender.tail_log()
    assert took <= GRACE + 3, f"the sender took {took:.1f}s to stop with a grace of {GRACE}s"
    assert took >= 1.5  # it did wait for the deliveries it could finish

    # Every delivery is delivered (at the sink) or back in the queue (no lease), not both.
    async def settled() -> bool:
        rows = await _rows(d)
        queued = {mid for mid, leased, _ in rows}
        delivered = {_mid(m.data) for m in fast.messages + slow.messages}
        return (
            not any(leased for _, leased, _ in rows)
            and not queued & delivered
            and queued | delivered == set(FAST + SLOW)
        )

    await eventually(settled, timeout=20, what="every delivery delivered or back in the queue")
    delivered = [_mid(m.data) for m in fast.messages]
    assert len(delivered) == len(set(delivered)) == 5  # the five in flight to a.test finished
    assert slow.messages == []  # none of slow.test could
    rows = await _rows(d)
    assert {mid for mid, _, _ in rows} == set(SLOW) | (set(FAST) - set(delivered))
    assert all(attempts == 0 for _, _, attempts in rows)  # given back, not failed
    assert sender.log_path is not None
    (released,) = log_entries(sender.log_path, "leases released")
    assert released["count"] == 5

    # A new sender delivers the rest, each message once.
    slow.handler.data_delay = 0.0
    fast.handler.data_delay = 0.0
    successor = await asyncio.to_thread(d.system.start_sender, "default")
    await eventually(lambda: len(fast.messages) + len(slow.messages) >= 12, timeout=60, what="the rest delivered")
    await eventually(lambda: _empty(d), what="an empty queue")

    async def successor_idle() -> bool:
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"http://127.0.0.1:{successor.ready_port}/health")).json()
        return bool(health["in_flight"] == 0)

    # The queue leases nothing once it is empty: with nothing in flight at the new sender either,
    # every copy that was sent is in.
    await eventually(successor_idle, what="the new sender with nothing in flight")
    delivered_all = sorted(_mid(m.data) for m in fast.messages + slow.messages)
    assert delivered_all == sorted(FAST + SLOW)


async def test_sigterm_to_ingest_lets_a_transaction_in_progress_finish(deploy: DeploymentFactory) -> None:
    d: Deployment = await deploy(senders={}, start=False)
    await asyncio.to_thread(d.system.start, {}, False)
    ingest = d.system.get("ingest")
    assert ingest.proc is not None

    busy = smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30)
    busy.ehlo("client.test")
    busy.mail("s@origin.test")
    busy.rcpt("r@a.test")
    code, _ = busy.docmd("DATA")
    assert code == 354
    busy.send(b"Message-ID: <inflight@origin.test>\r\nSubject: in flight\r\n\r\nfirst half\r\n")
    idle = smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30)
    idle.ehlo("client.test")

    ingest.proc.send_signal(signal.SIGTERM)
    # A session between transactions is told so (once ingest has stopped listening)...
    assert (await asyncio.to_thread(idle.getreply))[0] == 421
    idle.close()
    # ...no new connections...
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", d.smtp_port), timeout=2):
        pass
    # ...and the one in DATA finishes its message.
    busy.send(b"second half\r\n.\r\n")
    code, text = busy.getreply()
    assert code == 250, text
    busy.close()
    assert await asyncio.to_thread(ingest.proc.wait, 10) == 0
    rows = await _rows(d)
    assert [mid for mid, _, _ in rows] == ["<inflight@origin.test>"]


def _message(message_id: str) -> bytes:
    return f"Message-ID: {message_id}\r\nSubject: shutdown\r\n\r\nbody\r\n".encode()


async def _leased(d: Deployment) -> int:
    count = await d.store.pool.fetchval("SELECT count(*) FROM deliveries WHERE lease_token IS NOT NULL")
    return int(count)


async def _rows(d: Deployment) -> list[tuple[str, bool, int]]:
    """Per delivery row: the message's Message-ID, whether it is leased, its attempts."""
    records = await d.store.pool.fetch(
        "SELECT m.headers, d.lease_token IS NOT NULL AS leased, d.attempts"
        " FROM deliveries d JOIN messages m ON m.id = d.id"
    )
    return [(_mid(bytes(r["headers"])), r["leased"], r["attempts"]) for r in records]


async def _empty(d: Deployment) -> bool:
    return await d.store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}


def _mid(data: bytes) -> str:
    match = re.search(rb"Message-ID: (<[^>]+>)", data, re.IGNORECASE)
    assert match is not None
    return match.group(1).decode()
