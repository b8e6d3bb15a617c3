"""``zmta queue``: what is queued, one message in detail, and the operator's hand on it:
send now, remove, hold and release (Postfix's ``postqueue -p``, ``postqueue -i``,
``postsuper -d``, ``-h`` and ``-H``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

from zmta_common.domains import canonical_domain, domain_of

from .admin_commands import set_pause
from .app import JsonOption, api, outcome, typer_app
from .client import Api, path
from .errors import ApiFailure, NothingDone
from .log_commands import log_rows
from .output import age, clock, due, emit_json, say, table

queue = typer_app("The queue: list, show, retry, drop, hold, release (as postqueue and postsuper).")


class State(StrEnum):
    queued = "queued"
    deferred = "deferred"
    held = "held"


ZoneOption = Annotated[str | None, typer.Option("--zone", "-z", help="a sending zone", show_default=False)]
DomainOption = Annotated[str | None, typer.Option("--domain", "-d", help="a recipient domain", show_default=False)]
MessageArgument = Annotated[str, typer.Argument(metavar="ID", help="queue id of the message", show_default=False)]
OptionalMessage = Annotated[
    str | None, typer.Argument(metavar="ID", help="queue id of the message", show_default=False)
]


class NoHeldListing(ApiFailure):
    """The API lists no held deliveries (a version from before holding)."""


# -- list ----------------------------------------------------------------------------------


@queue.command("list")
def list_deliveries(
    ctx: typer.Context,
    zone: ZoneOption = None,
    domain: DomainOption = None,
    state: Annotated[State | None, typer.Option("--state", "-s", help="only deliveries in this state")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="show at most this many deliveries")] = 1000,
    json_out: JsonOption = False,
) -> None:
    """List the queued deliveries, as postqueue -p.

    Oldest first in each zone; then the queued and deferred totals of each zone. With
    --json: {"list": the items of GET /queued/<state>/<zone>, each with its "state",
    "more": whether some were left out, "counters": GET /counter/zone/}."""
    client = api(ctx)
    zones = [zone] if zone else [entry["name"] for entry in client.get("/zones")]
    wanted = canonical_domain(domain) if domain else None
    rows, more = _deliveries(client, zones, [state] if state else list(State), wanted, limit, strict=bool(state))
    counters = client.get("/counter/zone/")
    if json_out:
        emit_json({"list": rows, "more": more, "counters": counters})
        return
    _print_deliveries(rows, more, bool(zone or domain or state))
    say()
    _print_totals(counters, zone)


def _deliveries(
    client: Api, zones: list[str], states: list[State], domain: str | None, limit: int, strict: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` deliveries, zone by zone and state by state; a delivery listed in two
    states (held, and deferred as well) is shown once, in the later one."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    more = False
    keep = (lambda item: domain_of(str(item.get("recipient", ""))) == domain) if domain else None
    for zone in zones:
        for state in states:
            left = limit - len(found)
            if left <= 0:
                return list(found.values()), True
            try:
                listing = client.collect(
                    path("queued", state.value, zone),
                    "list",
                    # The api narrows to the domain (keep= too, for an api older than that)
                    {"sort": "created", "order": "asc", **({"domain": domain} if domain else {})},
                    left,
                    "pageSize",
                    keep=keep,
                    check=_check_type(state),
                )
            except NoHeldListing:
                if strict:
                    raise
                continue
            more = more or listing.more
            for item in listing.items:
                found[(str(item.get("id")), str(item.get("seq")))] = {**item, "state": state.value}
    return list(found.values()), more


def _check_type(state: State) -> Callable[[dict[str, Any]], None]:
    def check(page: dict[str, Any]) -> None:
        if page.get("type") != state.value:
            raise NoHeldListing(404, f"this API lists no {state.value} deliveries (it answered {page.get('type')})")

    return check


def _print_deliveries(rows: list[dict[str, Any]], more: bool, filtered: bool) -> None:
    now = datetime.now(UTC)
    if not rows:
        say("no deliveries match" if filtered else "the queue is empty")
        return
    table(
        ["ID", "SEQ", "ZONE", "STATE", "RECIPIENT", "NEXT ATTEMPT", "DEFERRALS", "AGE"],
        [
            (
                r.get("id"),
                r.get("seq"),
                r.get("zone"),
                r["state"],
                r.get("recipient"),
                "held" if r["state"] == State.held else due(r.get("queued"), now),
                r.get("deferred"),
                age(r.get("created"), now),
            )
            for r in rows
        ],
    )
    if more:
        say("... more deliveries not shown (raise --limit)")


def _print_totals(counters: dict[str, Any], zone: str | None) -> None:
    active = {e["key"]: e["value"] for e in counters.get("active", {}).get("entries", [])}
    deferred = {e["key"]: e["value"] for e in counters.get("deferred", {}).get("entries", [])}
    zones = [zone] if zone else sorted(set(active) | set(deferred))
    rows: list[tuple[object, ...]] = [(z, active.get(z, 0), deferred.get(z, 0)) for z in zones]
    if not zone:
        rows.append(("total", sum(active.values()), sum(deferred.values())))
    table(["ZONE", "QUEUED", "DEFERRED"], rows)


# -- show ----------------------------------------------------------------------------------


@queue.command("show")
def show(ctx: typer.Context, message_id: MessageArgument, json_out: JsonOption = False) -> None:
    """Show a message: its envelope, its deliveries still queued, and its log."""
    answer = api(ctx).get(path("message", message_id))
    if json_out:
        emit_json(answer)
        return
    meta = answer.get("meta", {})
    now = datetime.now(UTC)
    say(f"message {message_id}")
    recipients = meta.get("to") or []
    fields = [
        ("from", meta.get("from") or "<>"),
        ("to", ", ".join(str(r) for r in recipients) if isinstance(recipients, list) else recipients),
        ("message-id", meta.get("messageId")),
        ("subject", _header(meta, "subject")),
        ("size", f"{meta.get('bodySize')} bytes (body)" if meta.get("bodySize") is not None else None),
        ("queued", f"{clock(meta.get('created') or meta.get('time'))} ({age(meta.get('created'), now)} ago)"),
        ("received", _received(meta)),
    ]
    table(None, [(f"{name}:", value) for name, value in fields if value], indent="  ")
    say()
    say("deliveries:")
    deliveries = answer.get("messages", [])
    table(
        ["SEQ", "ZONE", "RECIPIENT", "STATUS", "DEFERRALS", "NEXT ATTEMPT", "LAST RESPONSE"],
        [_delivery_row(d, now) for d in deliveries],
        indent="  ",
    )
    say()
    entries = answer.get("log")
    if entries is None:
        return  # an API without the delivery log
    say("log:")
    if entries:
        table(*log_rows(entries, with_id=False), indent="  ")
    else:
        say("  (nothing logged yet)")


def _header(meta: dict[str, Any], name: str) -> str | None:
    """A header's value from ``meta.headers`` (``[{key, line}]``, the line as received)."""
    for header in meta.get("headers") or []:
        if isinstance(header, dict) and str(header.get("key", "")).lower() == name:
            value = str(header.get("line", "")).partition(":")[2]
            return " ".join(value.split()) or None
    return None


def _received(meta: dict[str, Any]) -> str | None:
    parts = [
        f"{name} {meta[key]}"
        for name, key in (("over", "interface"), ("from", "origin"), ("user", "user"))
        if meta.get(key) not in (None, "", False)
    ]
    return ", ".join(parts) or None


def _delivery_row(delivery: dict[str, Any], now: datetime) -> tuple[object, ...]:
    deferred = delivery.get("deferred") or {}
    lock = delivery.get("lock")
    status = str(delivery.get("status", ""))
    if lock:
        status += f" (sending: {lock.get('lockOwner')})"
    return (
        delivery.get("seq"),
        delivery.get("zone"),
        delivery.get("recipient"),
        status,
        deferred.get("count", 0),
        due(deferred.get("next"), now) if deferred else "now",
        deferred.get("response") or None,
    )


# -- retry, drop, hold, release ------------------------------------------------------------


@queue.command("retry")
def retry(
    ctx: typer.Context,
    message_id: OptionalMessage = None,
    seq: Annotated[str | None, typer.Option(help="only this delivery of the message")] = None,
    zone: ZoneOption = None,
    domain: DomainOption = None,
    json_out: JsonOption = False,
) -> None:
    """Send now, as postqueue -i.

    A message (or one delivery of it, --seq), or every deferred delivery of a zone (--zone)
    or of a recipient domain in it (--zone --domain), whatever its retry schedule said."""
    _one_target(message_id, zone, domain)
    client = api(ctx)
    if message_id:
        route = path("message", message_id, seq) if seq else path("message", message_id)
        what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
        outcome(client.call("PUT", route), json_out, f"{what}: due now")
        return
    if seq:
        raise typer.BadParameter("it goes with a message id", param_hint="--seq")
    assert zone is not None
    answer = client.call("POST", path("retry", zone, domain) if domain else path("retry", zone))
    if json_out:
        emit_json(answer)
    else:
        where = f"zone {zone}" + (f", domain {domain}" if domain else "")
        say(f"{where}: {answer.get('retried', 0)} deferred deliveries due now")


@queue.command("drop")
def drop(
    ctx: typer.Context,
    message_id: MessageArgument,
    seq: Annotated[str | None, typer.Option(help="only this delivery of the message")] = None,
    json_out: JsonOption = False,
) -> None:
    """Remove a message, as postsuper -d.

    The message (or one delivery of it, --seq) leaves the queue without a bounce; not what a
    sender is delivering right now."""
    route = path("message", message_id, seq) if seq else path("message", message_id)
    what = f"delivery {message_id}.{seq}" if seq else f"message {message_id}"
    outcome(api(ctx).call("DELETE", route), json_out, f"{what}: dropped")


@queue.command("hold")
def hold(
    ctx: typer.Context,
    message_id: OptionalMessage = None,
    zone: ZoneOption = None,
    domain: DomainOption = None,
    json_out: JsonOption = False,
) -> None:
    """Hold a message, as postsuper -h.

    None of its deliveries is tried until released. With --zone (and --domain) instead of
    a message id: pause the zone (the domain in it)."""
    _one_target(message_id, zone, domain)
    client = api(ctx)
    if message_id:
        answer = client.call("POST", path("message", message_id, "hold"))
        _counted(
            answer,
            json_out,
            "held",
            f"message {message_id}: nothing to hold (not in the queue, already held, or being delivered)",
        )
        return
    assert zone is not None
    set_pause(client, zone, domain, json_out, paused=True)


@queue.command("release")
def release(
    ctx: typer.Context,
    message_id: OptionalMessage = None,
    zone: ZoneOption = None,
    domain: DomainOption = None,
    json_out: JsonOption = False,
) -> None:
    """Release a held message, as postsuper -H.

    With --zone (and --domain) instead of a message id: resume the paused zone (the domain
    in it)."""
    _one_target(message_id, zone, domain)
    client = api(ctx)
    if message_id:
        answer = client.call("DELETE", path("message", message_id, "hold"))
        _counted(answer, json_out, "released", f"message {message_id}: nothing to release (no delivery of it is held)")
        return
    assert zone is not None
    set_pause(client, zone, domain, json_out, paused=False)


def _one_target(message_id: str | None, zone: str | None, domain: str | None) -> None:
    if message_id and (zone or domain):
        raise typer.BadParameter("give a message id or --zone (with --domain), not both", param_hint="ID")
    if not message_id and not zone:
        raise typer.BadParameter("give a message id, or --zone (with --domain)", param_hint="ID")


def _counted(answer: dict[str, Any], json_out: bool, key: str, none: str) -> None:
    """Print how many deliveries were held (released); none is an error, saying ``none``."""
    if json_out:
        emit_json(answer)
    count = int(answer.get(key) or 0)
    if not count:
        raise NothingDone(none)
    if not json_out:
        what = none.partition(":")[0]
        say(f"{what}: {count} {'delivery' if count == 1 else 'deliveries'} {key}")
