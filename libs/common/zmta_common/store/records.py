"""The store's records: what goes in (messages, outcomes, lease references) and what comes out
(leases, stored messages, delivery rows, counts, suppressions, pauses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple


class DeliveryKey(NamedTuple):
    """One delivery: its message id and its seq within the message."""

    id: str
    seq: str


class LeaseCandidate(NamedTuple):
    """A ready delivery that leasing may take (see :data:`~zmta_common.store.leases.Admit`)."""

    id: str
    seq: str
    domain: str


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """A lease as its holder names it: the delivery and the lease token it was given."""

    id: str
    seq: str
    token: str


@dataclass(frozen=True, slots=True)
class Deferral:
    """A delivery to try again at ``next_attempt``, while ``token`` still holds its lease."""

    id: str
    seq: str
    token: str
    next_attempt: datetime
    response: str


@dataclass(slots=True)
class NewDelivery:
    seq: str
    zone: str
    recipient: str
    domain: str


@dataclass(slots=True)
class NewMessage:
    id: str
    mail_from: str
    headers: bytes
    body_size: int
    meta: dict[str, Any]
    deliveries: list[NewDelivery]
    not_before: datetime | None = None


@dataclass(slots=True)
class Lease:
    id: str
    seq: str
    recipient: str
    domain: str
    mail_from: str
    attempts: int
    lease_token: str
    lease_expires: datetime


@dataclass(slots=True)
class StoredMessage:
    id: str
    mail_from: str
    headers: bytes
    body_size: int
    meta: dict[str, Any]
    created: datetime
    chunks: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class DeliveryRow:
    id: str
    seq: str
    zone: str
    recipient: str
    domain: str
    created: datetime
    next_attempt: datetime
    leased: bool
    attempts: int
    first_deferred: datetime | None
    last_deferred: datetime | None
    last_response: str | None
    lease_owner: str | None = None  # who holds the lease (a sender's name), while ``leased``
    lease_expires: datetime | None = None  # when that lease runs out, while ``leased``


@dataclass(slots=True)
class AttemptHistory:
    attempts: int  # earlier deferrals
    created: datetime  # when the delivery was queued
    last_deferred: datetime | None  # the previous failed attempt, if any


@dataclass(slots=True)
class QueueCounts:
    """Ready (``queued``) and waiting-for-retry (``deferred``) rows of one zone."""

    queued: int = 0
    deferred: int = 0


@dataclass(frozen=True, slots=True)
class DomainCount:
    """Ready (``queued``) and waiting-for-retry (``deferred``) rows of one recipient domain of a zone."""

    zone: str
    domain: str
    queued: int
    deferred: int


@dataclass(slots=True)
class OutcomeBatch:
    """Results to apply in one transaction: deliveries delivered (whatever their lease),
    deferred and rejected (only while their lease token still holds)."""

    delivered: list[DeliveryKey] = field(default_factory=list)
    deferred: list[Deferral] = field(default_factory=list)
    rejected: list[LeaseRef] = field(default_factory=list)
    # What the delivery log says of each attempt (mx, local_address, tls, response, category...).
    details: dict[DeliveryKey, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class QueuedRow:
    """A delivery as the api lists it."""

    id: str
    seq: str
    zone: str
    recipient: str
    created: datetime
    next_attempt: datetime
    attempts: int


# What "retry now" did: made the deliveries ready, found them all leased, or found none.
RetryState = Literal["ready", "leased", "missing"]


@dataclass(frozen=True, slots=True)
class RetryResult:
    state: RetryState
    zone: str | None  # the zone of the deliveries (None when ``missing``)


@dataclass(frozen=True, slots=True)
class DroppedDelivery:
    seq: str
    zone: str


@dataclass(slots=True)
class DropResult:
    removed: list[DroppedDelivery]  # the deliveries deleted
    leased: int  # matching deliveries left alone because a sender holds them


@dataclass(frozen=True, slots=True)
class Suppression:
    """A suppression list entry: an address or (``address`` None) a whole domain."""

    id: str
    address: str | None
    domain: str | None
    created: datetime


@dataclass(slots=True)
class Pause:
    """A paused zone (``domain`` None) or recipient domain within a zone."""

    zone: str
    domain: str | None
    created: datetime


# The delivery log's actions: the original's remote-log names (webadmin's vocabulary).
LOG_ACTIONS: tuple[str, ...] = (
    "QUEUED", "DROP", "ACCEPTED", "DEFERRED", "REJECTED", "DELETED", "QUEUE_BOUNCE", "HELD", "RELEASED"
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event of a message's life in the delivery log."""

    time: datetime
    action: str
    id: str
    seq: str | None
    zone: str | None
    mail_from: str | None
    recipient: str | None
    domain: str | None
    details: dict[str, Any]  # interface, client, size, local_address, mx, tls, response, category, ...

    def view(self) -> dict[str, Any]:
        """The entry as the api, the webhook and the console show it: flat, times in ISO 8601
        with milliseconds (as JavaScript writes them), absent values null."""
        moment = self.time.astimezone(UTC)
        return {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "action": self.action,
            "id": self.id,
            "seq": self.seq,
            "zone": self.zone,
            "from": self.mail_from,
            "to": self.recipient,
            "domain": self.domain,
            **{name: self.details.get(name) for name in LOG_DETAILS},
        }


# The details a log entry may carry.
LOG_DETAILS = (
    "interface", "client", "size", "local_address", "mx", "ip", "tls", "response", "category", "timer_ms",
    "next_attempt", "bounce_id", "reason",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LogQuery:
    """What to find in the delivery log; None matches anything."""

    id: str | None = None
    recipient: str | None = None
    mail_from: str | None = None
    domain: str | None = None
    zone: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class HourCount:
    hour: datetime
    zone: str
    queued: int
    delivered: int
    deferred: int
    bounced: int
