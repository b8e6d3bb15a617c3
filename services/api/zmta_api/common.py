"""What every router of the api shares: the services it talks to, its error type, id formats."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Path
from redis.asyncio import Redis

from zmta_common.bus import Bus
from zmta_common.config import Config
from zmta_common.events import WorkReady, ready_subject
from zmta_common.hooks import Hooks
from zmta_common.store import Store

from .models import ErrorResponse

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    config: Config
    store: Store
    bus: Bus
    hooks: Hooks = field(default_factory=Hooks)
    # Limits and blacklist marks (/skipdomains, /blacklist); those routes answer 503 without it.
    redis: Redis | None = None

    def redis_or_503(self) -> Redis:
        if self.redis is None:
            raise ApiError(503, "this api has no Redis connection")
        return self.redis

    async def wake(self, zone: str) -> None:
        """Tell the zone's senders that work is ready (best effort: they poll every second anyway)."""
        try:
            await self.bus.nc.publish(ready_subject(zone), WorkReady(zone=zone, finished=0).encode())
        except Exception as exc:  # NATS down: the senders find the work by themselves
            log.warning("wake failed", extra={"zone": zone, "error": repr(exc)})


class ApiError(Exception):
    """Answered as ``{"error": ..., "field": ...}`` with ``status``."""

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, all with the ErrorResponse body."""
    return {status: {"model": ErrorResponse} for status in statuses}


# Queue ids (ids.new_queue_id) and delivery seqs (ids.seq_for), as path parameters.
ID_PATTERN = r"[0-9a-f]{14,24}"  # a queue id
SEQ_PATTERN = r"[0-9a-f]{3,8}"  # a delivery's seq (recipient number, hex)
MessageId = Annotated[str, Path(pattern=f"^{ID_PATTERN}$", description="queue id of the message")]
ZoneName = Annotated[str, Path(max_length=200, description="name of a sending zone")]
DomainName = Annotated[str, Path(min_length=1, max_length=255, description="a recipient domain")]
# Where the original takes any value and answers success (its web admin counts on that).
AnyId = Annotated[str, Path(max_length=200, description="queue id of the message, or seq of the delivery")]


def well_formed(message_id: str, seq: str | None = None) -> bool:
    """Whether ``message_id`` (and ``seq``) can be a queue id (and a seq) at all."""
    return re.fullmatch(ID_PATTERN, message_id) is not None and (
        seq is None or re.fullmatch(SEQ_PATTERN, seq) is not None
    )


def check_zone(config: Config, zone: str) -> None:
    if zone not in config.zones:
        raise ApiError(404, f"sending zone {zone!r} does not exist", "zone")


def iso(value: datetime | float) -> str:
    """A time as JavaScript's toISOString() writes it (the original's JSON): UTC, milliseconds, Z."""
    moment = datetime.fromtimestamp(value, UTC) if isinstance(value, float | int) else value.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
