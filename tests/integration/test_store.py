"""zmta_common.store against a real PostgreSQL: migrations, intake, leases, outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import Infra, create_database, eventually
from zmta_common.domains import domain_of
from zmta_common.ids import new_queue_id, seq_for
from zmta_common.store import (
    MIGRATIONS,
    Deferral,
    DeliveryKey,
    LeaseRef,
    LogEntry,
    NewDelivery,
    NewMessage,
    OutcomeBatch,
    Store,
    _canonical_domains,
)


@pytest.fixture
async def store(infra: Infra) -> AsyncIterator[Store]:
    name = await create_database(infra)
    store = await Store.connect(f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/{name}", max_size=6)
    yield store
    await store.close()


async def add_message(store: Store, recipients: int, zone: str = "default", chunks: int = 1) -> str:
    message_id = new_queue_id()
    tx = store.begin_intake(message_id)
    leading = [f"chunk {n}\r\n".encode() for n in range(chunks - 1)]
    for chunk in leading:
        await tx.write_chunk(chunk)
    await tx.commit(
        NewMessage(
            id=message_id,
            mail_from="s@origin.test",
            headers=b"Subject: t\r\n",
            body_size=sum(map(len, leading)) + len(b"last\r\n"),
            meta={"id": message_id},
            deliveries=[NewDelivery(seq_for(i), zone, f"r{i}@a.test", "a.test") for i in range(recipients)],
        ),
        b"last\r\n",
    )
    return message_id


async def test_migrations_are_idempotent_and_safe_in_parallel(infra: Infra) -> None:
    name = await create_database(infra)
    dsn = f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/{name}"
    stores = [await Store.connect(dsn, max_size=2, migrate=False) for _ in range(3)]
    try:
        versions = await asyncio.gather(*(s.migrate() for s in stores))
        assert versions == [len(MIGRATIONS)] * 3
        assert await stores[0].migrate() == len(MIGRATIONS)
        rows = await stores[0].pool.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for s in stores:
            await s.close()


async def test_intake_is_all_or_nothing(store: Store) -> None:
    tx = store.begin_intake(new_queue_id())
    await tx.write_chunk(b"a" * 1000)
    await tx.write_chunk(b"b" * 1000)
    await tx.rollback()
    assert await store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}
    message_id = await add_message(store, 2, chunks=3)
    assert await store.row_counts() == {"messages": 1, "message_chunks": 3, "deliveries": 2}
    body = b"".join([c async for c in store.iter_body(message_id)])
    assert body == b"chunk 0\r\nchunk 1\r\nlast\r\n"
    message = await store.get_message(message_id, prefetch=2)
    assert message is not None
    assert message.chunks == [b"chunk 0\r\n", b"chunk 1\r\n"]
    assert b"".join([c async for c in store.body(message, 2)]) == body


async def test_concurrent_leases_never_share_a_row(store: Store) -> None:
    for _ in range(10):
        await add_message(store, 5)
    batches = await asyncio.gather(*(store.lease("default", 20, 60, f"sender{n}") for n in range(4)))
    keys = [(lease.id, lease.seq) for batch in batches for lease in batch]
    assert len(keys) == 50
    assert len(set(keys)) == 50
    assert await store.lease("default", 20, 60, "late") == []
    assert await store.lease("bounces", 20, 60, "other zone") == []


async def test_an_expired_lease_is_leased_again(store: Store) -> None:
    await add_message(store, 1)
    (first,) = await store.lease("default", 10, 0.2, "crashed")
    assert await store.lease("default", 10, 60, "other") == []
    leased = await eventually(
        lambda: store.lease("default", 10, 60, "other"), timeout=5, what="the 0.2 s lease to expire"
    )
    (second,) = leased
    assert (second.id, second.seq) == (first.id, first.seq)
    assert second.lease_token != first.lease_token


async def test_outcomes_respect_lease_tokens_and_remove_finished_messages(store: Store) -> None:
    message_id = await add_message(store, 3)
    leases = {lease.seq: lease for lease in await store.lease("default", 10, 60, "s")}
    later = datetime.now(UTC) + timedelta(minutes=5)
    stale = "00000000-0000-0000-0000-000000000000"
    batch = OutcomeBatch(
        deferred=[
            Deferral(message_id, "001", stale, later, "451 stale"),
            Deferral(message_id, "002", leases["002"].lease_token, later, "451 later"),
        ],
        rejected=[LeaseRef(message_id, "003", stale)],
    )
    assert await store.apply_outcomes(batch) == {DeliveryKey(message_id, "002")}  # the stale ones changed nothing
    rows = {r.seq: r for r in await store.deliveries_of(message_id)}
    assert rows["001"].attempts == 0  # stale token: untouched
    assert (rows["002"].attempts, rows["002"].last_response, rows["002"].leased) == (1, "451 later", False)

    removed = await store.apply_outcomes(
        OutcomeBatch(rejected=[LeaseRef(message_id, "003", leases["003"].lease_token)])
    )
    assert removed == {DeliveryKey(message_id, "003")}
    delivered = OutcomeBatch(delivered=[DeliveryKey(message_id, "001"), DeliveryKey(message_id, "002")])
    assert await store.apply_outcomes(delivered) == {DeliveryKey(message_id, "001"), DeliveryKey(message_id, "002")}
    assert await store.apply_outcomes(delivered) == set()  # a report applied twice counts once
    assert await store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}


async def test_last_rows_finishing_at_once_still_remove_the_message(store: Store) -> None:
    ids = [await add_message(store, 2) for _ in range(20)]
    # Each message's two rows are delivered by two appliers at the same moment.
    await asyncio.gather(
        *(store.apply_outcomes(OutcomeBatch(delivered=[DeliveryKey(i, seq)])) for i in ids for seq in ("001", "002"))
    )
    assert await store.row_counts() == {"messages": 0, "message_chunks": 0, "deliveries": 0}


def one_chunk_message(recipients: list[str], meta: dict | None = None) -> NewMessage:
    message_id = new_queue_id()
    return NewMessage(
        id=message_id,
        mail_from="s@origin.test",
        headers=b"Subject: t\r\n",
        body_size=6,
        meta=meta or {"id": message_id},
        deliveries=[NewDelivery(seq_for(i), "default", r, r.partition("@")[2]) for i, r in enumerate(recipients)],
    )


async def test_messages_that_finish_together_are_committed_together(store: Store) -> None:
    await store.add_suppression(domain="gone.test")
    messages = [one_chunk_message([f"r{n}@a.test", "x@gone.test"]) for n in range(60)]
    messages.append(one_chunk_message(["only@gone.test"]))  # every recipient suppressed
    # jsonb refuses a NUL character: this message fails, and fails alone.
    messages.append(one_chunk_message(["p@a.test"], meta={"poison": "a\x00b"}))
    outcomes = await asyncio.gather(
        *(store.begin_intake(m.id).commit(m, b"body\r\n") for m in messages), return_exceptions=True
    )
    assert outcomes[:60] == [{"001"}] * 60
    assert outcomes[60] == set()
    assert isinstance(outcomes[61], Exception)
    assert 1 <= store.group_commit.batches < 60  # batched, not one statement per message
    assert await store.row_counts() == {"messages": 60, "message_chunks": 60, "deliveries": 60}
    body = b"".join([c async for c in store.iter_body(messages[7].id)])
    assert body == b"body\r\n"


async def test_messages_of_a_batch_are_read_in_one_go(store: Store) -> None:
    first = await add_message(store, 1)
    second = await add_message(store, 2, chunks=2)
    found = await store.get_messages([second, "1a2b3c4d5e6f700000", first, second], prefetch=1)
    assert [m.id if m else None for m in found] == [second, None, first, second]
    assert found[0] is not found[3]  # a plugin may change one delivery's copy, not the other's
    assert found[0] is not None and found[0].chunks == [b"chunk 0\r\n"]
    assert found[2] is not None and found[2].chunks == [b"last\r\n"]
    assert found[2].meta == {"id": first}


async def test_a_commit_that_went_through_is_not_reported_failed(store: Store) -> None:
    """A commit retried after it went through (the connection lost while the server was
    committing) finds the message queued and says so, rather than have the client send it
    again."""
    message = one_chunk_message(["a@x.test", "b@x.test"])
    seqs = {d.seq for d in message.deliveries}
    assert await store.begin_intake(message.id).commit(message, b"body\r\n") == seqs
    assert await store.begin_intake(message.id).commit(message, b"body\r\n") == seqs
    assert await store.row_counts() == {"messages": 1, "message_chunks": 1, "deliveries": 2}


async def test_suppressions_and_pauses_match_every_spelling_of_a_domain(store: Store) -> None:
    a_label = "xn--exmple-cua.test"
    await store.add_suppression(address="Jöe@Exämple.test")
    await store.add_suppression(domain="Strändchen.TEST.")
    message_id = new_queue_id()
    recipients = [f"JÖE@{a_label}", "anyone@xn--strndchen-x2a.test", f"kept@{a_label}"]
    await store.begin_intake(message_id).commit(
        NewMessage(
            id=message_id,
            mail_from="s@origin.test",
            headers=b"Subject: t\r\n",
            body_size=6,
            meta={},
            deliveries=[NewDelivery(seq_for(i), "default", r, domain_of(r)) for i, r in enumerate(recipients)],
        ),
        b"body\r\n",
    )
    rows = await store.pool.fetch("SELECT recipient, domain FROM deliveries WHERE id = $1", message_id)
    assert [(r["recipient"], r["domain"]) for r in rows] == [(f"kept@{a_label}", a_label)]

    # A pause written with the U-label holds the A-label deliveries back, and is lifted by either spelling.
    await store.add_pause("default", "EXÄMPLE.test")
    assert [(p.zone, p.domain) for p in await store.list_pauses()] == [("default", a_label)]
    paused = {p.domain or "" for p in await store.list_pauses()}
    assert await store.lease("default", 10, 60, "t", skip_domains=list(paused)) == []
    assert await store.remove_pause("default", a_label)


async def test_keys_written_before_the_canonical_form_are_rewritten(infra: Infra) -> None:
    name = await create_database(infra)
    store = await Store.connect(f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/{name}", migrate=False)
    try:
        earlier = MIGRATIONS.index(_canonical_domains)
        async with store.pool.acquire() as conn:
            await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            for version, step in enumerate(MIGRATIONS[:earlier]):
                assert isinstance(step, str)
                await conn.execute(step)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version + 1)
            await conn.execute(
                "INSERT INTO messages (id, mail_from, headers, body_size, meta) VALUES ('m1', '', '', 0, '{}')"
            )
            await conn.execute(
                "INSERT INTO deliveries (id, seq, zone, recipient, domain)"
                " VALUES ('m1', '001', 'default', 'a@exämple.test', 'exämple.test')"
            )
            await conn.execute("INSERT INTO pauses (zone, domain) VALUES ('default', 'exämple.test')")
            await conn.execute(
                "INSERT INTO suppressions (id, address)"
                " VALUES ('s1', 'jöe@exämple.test'), ('s2', 'jöe@xn--exmple-cua.test')"
            )
            await conn.execute("INSERT INTO suppressions (id, domain) VALUES ('s3', 'strändchen.test')")
        await store.migrate()
        assert await store.pool.fetchval("SELECT domain FROM deliveries") == "xn--exmple-cua.test"
        assert await store.pool.fetchval("SELECT domain FROM pauses") == "xn--exmple-cua.test"
        rows = await store.pool.fetch("SELECT id, coalesce(address, domain) AS key FROM suppressions ORDER BY id")
        assert [(r["id"], r["key"]) for r in rows] == [
            ("s2", "jöe@xn--exmple-cua.test"),
            ("s3", "xn--strndchen-x2a.test"),
        ]
    finally:
        await store.close()


async def test_log_entries_are_numbered_in_the_order_they_are_written(infra: Infra) -> None:
    """The log stream reads by entry number: entries written by several connections must be
    numbered in the order they were written, or a reader would pass over some for good."""
    name = await create_database(infra)
    dsn = f"postgresql://postgres@127.0.0.1:{infra.postgres.port}/{name}"
    stores = [await Store.connect(dsn, max_size=1) for _ in range(2)]
    try:
        for n in range(6):  # two sessions, taking turns
            entry = LogEntry(
                datetime.now(UTC), "QUEUED", f"m{n}", "001", "default", "s@a.test", "r@b.test", "b.test", {}
            )
            await stores[n % 2].add_log([entry])
        assert await stores[0].stream_position() == 0  # a new log is streamed from its start
        found = await stores[0].log_after(0, lag=0, limit=10)
        assert [e.id for _, e in found] == [f"m{n}" for n in range(6)]
        positions = [p for p, _ in found]
        assert positions == sorted(positions)
        await stores[1].set_stream_position(positions[2])
        assert [e.id for _, e in await stores[0].log_after(await stores[0].stream_position(), 0)] == ["m3", "m4", "m5"]
    finally:
        for store in stores:
            await store.close()
