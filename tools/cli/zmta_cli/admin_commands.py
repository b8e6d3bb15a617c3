"""The operator's other levers: zones, the suppression list, pauses and traffic shaping."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from .app import JsonOption, api, cli, typer_app
from .client import Api, path
from .output import clock, due, emit_json, say, table

suppress = typer_app("The suppression list: mail to its addresses and domains is dropped at intake.")
shaping = typer_app("Traffic shaping: the overrides in force, and lifting one.")

ZoneArgument = Annotated[str, typer.Argument(metavar="ZONE", help="a sending zone", show_default=False)]
DomainArgument = Annotated[
    str | None, typer.Argument(metavar="DOMAIN", help="a recipient domain; none: the whole zone", show_default=False)
]


@cli.command("zones")
def zones(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """List the sending zones.

    With their queued and deferred deliveries, and what of each is paused."""
    client = api(ctx)
    names = client.get("/zones")
    if json_out:
        emit_json(names)
        return
    counters = client.get("/counter/zone/")
    active = {e["key"]: e["value"] for e in counters.get("active", {}).get("entries", [])}
    deferred = {e["key"]: e["value"] for e in counters.get("deferred", {}).get("entries", [])}
    paused: dict[str, list[str]] = {}
    for entry in client.get("/pause").get("paused", []):
        paused.setdefault(entry["zone"], []).append(entry.get("domain") or "(whole zone)")
    rows = [
        (z["name"], active.get(z["name"], 0), deferred.get(z["name"], 0), ", ".join(paused.get(z["name"], [])) or None)
        for z in names
    ]
    table(["ZONE", "QUEUED", "DEFERRED", "PAUSED"], rows)


# -- suppression ---------------------------------------------------------------------------


@suppress.command("list")
def suppress_list(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """Every suppressed address and domain, newest first."""
    answer = api(ctx).get("/suppressionlist")
    if json_out:
        emit_json(answer)
        return
    entries = answer.get("suppressed", [])
    if not entries:
        say("the suppression list is empty")
        return
    table(
        ["ID", "KIND", "ADDRESS OR DOMAIN", "CREATED"],
        [
            (
                e.get("id"),
                "address" if e.get("address") else "domain",
                e.get("address") or e.get("domain"),
                clock(e.get("created")),
            )
            for e in entries
        ],
    )


@suppress.command("add")
def suppress_add(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(metavar="ADDRESS-OR-DOMAIN", help="an address (with @) or a whole domain", show_default=False),
    ],
    json_out: JsonOption = False,
) -> None:
    """Suppress an address, or a whole domain (no @)."""
    kind = "address" if "@" in target else "domain"
    answer = api(ctx).call("POST", "/suppressionlist", body={kind: target.strip()})
    if json_out:
        emit_json(answer)
        return
    entry = answer.get("suppressed", {})
    say(f"suppressed {kind} {entry.get(kind, target)} (id {entry.get('id')})")


@suppress.command("remove")
def suppress_remove(
    ctx: typer.Context,
    entry_id: Annotated[
        str, typer.Argument(metavar="ID", help="the entry's id (zmta suppress list)", show_default=False)
    ],
    json_out: JsonOption = False,
) -> None:
    """Remove an entry of the suppression list by its id."""
    answer = api(ctx).call("DELETE", "/suppressionlist", params={"id": entry_id})
    if json_out:
        emit_json(answer)
    else:
        say(f"removed {answer.get('deleted', entry_id)}")


# -- pauses --------------------------------------------------------------------------------


@cli.command("pause")
def pause(ctx: typer.Context, zone: ZoneArgument, domain: DomainArgument = None, json_out: JsonOption = False) -> None:
    """Pause a zone, or one recipient domain in it.

    Its mail (to DOMAIN) stays queued, intake goes on; nothing is delivered until resumed."""
    set_pause(api(ctx), zone, domain, json_out, paused=True)


@cli.command("resume")
def resume(ctx: typer.Context, zone: ZoneArgument, domain: DomainArgument = None, json_out: JsonOption = False) -> None:
    """Resume a paused zone, or one recipient domain in it."""
    set_pause(api(ctx), zone, domain, json_out, paused=False)


def set_pause(client: Api, zone: str, domain: str | None, json_out: bool, paused: bool) -> None:
    route = path("pause", zone, domain) if domain else path("pause", zone)
    answer = client.call("POST" if paused else "DELETE", route)
    if json_out:
        emit_json(answer)
        return
    where = f"zone {zone}" + (f", domain {answer.get('paused', {}).get('domain') or domain}" if domain else "")
    say(f"{where}: {'paused' if paused else 'resumed'}")


# -- shaping -------------------------------------------------------------------------------


@shaping.command("list")
def shaping_list(ctx: typer.Context, json_out: JsonOption = False) -> None:
    """The traffic shaping overrides in force, zone by zone."""
    answer = api(ctx).get("/shaping")
    if json_out:
        emit_json(answer)
        return
    entries = answer.get("shaping", [])
    if not entries:
        say("no traffic shaping override is in force")
        return
    now = datetime.now(UTC)
    table(
        ["ZONE", "SCOPE", "SITE", "ADDRESS", "ACTION", "ENDS", "RULE", "RESPONSE"],
        [
            (
                e.get("zone"),
                e.get("scope"),
                e.get("site"),
                e.get("address"),
                _action(e),
                due(e.get("expires"), now),
                e.get("rule"),
                e.get("response"),
            )
            for e in entries
        ],
    )


def _action(entry: dict[str, Any]) -> str:
    if entry.get("action") != "throttle":
        return str(entry.get("action"))
    limits = [f"{entry['connections']} conn" if entry.get("connections") else "", entry.get("rate") or ""]
    return "throttle " + ", ".join(limit for limit in limits if limit)


@shaping.command("lift")
def shaping_lift(
    ctx: typer.Context,
    zone: ZoneArgument,
    site: Annotated[
        str | None, typer.Option(help="the site (as zmta shaping list shows it); none: the zone's own")
    ] = None,
    address: Annotated[str | None, typer.Option(help="the local address of a site_address override")] = None,
    json_out: JsonOption = False,
) -> None:
    """End an override now: the configured limits apply again at once."""
    answer = api(ctx).call("DELETE", path("shaping", zone), params={"site": site, "address": address})
    if json_out:
        emit_json(answer)
        return
    lifted = answer.get("lifted", {})
    what = " ".join(str(part) for part in (lifted.get("scope"), lifted.get("site"), lifted.get("address")) if part)
    say(f"zone {zone}: lifted {lifted.get('action')} ({what})")
