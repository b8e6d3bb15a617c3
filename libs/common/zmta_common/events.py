"""Every NATS subject and every msgpack payload that crosses between services.

Both sides of each exchange import their subject and payload type from here, so a
change is made once. A payload is a msgpack map carrying ``v``, the schema version.
Additive changes (a new optional field) keep the version: readers ignore keys they do
not know. A breaking change bumps it, and readers refuse versions they do not speak.

Subjects follow ``zmta.<noun>.<verb>[.<zone>]``:

=================================  ===============  =====================================
subject                            how              payload
=================================  ===============  =====================================
zmta.msg.queued.<zone>             core publish     :class:`MessageQueued` (wakes senders)
zmta.work.ready.<zone>             core publish     :class:`WorkReady` (room freed: wakes senders)
zmta.work.request.<zone>           request/reply    :class:`WorkRequest` -> :class:`WorkReply`
zmta.delivery.reported.<zone>      JetStream        :class:`DeliveryReport` (stream RESULTS)
zmta.delivery.bounced.<zone>       JetStream        :class:`BounceEvent` (stream BOUNCES)
zmta.delivery.delayed.<zone>       JetStream        :class:`BounceEvent`, kind "delayed" (BOUNCES)
zmta.bounce.notify                 JetStream        :class:`Notification` (stream NOTIFY)
zmta.bounce.classify               request/reply    :class:`ClassifyRequest` -> :class:`Classification`
zmta.log.<action>                  core publish     :class:`LogEvent` (the delivery log as a stream)
=================================  ===============  =====================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack

SCHEMA_VERSION = 1

# JetStream streams: name -> subjects. Work-queue retention: a message is gone once acked.
STREAM_RESULTS = "ZMTA_RESULTS"
STREAM_BOUNCES = "ZMTA_BOUNCES"
STREAM_NOTIFY = "ZMTA_NOTIFY"
NOTIFY_SUBJECT = "zmta.bounce.notify"
STREAMS: dict[str, list[str]] = {
    STREAM_RESULTS: ["zmta.delivery.reported.>"],
    STREAM_BOUNCES: ["zmta.delivery.bounced.>", "zmta.delivery.delayed.>"],
    STREAM_NOTIFY: [NOTIFY_SUBJECT],
}

# Queue groups, so that several replicas of one service share the work.
QUEUE_GROUP_QUEUE = "zmta-queue"
QUEUE_GROUP_BOUNCE = "zmta-bounce"


class SchemaError(ValueError):
    """A payload that is not valid msgpack, has a foreign version or lacks a field."""


def queued_subject(zone: str) -> str:
    return f"zmta.msg.queued.{zone}"


def ready_subject(zone: str) -> str:
    return f"zmta.work.ready.{zone}"


def work_subject(zone: str) -> str:
    return f"zmta.work.request.{zone}"


def reported_subject(zone: str) -> str:
    return f"zmta.delivery.reported.{zone}"


def bounced_subject(zone: str) -> str:
    return f"zmta.delivery.bounced.{zone}"


def delayed_subject(zone: str) -> str:
    return f"zmta.delivery.delayed.{zone}"


CLASSIFY_SUBJECT = "zmta.bounce.classify"
WORK_SUBJECT_ALL = "zmta.work.request.*"


@dataclass(slots=True)
class Payload:
    """Base of every payload: msgpack encoding with a version and tolerant decoding."""

    NESTED: ClassVar[dict[str, type[Payload]]] = {}

    def encode(self) -> bytes:
        data = {"v": SCHEMA_VERSION, **self._as_map()}
        return msgpack.packb(data, use_bin_type=True)

    def _as_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.NESTED:
                value = [item._as_map() for item in value]
            out[f.name] = value
        return out

    @classmethod
    def decode(cls, data: bytes) -> Self:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise SchemaError(f"{cls.__name__}: not a msgpack payload ({exc})") from None
        if not isinstance(raw, dict):
            raise SchemaError(f"{cls.__name__}: payload is not a map")
        return cls._from_map(raw, check_version=True)

    @classmethod
    def _from_map(cls, raw: dict[str, Any], check_version: bool = False) -> Self:
        if check_version:
            version = raw.get("v")
            if version != SCHEMA_VERSION:
                raise SchemaError(f"{cls.__name__}: unsupported schema version {version!r}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SchemaError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            value = raw[f.name]
            nested = cls.NESTED.get(f.name)
            if nested is not None:
                value = [nested._from_map(item) for item in value]
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(slots=True)
class MessageQueued(Payload):
    """A message was committed to the store; senders of the zone may ask for work now."""

    id: str
    zone: str
    deliveries: int


@dataclass(slots=True)
class WorkReady(Payload):
    """Deliveries of the zone finished, so limits that held work back may have room again."""

    zone: str
    finished: int


@dataclass(slots=True)
class WorkRequest(Payload):
    """A sender asks the queue for up to ``max`` ready deliveries of its zone.

    It is pod ``slice_index`` of ``slice_count``: it gets the deliveries whose local
    address is in its slice of the zone's pool.
    """

    zone: str
    sender: str
    max: int
    slice_index: int = 0
    slice_count: int = 1


@dataclass(slots=True)
class LeasedDelivery(Payload):
    """One delivery leased to a sender until ``lease_expires`` (unix seconds)."""

    id: str
    seq: str
    recipient: str
    domain: str
    mail_from: str
    lease_token: str
    lease_expires: float
    attempts: int
    # The pool address to send from, chosen by the queue ("" when the zone has no pool,
    # or when every address is blacklisted or disabled for the domain).
    local_address: str = ""


@dataclass(slots=True)
class WorkReply(Payload):
    NESTED: ClassVar[dict[str, type[Payload]]] = {"deliveries": LeasedDelivery}

    deliveries: list[LeasedDelivery] = field(default_factory=list)
    # Seconds until a domain now at a limit has room again (the soonest), 0 when none is:
    # a sender that got less than it asked for asks again then, not at its idle poll.
    retry_in: float = 0.0


# Outcomes a sender reports.
DELIVERED = "delivered"
DEFERRED = "deferred"
REJECTED = "rejected"
STATUSES = (DELIVERED, DEFERRED, REJECTED)


@dataclass(slots=True)
class DeliveryReport(Payload):
    """What happened to one leased delivery. Published to the durable RESULTS stream."""

    id: str
    seq: str
    zone: str
    lease_token: str
    status: str
    response: str
    category: str = ""
    mx: str = ""
    local_address: str = ""
    time: float = 0.0
    # The SMTP session's TLS: "version=TLSv1.3 cipher=... verified=yes|no", "none" (plain
    # text), or "" when no session was reached.
    tls: str = ""
    mx_ip: str = ""  # the address of the MX host the attempt reached, if it reached one
    timer_ms: int = 0  # how long the attempt took

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise SchemaError(f"DeliveryReport: unknown status {self.status!r}")


FAILED = "failed"
DELAYED = "delayed"


@dataclass(slots=True)
class BounceEvent(Payload):
    """A delivery was rejected for good (kind "failed"), or has been failing for a while
    and is still being retried (kind "delayed"); the bounce service notifies the sender."""

    id: str
    seq: str
    zone: str
    recipient: str
    mail_from: str
    response: str
    category: str
    time: float
    headers: bytes = b""
    mx: str = ""  # the server that refused, when one did
    arrival: float = 0.0  # when the message was queued (unix seconds)
    kind: str = FAILED


@dataclass(slots=True)
class Notification(Payload):
    """One HTTP bounce notification to POST to ``url`` until it answers 2xx."""

    url: str
    fields: dict[str, str]
    created: float  # when the bounce happened: the notification is given up after a while


@dataclass(slots=True)
class ClassifyRequest(Payload):
    """An SMTP reply (or a connection/DNS error with code 0) to classify."""

    code: int
    text: str
    stage: str = ""


@dataclass(slots=True)
class Classification(Payload):
    action: str  # defer | reject | blacklist
    category: str
    message: str


def log_subject(action: str) -> str:
    """Where the delivery log's entries of ``action`` (QUEUED, ACCEPTED...) are published."""
    return f"zmta.log.{action.lower()}"


@dataclass(slots=True)
class LogEvent(Payload):
    """A delivery log entry, as the log stream publishes it (``delivery_log.stream``)."""

    time: float  # Unix time
    action: str
    id: str
    seq: str = ""
    zone: str = ""
    mail_from: str = ""
    recipient: str = ""
    domain: str = ""
    details: dict[str, Any] = field(default_factory=dict)
