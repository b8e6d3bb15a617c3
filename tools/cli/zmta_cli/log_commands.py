"""``zmta log search``: the delivery log (``GET /log``), newest first, page after page."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from zmta_common.domains import canonical_domain

from .app import JsonOption, api, typer_app
from .output import clock, emit_json, say, table, time_argument

log = typer_app("The delivery log: every attempt's outcome, newest first.")


@log.command("search")
def search(
    ctx: typer.Context,
    message_id: Annotated[str | None, typer.Option("--id", help="queue id of the message")] = None,
    to: Annotated[str | None, typer.Option("--to", help="recipient address")] = None,
    sender: Annotated[str | None, typer.Option("--from", help="envelope sender address")] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="recipient domain")] = None,
    zone: Annotated[str | None, typer.Option("--zone", help="sending zone")] = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action",
            help="what happened: QUEUED, ACCEPTED (delivered), DEFERRED, REJECTED, DELETED, HELD, RELEASED, DROP",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="from this time on: ISO 8601 (UTC unless it says), or an age: 15m, 2h, 3d"),
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="up to this time, as --since")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="show at most this many entries")] = 100,
    json_out: JsonOption = False,
) -> None:
    """Log entries that match every filter given, newest first."""
    now = datetime.now(UTC)
    params: dict[str, str | int | None] = {
        "id": message_id,
        "recipient": to,
        "sender": sender,
        "domain": canonical_domain(domain) if domain else None,
        "zone": zone,
        "action": action,
        "since": time_argument(since, "--since", now) if since else None,
        "until": time_argument(until, "--until", now) if until else None,
    }
    listing = api(ctx).collect("/log", "entries", params, limit, "limit")
    if json_out:
        emit_json({"entries": listing.items, "next": listing.next})
        return
    if not listing.items:
        say("no log entries match")
        return
    table(*log_rows(listing.items))
    if listing.more:
        say("... more entries not shown (raise --limit, or narrow the search)")


def log_rows(entries: list[dict[str, Any]], with_id: bool = True) -> tuple[list[str], list[tuple[object, ...]]]:
    """The header and rows of a table of log entries."""
    headers = ["TIME", "ACTION", *(["ID"] if with_id else []), "SEQ", "ZONE", "TO", "MX", "RESPONSE"]
    rows = [
        (
            clock(e.get("time")),
            e.get("action"),
            *([e.get("id")] if with_id else []),
            e.get("seq"),
            e.get("zone"),
            e.get("to"),
            _mx(e),
            e.get("response"),
        )
        for e in entries
    ]
    return headers, rows


def _mx(entry: dict[str, Any]) -> str | None:
    mx, ip = entry.get("mx"), entry.get("ip")
    if mx and ip and mx != ip:
        return f"{mx} [{ip}]"
    return str(mx or ip) if mx or ip else None
