"""The delivery log: every event of a message's life (queued, each attempt's outcome,
deleted, held, released...), searchable by message id, recipient, sender, domain, zone and
time, kept for ``delivery_log.retention_days``. Addresses are kept in lower case.

Rows are written in the statements that make the events happen: intake's one statement
adds the ``QUEUED`` (or ``DROP``, suppressed) rows, the outcome transaction adds
``ACCEPTED``/``DEFERRED``/``REJECTED`` rows for the deliveries it changed, so the log costs
no round trip of its own and never says what did not happen. Actions carry the original's
remote-log names, so webadmin users read them as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from .base import StoreBase
from .records import HourCount, LogEntry, LogQuery

_COLUMNS = "time, action, id, seq, zone, mail_from, recipient, domain, details"


class DeliveryLogStore(StoreBase):
    log_enabled: bool

    async def add_log(self, entries: Sequence[LogEntry]) -> None:
        """Write entries that no other statement writes (the api's actions)."""
        if not entries or not self.log_enabled:
            return
        await self.pool.execute(
            f"INSERT INTO delivery_log ({_COLUMNS})"  # noqa: S608
            " SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],"
            " $6::text[], $7::text[], $8::text[], $9::jsonb[])",
            [e.time for e in entries],
            [e.action for e in entries],
            [e.id for e in entries],
            [e.seq for e in entries],
            [e.zone for e in entries],
            [e.mail_from for e in entries],
            [e.recipient for e in entries],
            [e.domain for e in entries],
            [json.dumps(e.details) for e in entries],
        )

    async def search_log(
        self, query: LogQuery, limit: int = 100, before: tuple[datetime, int] | None = None
    ) -> list[tuple[LogEntry, tuple[datetime, int]]]:
        """Entries matching ``query``, newest first, each with its position (for the next
        page: pass the last one as ``before``)."""
        where, args = _where(query)
        if before is not None:
            args += [before[0], before[1]]
            where.append(f"(time, entry) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS}, entry FROM delivery_log"  # noqa: S608
            f" WHERE {' AND '.join(where) or 'true'} ORDER BY time DESC, entry DESC LIMIT ${len(args)}",
            *args,
        )
        return [(_entry(r), (r["time"], r["entry"])) for r in rows]

    async def log_after(self, position: int, lag: float, limit: int = 500) -> list[tuple[int, LogEntry]]:
        """Entries after ``position`` (an entry number), in order, written at least ``lag``
        seconds ago: a transaction still open when the reader passed would otherwise leave a
        gap (entry numbers are taken in insert order, not commit order)."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS}, entry FROM delivery_log"  # noqa: S608
            " WHERE entry > $1 AND time < now() - make_interval(secs => $2) ORDER BY entry LIMIT $3",
            position,
            lag,
            limit,
        )
        return [(r["entry"], _entry(r)) for r in rows]

    async def stream_position(self) -> int:
        """How far the log stream has gone (it began where the log stood when the schema got
        the stream's table: the history before is not streamed)."""
        return int(await self.pool.fetchval("SELECT position FROM delivery_log_stream"))

    async def set_stream_position(self, position: int) -> None:
        await self.pool.execute("UPDATE delivery_log_stream SET position = $1", position)

    async def message_log(self, message_id: str) -> list[LogEntry]:
        """A message's entries, oldest first."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM delivery_log WHERE id = $1 ORDER BY time, entry",  # noqa: S608
            message_id,
        )
        return [_entry(r) for r in rows]

    async def log_stats(self, since: datetime) -> tuple[list[HourCount], list[tuple[str, int]], list[tuple[str, int]]]:
        """Per hour and zone since ``since``: queued, delivered, deferred and bounced; the
        top bounce and deferral categories; the top recipient domains queued."""
        hours = await self.pool.fetch(
            "SELECT date_trunc('hour', time) AS hour, zone,"
            " count(*) FILTER (WHERE action = 'QUEUED') AS queued,"
            " count(*) FILTER (WHERE action = 'ACCEPTED') AS delivered,"
            " count(*) FILTER (WHERE action = 'DEFERRED') AS deferred,"
            " count(*) FILTER (WHERE action = 'REJECTED') AS bounced"
            " FROM delivery_log WHERE time >= $1 AND zone IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2",
            since,
        )
        categories = await self.pool.fetch(
            "SELECT details->>'category' AS category, count(*) AS n FROM delivery_log"
            " WHERE time >= $1 AND action IN ('REJECTED', 'DEFERRED') AND coalesce(details->>'category', '') <> ''"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
            since,
        )
        domains = await self.pool.fetch(
            "SELECT domain, count(*) AS n FROM delivery_log WHERE time >= $1 AND action = 'QUEUED'"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
            since,
        )
        return (
            [HourCount(r["hour"], r["zone"], r["queued"], r["delivered"], r["deferred"], r["bounced"]) for r in hours],
            [(r["category"], r["n"]) for r in categories],
            [(r["domain"], r["n"]) for r in domains],
        )

    async def expire_log(self, older_than_days: float, limit: int = 10000) -> int:
        """Remove up to ``limit`` entries older than the retention; how many went."""
        result = await self.pool.execute(
            "DELETE FROM delivery_log WHERE ctid = ANY(ARRAY(SELECT ctid FROM delivery_log"
            " WHERE time < now() - make_interval(secs => $1) LIMIT $2))",
            older_than_days * 86400,
            limit,
        )
        return int(result.split()[-1])


def _where(query: LogQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("id", query.id),
        ("recipient", query.recipient),
        ("mail_from", query.mail_from),
        ("domain", query.domain),
        ("zone", query.zone),
        ("action", query.action),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if query.since is not None:
        args.append(query.since)
        where.append(f"time >= ${len(args)}")
    if query.until is not None:
        args.append(query.until)
        where.append(f"time < ${len(args)}")
    return where, args


def _entry(row: asyncpg.Record) -> LogEntry:
    details = row["details"]
    return LogEntry(
        row["time"],
        row["action"],
        row["id"],
        row["seq"],
        row["zone"],
        row["mail_from"],
        row["recipient"],
        row["domain"],
        json.loads(details) if isinstance(details, str) else dict(details or {}),
    )
