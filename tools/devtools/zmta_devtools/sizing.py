"""What the database and the bus did for a load, per message: PostgreSQL statements (from
``pg_stat_statements``), transactions and WAL bytes, and NATS messages in and out (from
the server's ``/varz``). The figures behind the sizing model of docs/operations.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from dataclasses import dataclass, field

import asyncpg


@dataclass
class Snapshot:
    wal: int  # bytes of WAL written since the cluster began
    commits: int
    nats_in: int
    nats_out: int


@dataclass
class Statement:
    query: str  # shortened
    calls: float  # per message
    mean_ms: float
    wal_bytes: float  # per message


@dataclass
class Sizing:
    statements: float  # per message, all statements
    transactions: float
    wal_bytes: float
    nats_in: float  # messages published to the server
    nats_out: float  # messages it delivered to subscribers
    top: list[Statement] = field(default_factory=list)


def begin(postgres_url: str, nats_monitor_port: int) -> Snapshot:
    """Reset the statement counters and note where the WAL and the counters stand."""
    return asyncio.run(_begin(postgres_url, nats_monitor_port))


def end(postgres_url: str, nats_monitor_port: int, before: Snapshot, messages: int) -> Sizing:
    return asyncio.run(_end(postgres_url, nats_monitor_port, before, messages))


async def _begin(postgres_url: str, monitor: int) -> Snapshot:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        return await _snapshot(conn, monitor)
    finally:
        await conn.close()


async def _snapshot(conn: asyncpg.Connection, monitor: int) -> Snapshot:
    row = await conn.fetchrow(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal, xact_commit"
        " FROM pg_stat_database WHERE datname = current_database()"
    )
    assert row is not None
    varz = _varz(monitor)
    return Snapshot(row["wal"], row["xact_commit"], varz["in_msgs"], varz["out_msgs"])


async def _end(postgres_url: str, monitor: int, before: Snapshot, messages: int) -> Sizing:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("SELECT pg_stat_force_next_flush()")  # this session's own counts
        after = await _snapshot(conn, monitor)
        rows = await conn.fetch(
            "SELECT query, calls, mean_exec_time, wal_bytes FROM pg_stat_statements"
            " WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC"
        )
    finally:
        await conn.close()
    top = [
        Statement(_shorten(r["query"]), r["calls"] / messages, r["mean_exec_time"], float(r["wal_bytes"]) / messages)
        for r in rows[:12]
    ]
    return Sizing(
        statements=sum(r["calls"] for r in rows) / messages,
        transactions=(after.commits - before.commits) / messages,
        wal_bytes=(after.wal - before.wal) / messages,
        nats_in=(after.nats_in - before.nats_in) / messages,
        nats_out=(after.nats_out - before.nats_out) / messages,
        top=top,
    )


def _varz(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as answer:
        return dict(json.load(answer))


def _shorten(query: str, width: int = 78) -> str:
    text = re.sub(r"\s+", " ", query).strip()
    return text if len(text) <= width else text[: width - 3] + "..."
