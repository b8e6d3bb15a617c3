"""The delivery log: search (``GET /log``) and the dashboard's figures (``GET /log/stats``)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from zmta_common.domains import canonical_domain
from zmta_common.store import LOG_ACTIONS, LogQuery

from .common import ApiError, Services, error_responses, iso
from .models import LogPage, LogStats

LOG_MAX = 1000


def router(services: Services) -> APIRouter:
    api = APIRouter(tags=["log"])
    store = services.store

    @api.get("/log", response_model=LogPage, responses=error_responses(400))
    async def search(
        id: Annotated[str | None, Query(max_length=200, description="the queue id of a message")] = None,
        recipient: Annotated[str | None, Query(max_length=1000, description="a recipient address")] = None,
        sender: Annotated[str | None, Query(max_length=1000, description="an envelope sender address")] = None,
        domain: Annotated[str | None, Query(max_length=255, description="a recipient domain")] = None,
        zone: Annotated[str | None, Query(max_length=200)] = None,
        action: Annotated[str | None, Query(max_length=20, description=", ".join(LOG_ACTIONS))] = None,
        since: Annotated[str | None, Query(max_length=40, description="ISO 8601 or ms since the epoch")] = None,
        until: Annotated[str | None, Query(max_length=40, description="ISO 8601 or ms since the epoch")] = None,
        limit: Annotated[int, Query(ge=1, le=LOG_MAX)] = 100,
        cursor: Annotated[str | None, Query(max_length=200, description="the `next` of the previous page")] = None,
    ) -> LogPage:
        """Delivery log entries, newest first, that match every filter given; a page at a time
        (pass ``next`` back as ``?cursor=`` with the same filters for the older ones). Entries
        are kept ``delivery_log.retention_days``."""
        if action is not None and action.upper() not in LOG_ACTIONS:
            raise ApiError(400, f"action must be one of {', '.join(LOG_ACTIONS)}", "action")
        query = LogQuery(
            id=id,
            recipient=_address(recipient, "recipient"),
            mail_from=_address(sender, "sender"),
            domain=_domain(domain),
            zone=zone,
            action=action.upper() if action else None,
            since=_time(since, "since"),
            until=_time(until, "until"),
        )
        found = await store.search_log(query, limit + 1, _read_cursor(cursor) if cursor else None)
        more = len(found) > limit
        found = found[:limit]
        next_cursor = _make_cursor(found[-1][1]) if more else None
        return LogPage.model_validate({"entries": [e.view() for e, _ in found], "next": next_cursor})

    @api.get("/log/stats", response_model=LogStats)
    async def stats(hours: Annotated[int, Query(ge=1, le=24 * 31)] = 24) -> LogStats:
        """For the dashboard: per hour and zone over the last ``hours``, the deliveries queued,
        delivered, deferred and bounced; the ten commonest categories of bounces and
        deferrals, and the ten recipient domains most mail was queued for."""
        since = (datetime.now(UTC) - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
        per_hour, categories, domains = await store.log_stats(since)
        return LogStats.model_validate(
            {
                "hours": [
                    {
                        "hour": iso(h.hour),
                        "zone": h.zone,
                        "queued": h.queued,
                        "delivered": h.delivered,
                        "deferred": h.deferred,
                        "bounced": h.bounced,
                    }
                    for h in per_hour
                ],
                "categories": [{"category": c, "count": n} for c, n in categories],
                "domains": [{"domain": d, "count": n} for d, n in domains],
            }
        )

    return api


def _address(value: str | None, field: str) -> str | None:
    """An address as the log keeps it: in lower case, without angle brackets."""
    if value is None:
        return None
    value = value.strip().strip("<>").lower()
    if "@" not in value:
        raise ApiError(400, f"{field} must be an address (local@domain)", field)
    return value


def _domain(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return canonical_domain(value)
    except ValueError as exc:
        raise ApiError(400, f"domain: {exc}", "domain") from None


def _time(value: str | None, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        if value.isdigit():
            return datetime.fromtimestamp(int(value) / 1000, UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise ApiError(400, f"{field} must be an ISO 8601 time or ms since the epoch", field) from None


def _make_cursor(position: tuple[datetime, int]) -> str:
    raw = json.dumps([position[0].isoformat(), position[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        moment, entry = json.loads(raw)
        return datetime.fromisoformat(moment), int(entry)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ApiError(400, "the cursor is not one this api gave", "cursor") from None
