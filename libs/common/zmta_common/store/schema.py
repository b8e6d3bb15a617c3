"""The schema of the store's tables: the migrations that build it, and :func:`migrate`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from ..domains import canonical_address, canonical_domain
from .base import Connection


async def _canonical_domains(conn: Connection) -> None:
    """Domains and suppressed addresses written before every key took the one canonical
    form of :mod:`zmta_common.domains` (international names as A-labels): rewritten in
    place. Only rows with non-ASCII text can differ; an entry whose canonical form
    exists already is a duplicate and goes."""
    for found in await conn.fetch(
        "SELECT DISTINCT domain FROM deliveries WHERE octet_length(domain) <> length(domain)"
    ):
        await conn.execute("UPDATE deliveries SET domain = $2 WHERE domain = $1", found[0], canonical_domain(found[0]))
    for row in await conn.fetch("SELECT zone, domain FROM pauses WHERE octet_length(domain) <> length(domain)"):
        await conn.execute(
            "INSERT INTO pauses (zone, domain, created) SELECT zone, $3, created FROM pauses"
            " WHERE zone = $1 AND domain = $2 ON CONFLICT DO NOTHING",
            row["zone"],
            row["domain"],
            canonical_domain(row["domain"]),
        )
        await conn.execute("DELETE FROM pauses WHERE zone = $1 AND domain = $2", row["zone"], row["domain"])
    for row in await conn.fetch(
        "SELECT id, address, domain FROM suppressions"
        " WHERE octet_length(coalesce(address, domain)) <> length(coalesce(address, domain))"
        "    OR coalesce(address, domain) <> lower(coalesce(address, domain))"
    ):
        address = canonical_address(row["address"]) if row["address"] else None
        domain = canonical_domain(row["domain"]) if row["domain"] else None
        taken = await conn.fetchval(
            "SELECT 1 FROM suppressions WHERE id <> $1 AND (address = $2 OR domain = $3)", row["id"], address, domain
        )
        if taken:
            await conn.execute("DELETE FROM suppressions WHERE id = $1", row["id"])
        else:
            await conn.execute(
                "UPDATE suppressions SET address = $2, domain = $3 WHERE id = $1", row["id"], address, domain
            )


Migration = str | Callable[[Connection], Awaitable[None]]

# Each entry migrates from version i to i + 1: SQL, or a function for what SQL cannot
# compute. Append only; never edit a shipped one.
MIGRATIONS: list[Migration] = [
    """
    CREATE TABLE messages (
        id          text PRIMARY KEY,
        created     timestamptz NOT NULL DEFAULT now(),
        mail_from   text NOT NULL,
        headers     bytea NOT NULL,
        body_size   bigint NOT NULL,
        meta        jsonb NOT NULL
    );
    CREATE TABLE message_chunks (
        message_id  text NOT NULL REFERENCES messages(id) ON DELETE CASCADE
                    DEFERRABLE INITIALLY DEFERRED,
        seq         integer NOT NULL,
        data        bytea NOT NULL,
        PRIMARY KEY (message_id, seq)
    );
    -- Mail bodies are mostly compressed already (base64 images, zip); skip TOAST compression.
    ALTER TABLE message_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE deliveries (
        id              text NOT NULL REFERENCES messages(id) ON DELETE CASCADE
                        DEFERRABLE INITIALLY DEFERRED,
        seq             text NOT NULL,
        zone            text NOT NULL,
        recipient       text NOT NULL,
        domain          text NOT NULL,
        created         timestamptz NOT NULL DEFAULT now(),
        next_attempt    timestamptz NOT NULL DEFAULT now(),
        lease_token     uuid,
        lease_owner     text,
        lease_expires   timestamptz,
        attempts        integer NOT NULL DEFAULT 0,
        first_deferred  timestamptz,
        last_deferred   timestamptz,
        last_response   text,
        PRIMARY KEY (id, seq)
    );
    CREATE INDEX deliveries_ready ON deliveries (zone, next_attempt);
    CREATE TABLE suppressions (
        id       text PRIMARY KEY,
        address  text,
        domain   text,
        created  timestamptz NOT NULL DEFAULT now(),
        CHECK ((address IS NULL) <> (domain IS NULL))
    );
    CREATE UNIQUE INDEX suppressions_address ON suppressions (address) WHERE address IS NOT NULL;
    CREATE UNIQUE INDEX suppressions_domain ON suppressions (domain) WHERE domain IS NOT NULL;
    """,
    # Garbage collection looks for old messages (and through them, old deliveries).
    "CREATE INDEX messages_created ON messages (created);",
    # Paused zones (domain '') and recipient domains within a zone: the queue leases none of them.
    """
    CREATE TABLE pauses (
        zone     text NOT NULL,
        domain   text NOT NULL DEFAULT '',
        created  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (zone, domain)
    );
    """,
    _canonical_domains,
    # The delivery log: every event of a message's life, searchable (see store.log). Rows
    # come in time order, so a BRIN index on time is tiny and nearly free to write; the
    # lookups by id, recipient, sender and domain are B-trees.
    """
    CREATE TABLE delivery_log (
        -- Numbered in the order rows are written (no per-session cache: the stream reads in
        -- this order and must not find a lower number written after a higher one).
        entry      bigint GENERATED ALWAYS AS IDENTITY,
        time       timestamptz NOT NULL DEFAULT now(),
        action     text NOT NULL,
        id         text NOT NULL,
        seq        text,
        zone       text,
        mail_from  text,
        recipient  text,
        domain     text,
        details    jsonb NOT NULL DEFAULT '{}'
    );
    CREATE INDEX delivery_log_time ON delivery_log USING brin (time);
    CREATE INDEX delivery_log_id ON delivery_log (id, time);
    CREATE INDEX delivery_log_recipient ON delivery_log (recipient, time);
    CREATE INDEX delivery_log_domain ON delivery_log (domain, time);
    CREATE INDEX delivery_log_sender ON delivery_log (mail_from, time);
    """,
    # How far the delivery log stream has gone: beside the log, so that the two never disagree.
    # It starts where the log stands now: what is written from here on is streamed.
    """
    CREATE TABLE delivery_log_stream (
        one       boolean PRIMARY KEY DEFAULT true CHECK (one),
        position  bigint NOT NULL
    );
    INSERT INTO delivery_log_stream (position) SELECT coalesce(max(entry), 0) FROM delivery_log;
    """,
]

# Any constant: it only has to be the same for every process that migrates.
_MIGRATION_LOCK = 0x7A6D7461


async def migrate(pool: asyncpg.Pool) -> int:
    """Bring the schema to the newest version; safe to run from many processes at once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        current = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        for version in range(current, len(MIGRATIONS)):
            step = MIGRATIONS[version]
            await (conn.execute(step) if isinstance(step, str) else step(conn))
            await conn.execute("INSERT INTO schema_version VALUES ($1)", version + 1)
        return len(MIGRATIONS)
