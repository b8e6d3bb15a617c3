"""What the api reads and steers the queue with: a message's deliveries, counts, listings,
retry now, drop, hold and release, the suppression list, pauses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ..domains import canonical_address, canonical_domain
from ..ids import new_object_id
from .base import Connection, StoreBase
from .records import (
    DeliveryRow,
    DomainCount,
    DroppedDelivery,
    DropResult,
    Pause,
    QueueCounts,
    QueuedRow,
    RetryResult,
    Suppression,
)

# The states of list_queued. A held delivery waits for 'infinity': leasing, whose query
# takes rows due by now, never sees it, and no hot path pays for holds.
_STATES = {
    "queued": "next_attempt <= now()",
    "deferred": "next_attempt > now() AND next_attempt <> 'infinity'",
    "held": "next_attempt = 'infinity'",
}

# Sort keys of list_queued: the columns ordered by, after the zone filter.
_QUEUED_SORT = {"id": ("id", "seq"), "created": ("created", "id", "seq"), "queued": ("next_attempt", "id", "seq")}


class AdminStore(StoreBase):
    log_enabled: bool

    async def deliveries_of(self, message_id: str) -> list[DeliveryRow]:
        rows = await self.pool.fetch(
            "SELECT id, seq, zone, recipient, domain, created, next_attempt,"
            " (lease_expires IS NOT NULL AND lease_expires > now()) AS leased, attempts,"
            " first_deferred, last_deferred, last_response,"
            " CASE WHEN lease_expires > now() THEN lease_owner END AS lease_owner,"
            " CASE WHEN lease_expires > now() THEN lease_expires END AS lease_expires"
            " FROM deliveries WHERE id = $1 ORDER BY seq",
            message_id,
        )
        return [DeliveryRow(**_held_as_never(dict(r))) for r in rows]

    async def queue_counts(self) -> dict[str, QueueCounts]:
        rows = await self.pool.fetch(
            "SELECT zone, count(*) FILTER (WHERE next_attempt <= now()) AS queued,"
            " count(*) FILTER (WHERE next_attempt > now()) AS deferred"
            " FROM deliveries GROUP BY zone"
        )
        return {r["zone"]: QueueCounts(r["queued"], r["deferred"]) for r in rows}

    async def domain_counts(self, zone: str | None) -> list[DomainCount]:
        """Per zone and recipient domain, for one zone or all of them."""
        rows = await self.pool.fetch(
            "SELECT zone, domain, count(*) FILTER (WHERE next_attempt <= now()) AS queued,"
            " count(*) FILTER (WHERE next_attempt > now()) AS deferred"
            " FROM deliveries WHERE $1::text IS NULL OR zone = $1"
            " GROUP BY zone, domain ORDER BY zone, domain",
            zone,
        )
        return [DomainCount(r["zone"], r["domain"], r["queued"], r["deferred"]) for r in rows]

    # -- suppression list ----------------------------------------------------

    async def add_suppression(self, *, address: str | None = None, domain: str | None = None) -> Suppression:
        """Suppress an address or a whole domain (in their canonical forms, see
        :mod:`zmta_common.domains`); adding one twice returns the first entry."""
        address = canonical_address(address) if address else None
        domain = canonical_domain(domain) if domain else None
        row = await self.pool.fetchrow(
            "INSERT INTO suppressions (id, address, domain) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING id, address, domain, created",
            new_object_id(),
            address,
            domain,
        )
        if row is None:
            row = await self.pool.fetchrow(
                "SELECT id, address, domain, created FROM suppressions WHERE address = $1 OR domain = $2",
                address,
                domain,
            )
        assert row is not None
        return _suppression(row)

    async def list_suppressions(self) -> list[Suppression]:
        """Newest first."""
        rows = await self.pool.fetch("SELECT id, address, domain, created FROM suppressions ORDER BY created DESC, id")
        return [_suppression(r) for r in rows]

    async def delete_suppression(self, entry_id: str) -> bool:
        return (await self.pool.execute("DELETE FROM suppressions WHERE id = $1", entry_id)) != "DELETE 0"

    # -- administration (api) ------------------------------------------------

    async def list_queued(
        self,
        zone: str,
        state: str,
        sort: str = "id",
        descending: bool = True,
        offset: int = 0,
        limit: int = 1000,
        after: Sequence[Any] | None = None,
        domain: str | None = None,
    ) -> list[QueuedRow]:
        """Deliveries of ``zone`` in ``state``: ``queued`` (ready), ``deferred`` (waiting for a
        later attempt) or ``held`` (by an operator), ordered by ``sort`` (id,
        created or queued; then id and seq). ``after`` is the sort key of the last row of the
        previous page (keyset pagination); ``domain``: only deliveries to that recipient domain."""
        columns = _QUEUED_SORT[sort]
        direction = "DESC" if descending else "ASC"
        where = "zone = $1 AND " + _STATES[state]
        args: list[Any] = [zone, offset, limit]
        if domain is not None:
            args.append(canonical_domain(domain))
            where += f" AND domain = ${len(args)}"
        if after is not None:
            if len(after) != len(columns):
                raise ValueError("the key does not fit the sort")
            marks = ", ".join(f"${len(args) + 1 + i}" for i in range(len(columns)))
            where += f" AND ({', '.join(columns)}) {'<' if descending else '>'} ({marks})"
            args += list(after)
        order = ", ".join(f"{c} {direction}" for c in columns)
        rows = await self.pool.fetch(
            "SELECT id, seq, zone, recipient, created, next_attempt, attempts FROM deliveries"  # noqa: S608
            f" WHERE {where} ORDER BY {order} OFFSET $2 LIMIT $3",
            *args,
        )
        return [QueuedRow(**_held_as_never(dict(r))) for r in rows]

    async def retry_now(self, message_id: str, seq: str | None) -> RetryResult:
        """Make a delivery (or, without ``seq``, every delivery of the message) ready at once
        (the original's "send now"), unless a sender holds it: ``ready`` with the zone,
        ``leased`` with the zone, or ``missing``."""
        zone = await self.pool.fetchval(
            "WITH ready AS (UPDATE deliveries SET next_attempt = now() WHERE id = $1 AND ($2::text IS NULL OR seq = $2)"
            " AND (lease_expires IS NULL OR lease_expires <= now()) RETURNING zone) SELECT min(zone) FROM ready",
            message_id,
            seq,
        )
        if zone is not None:
            return RetryResult("ready", zone)
        zone = await self.pool.fetchval(
            "SELECT min(zone) FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)", message_id, seq
        )
        return RetryResult("leased", zone) if zone is not None else RetryResult("missing", None)

    async def drop_deliveries(self, message_id: str, seq: str | None = None) -> DropResult:
        """Delete the deliveries of a message (all, or the one ``seq``) that no sender holds;
        the message and its body go with its last row. Returns the deliveries removed and
        how many matching rows were left alone because they are leased."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The message row first, as apply_outcomes does: exactly one of them sees the last row go.
            if await conn.fetchval("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", message_id) is None:
                return DropResult([], 0)
            removed = await conn.fetch(
                "DELETE FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)"
                " AND (lease_expires IS NULL OR lease_expires <= now()) RETURNING seq, zone, recipient, domain",
                message_id,
                seq,
            )
            await _log_rows(
                conn, self.log_enabled, "DELETED", message_id, removed, {"reason": "dropped through the api"}
            )
            leased = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)", message_id, seq
            )
            await conn.execute(
                "DELETE FROM messages m WHERE m.id = $1 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
                message_id,
            )
        return DropResult([DroppedDelivery(r["seq"], r["zone"]) for r in removed], int(leased))

    async def hold(self, message_id: str) -> int:
        """Hold the message's deliveries that no sender holds: never attempted until released."""
        return await self._set_held(message_id, True)

    async def release(self, message_id: str) -> int:
        """Make the message's held deliveries ready now."""
        return await self._set_held(message_id, False)

    async def _set_held(self, message_id: str, held: bool) -> int:
        change = (
            "next_attempt = 'infinity' WHERE id = $1 AND next_attempt <> 'infinity'"
            " AND (lease_expires IS NULL OR lease_expires <= now())"
            if held
            else "next_attempt = now() WHERE id = $1 AND next_attempt = 'infinity'"
        )
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"UPDATE deliveries SET {change} RETURNING seq, zone, recipient, domain",  # noqa: S608
                message_id,
            )
            await _log_rows(conn, self.log_enabled, "HELD" if held else "RELEASED", message_id, rows, {})
        return len(rows)

    async def retry_zone(self, zone: str, domain: str | None = None) -> int:
        """Make every deferred delivery of the zone (of one recipient domain) ready now; held
        ones stay held, leased ones are left to their sender. Returns how many."""
        result = await self.pool.execute(
            "UPDATE deliveries SET next_attempt = now() WHERE zone = $1 AND ($2::text IS NULL OR domain = $2)"
            " AND next_attempt > now() AND next_attempt <> 'infinity'"
            " AND (lease_expires IS NULL OR lease_expires <= now())",
            zone,
            canonical_domain(domain) if domain else None,
        )
        return int(result.split()[-1])

    async def add_pause(self, zone: str, domain: str | None = None) -> Pause:
        """Pause a zone, or one recipient domain in it; pausing twice keeps the first entry."""
        domain = canonical_domain(domain) if domain else None
        row = None
        while row is None:  # a second try only if a resume removed the entry in between
            row = await self.pool.fetchrow(
                "INSERT INTO pauses (zone, domain) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING zone, domain, created",
                zone,
                domain or "",
            ) or await self.pool.fetchrow(
                "SELECT zone, domain, created FROM pauses WHERE zone = $1 AND domain = $2", zone, domain or ""
            )
        return Pause(row["zone"], row["domain"] or None, row["created"])

    async def remove_pause(self, zone: str, domain: str | None = None) -> bool:
        domain = canonical_domain(domain) if domain else None
        result = await self.pool.execute("DELETE FROM pauses WHERE zone = $1 AND domain = $2", zone, domain or "")
        return result != "DELETE 0"

    async def list_pauses(self) -> list[Pause]:
        rows = await self.pool.fetch("SELECT zone, domain, created FROM pauses ORDER BY zone, domain")
        return [Pause(r["zone"], r["domain"] or None, r["created"]) for r in rows]

    async def row_counts(self) -> dict[str, int]:
        """How many rows each table holds (for tests and diagnostics)."""
        out = {}
        for table in ("messages", "message_chunks", "deliveries"):
            out[table] = await self.pool.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
        return out


async def _log_rows(
    conn: Connection,
    enabled: bool,
    action: str,
    message_id: str,
    rows: Sequence[asyncpg.Record],
    details: dict[str, Any],
) -> None:
    """Delivery log entries ``action`` for the delivery rows just changed (seq, zone,
    recipient, domain), in the transaction that changed them."""
    if not enabled or not rows:
        return
    await conn.execute(
        "INSERT INTO delivery_log (action, id, seq, zone, mail_from, recipient, domain, details)"
        " SELECT $1, $2, r.seq, r.zone, (SELECT lower(mail_from) FROM messages WHERE id = $2), lower(r.recipient),"
        " r.domain, $7"
        " FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) AS r(seq, zone, recipient, domain)",
        action,
        message_id,
        [r["seq"] for r in rows],
        [r["zone"] for r in rows],
        [r["recipient"] for r in rows],
        [r["domain"] for r in rows],
        json.dumps(details),
    )


# When a held delivery is due: 'infinity', which asyncpg reads as a naive datetime.max.
NEVER = datetime.max.replace(tzinfo=UTC)


def _held_as_never(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose next attempt is 'infinity' (held) with :data:`NEVER`, comparable with
    the aware times of every other row."""
    if row["next_attempt"].tzinfo is None:
        row["next_attempt"] = NEVER
    return row


def _suppression(row: asyncpg.Record) -> Suppression:
    return Suppression(id=row["id"], address=row["address"], domain=row["domain"], created=row["created"])
