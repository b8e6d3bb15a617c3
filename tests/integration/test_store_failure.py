"""PostgreSQL failing under the ingest: the client gets a 4xx and nothing half-written is
ever seen as mail: at most the leading chunks of a big message, as an orphan without
deliveries, which garbage collection removes."""

from __future__ import annotations

import asyncio

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory, eventually
from zmta_common.intake import CHUNK_SIZE


def start_data(d: Deployment) -> SmtpWire:
    wire = SmtpWire(d.smtp_port)
    assert wire.command("EHLO client.test")[0] == 250
    assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
    assert wire.command("RCPT TO:<a@a.test>")[0] == 250
    assert wire.command("RCPT TO:<b@b.test>")[0] == 250
    assert wire.command("DATA")[0] == 354
    return wire


async def test_postgres_stopping_during_data_gives_4xx_and_leaves_nothing(deploy: DeploymentFactory) -> None:
    # Ask whether a failed commit went through for 1 s, not 10: PostgreSQL stays down.
    d = await deploy({"dbs": {"commit_check_time": 1}}, senders={})
    postgres = d.infra.postgres
    big = start_data(d)
    # More than one body chunk: leading chunks are stored when PostgreSQL goes.
    big.send(b"Subject: big\r\n\r\n" + (b"b" * 78 + b"\r\n") * (CHUNK_SIZE // 50))
    small = start_data(d)
    small.send(b"Subject: small\r\n\r\nsmall body\r\n")
    await eventually(lambda: _chunks_stored(d), what="the big message's leading chunks stored")
    await asyncio.to_thread(postgres.stop, "immediate")
    try:
        big.send(b"the rest of the body\r\n")
        code, text = big.command(b".")
        assert code == 451, text
        code, text = small.command(b".")  # its transaction would open only now
        assert code == 451, text
        assert small.command("NOOP")[0] == 250  # the session survives the failure
    finally:
        big.close()
        small.close()
        await asyncio.to_thread(postgres.start)

    counts = await d.store.row_counts()
    assert counts["deliveries"] == 0, counts
    # The big message's placeholder and chunks, unless the crash took them: they were
    # committed without waiting for their WAL flush (only the final commit waits).
    assert counts["messages"] <= 1, counts
    await d.store.remove_orphan_messages(older_than=0)  # the queue's garbage collection, at once
    assert await d.store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}
    # The ingest's connection pool recovers by itself once PostgreSQL is back.
    await eventually(lambda: _can_queue(d), timeout=30, what="a message queued after the restart")
    counts = await d.store.row_counts()
    assert counts["messages"] == 1
    assert counts["deliveries"] == 2


async def _chunks_stored(d: Deployment) -> bool:
    return (await d.store.row_counts())["message_chunks"] > 0


def _send_small(d: Deployment) -> bool:
    wire = start_data(d)
    try:
        code, _ = wire.command(b"Subject: again\r\n\r\nback\r\n.")
        return code == 250
    finally:
        wire.close()


async def _can_queue(d: Deployment) -> bool:
    return await asyncio.to_thread(_send_small, d)
