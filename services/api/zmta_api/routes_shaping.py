"""Traffic shaping: the overrides in force, and lifting one (:mod:`zmta_common.shaping`)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query

from zmta_common import redis_keys
from zmta_common.shaping import Override, Overrides, log_ended, scope_key

from .common import ApiError, Services, ZoneName, check_zone, error_responses
from .models import ShapingEntry, ShapingLifted, ShapingList

log = logging.getLogger(__name__)


def router(services: Services) -> APIRouter:
    api = APIRouter(tags=["shaping"])
    config = services.config

    def overrides() -> Overrides:
        return Overrides(services.redis_or_503())

    @api.get("/shaping", response_model=ShapingList, responses=error_responses(503))
    async def in_force() -> ShapingList:
        """The traffic shaping overrides in force, zone by zone: what each holds back (a
        site, a site from one local address, or a whole zone), how (suspended, or throttled
        to ``connections`` and ``rate``), until when, and the rule and reply that set it."""
        store = overrides()
        entries = [_entry(o) for zone in sorted(config.zones) for o in await store.active(zone)]
        return ShapingList(shaping=entries)

    @api.delete("/shaping/{zone}", response_model=ShapingLifted, responses=error_responses(400, 404, 503))
    async def lift(
        zone: ZoneName,
        site: Annotated[
            str | None, Query(max_length=300, description="the site; none: the zone's own override")
        ] = None,
        address: Annotated[
            str | None, Query(max_length=64, description="the local address of a `site_address` override")
        ] = None,
    ) -> ShapingLifted:
        """End an override now: the configured limits apply again at once. Without ``site``
        the zone-wide one; with ``site`` that site's; with ``site`` and ``address`` the one of
        that local address at the site."""
        check_zone(config, zone)
        if address and not site:
            raise ApiError(400, "address needs site", "address")
        key = scope_key("zone") if not site else scope_key("site_address" if address else "site", site, address or "")
        lifted = await overrides().lift(zone, key)
        if lifted is None:
            raise ApiError(404, f"no shaping override for {key!r} in zone {zone!r}", "site")
        log_ended(lifted, "lifted")
        # The domains it held wait on the skip list a few seconds more: clear it (a domain
        # still at a limit is put back at its next lease), and wake the senders.
        await services.redis_or_503().delete(redis_keys.skip(zone))
        await services.wake(zone)
        return ShapingLifted(lifted=_entry(lifted))

    return api


def _entry(o: Override) -> ShapingEntry:
    fields: dict[str, Any] = {
        "zone": o.zone,
        "scope": o.scope,
        "site": o.site or None,
        "address": o.address or None,
        "rule": o.rule,
        "action": o.action,
        "connections": o.connections,
        "rate": o.rate,
        "started": round(o.started * 1000),
        "expires": round(o.expires * 1000),
        "response": o.response,
    }
    return ShapingEntry.model_validate(fields)
