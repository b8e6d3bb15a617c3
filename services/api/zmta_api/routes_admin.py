"""Operator routes: the suppression list, pausing zones and recipient domains, health, metrics."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from zmta_common import metrics
from zmta_common.addresses import address_error
from zmta_common.domains import canonical_domain
from zmta_common.store import Pause, Suppression

from .common import ApiError, DomainName, Services, ZoneName, check_zone, error_responses, iso
from .models import (
    PauseAdded,
    PauseEntry,
    PauseList,
    Success,
    SuppressionAdded,
    SuppressionDeleted,
    SuppressionList,
    SuppressionRequest,
)

log = logging.getLogger(__name__)

TEXT = {"type": "string"}


class Health(BaseModel):
    status: str
    nats: bool


def router(services: Services) -> APIRouter:
    api = APIRouter()
    config, store = services.config, services.store

    # -- suppression list ----------------------------------------------------

    @api.get("/suppressionlist", response_model=SuppressionList, tags=["suppression"])
    async def suppression_list() -> SuppressionList:
        """Suppressed addresses and domains, newest first: mail to them is dropped at intake,
        silently (no bounce; counted in ``zonemta_message_drop`` when no recipient is left).
        ``created`` is written as every time of the api (and the original's JSON) is: UTC, ms, Z."""
        return SuppressionList(suppressed=[_suppression_view(e) for e in await store.list_suppressions()])

    @api.post(
        "/suppressionlist",
        response_model=SuppressionAdded,
        responses=error_responses(400),
        tags=["suppression"],
        openapi_extra={"requestBody": _SUPPRESSION_BODY},
    )
    async def suppress(request: Request) -> SuppressionAdded:
        """Suppress an address (``{"address": ...}``) or a whole domain (``{"domain": ...}``),
        as JSON or as a form; an empty field counts as absent (the web admin sends both)."""
        entry = await _suppression_request(request)
        if (entry.address is None) == (entry.domain is None):
            raise ApiError(400, "give either an address or a domain", "address")
        if entry.address is not None:
            if reason := address_error(entry.address):
                raise ApiError(400, f"{entry.address!r} is not a valid address: {reason}", "address")
            added = await store.add_suppression(address=entry.address)
        else:
            added = await store.add_suppression(domain=_domain(entry.domain or ""))
        return SuppressionAdded(suppressed=_suppression_view(added, created=False))

    @api.delete(
        "/suppressionlist", response_model=SuppressionDeleted, responses=error_responses(400, 404), tags=["suppression"]
    )
    async def unsuppress(
        request: Request, id: Annotated[str | None, Query(max_length=100)] = None
    ) -> SuppressionDeleted:
        """Remove an entry by its id, given as ``?id=`` (as zmta-webadmin sends it) or in a JSON
        body ``{"id": ...}``."""
        entry_id = id
        if entry_id is None and await request.body():
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the body is not JSON", "id") from None
            entry_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(entry_id, str) or not entry_id:
            raise ApiError(400, "the id of the entry to delete is missing", "id")
        if not entry_id.isalnum() or not entry_id.isascii():
            raise ApiError(404, f"no suppression entry {entry_id!r}", "id")
        if not await store.delete_suppression(entry_id):
            raise ApiError(404, f"no suppression entry {entry_id}", "id")
        return SuppressionDeleted(deleted=entry_id)

    # -- pauses --------------------------------------------------------------

    wake = services.wake

    async def pause(zone: str, domain: str | None) -> PauseAdded:
        check_zone(config, zone)
        entry = await store.add_pause(zone, domain)
        log.info("paused", extra={"zone": zone, "domain": domain})
        return PauseAdded(paused=_pause_view(entry))

    async def resume(zone: str, domain: str | None) -> Success:
        # Removed first: a pause of a zone no longer configured can still be cleared.
        if not await store.remove_pause(zone, domain):
            check_zone(config, zone)
            what = f"domain {domain!r} of zone {zone!r}" if domain else f"zone {zone!r}"
            raise ApiError(404, f"{what} is not paused", "domain" if domain else "zone")
        log.info("resumed", extra={"zone": zone, "domain": domain})
        await wake(zone)
        return Success(success=True)

    @api.get("/pause", response_model=PauseList, tags=["pause"])
    async def pauses() -> PauseList:
        """Paused zones (``domain`` null) and recipient domains within a zone."""
        return PauseList(paused=[_pause_view(p) for p in await store.list_pauses()])

    @api.post("/pause/{zone}", response_model=PauseAdded, responses=error_responses(404), tags=["pause"])
    async def pause_zone(zone: ZoneName) -> PauseAdded:
        """Stop delivering the zone's mail (it stays queued, intake goes on) until resumed.
        Kept in PostgreSQL, so every queue replica honours it (within `queue.pauses_ttl`, 2 s
        by default) and it survives restarts. Pausing twice keeps the first entry; resuming
        what is not paused is a 404."""
        return await pause(zone, None)

    @api.delete("/pause/{zone}", response_model=Success, responses=error_responses(404), tags=["pause"])
    async def resume_zone(zone: ZoneName) -> Success:
        """Deliver the zone's mail again (its paused domains stay paused)."""
        return await resume(zone, None)

    @api.post("/pause/{zone}/{domain}", response_model=PauseAdded, responses=error_responses(400, 404), tags=["pause"])
    async def pause_domain(zone: ZoneName, domain: DomainName) -> PauseAdded:
        """Stop delivering the zone's mail to one recipient domain until resumed."""
        return await pause(zone, _domain(domain))

    @api.delete("/pause/{zone}/{domain}", response_model=Success, responses=error_responses(400, 404), tags=["pause"])
    async def resume_domain(zone: ZoneName, domain: DomainName) -> Success:
        """Deliver the zone's mail to the recipient domain again."""
        return await resume(zone, _domain(domain))

    # -- service -------------------------------------------------------------

    @api.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Whether the api reaches the store (503 if not) and its NATS connection is up. It
        needs no key."""
        await store.pool.fetchval("SELECT 1")
        return Health(status="ok", nats=services.bus.nc.is_connected)

    @api.get(
        "/metrics",
        response_class=Response,
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": TEXT}}}},
        tags=["service"],
    )
    async def prometheus() -> Response:
        """Prometheus metrics of the api process."""
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return api


def _domain(value: str) -> str:
    """A recipient domain in the form deliveries are keyed by (see zmta_common.domains)."""
    domain = canonical_domain(value)
    if not domain or any(c.isspace() or not c.isprintable() or c in "@/\\<>,;\"'()" for c in domain):
        raise ApiError(400, f"{value!r} is not a domain", "domain")
    if not domain.isascii():  # no A-label for it: not a name DNS can hold
        raise ApiError(400, f"{value!r} is not a domain", "domain")
    return domain


def _suppression_view(entry: Suppression, created: bool = True) -> dict[str, Any]:
    """An entry in the original's shape: id, created (unless left out) and either address or domain."""
    view: dict[str, Any] = {"id": entry.id}
    if created:
        view["created"] = iso(entry.created)
    if entry.address:
        view["address"] = entry.address
    else:
        view["domain"] = entry.domain
    return view


def _pause_view(entry: Pause) -> PauseEntry:
    return PauseEntry(zone=entry.zone, domain=entry.domain, created=iso(entry.created))


_SUPPRESSION_BODY = {
    "required": True,
    "content": {
        media: {"schema": SuppressionRequest.model_json_schema()}
        for media in ("application/json", "application/x-www-form-urlencoded")
    },
}


async def _suppression_request(request: Request) -> SuppressionRequest:
    """The entry from a JSON or a form body (the original took both)."""
    body = await request.body()
    fields: object
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        fields = {key: values[-1] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}
    else:
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "the body is neither JSON nor a form", "address") from None
    try:
        return SuppressionRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "address"
        raise ApiError(400, f"{field}: {error['msg']}", field) from None
