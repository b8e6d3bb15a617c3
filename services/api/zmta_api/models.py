"""Request and response bodies of the API, in the original's JSON shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AddressObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    address: str


# Nodemailer accepts "a@x, B <b@y>", a list of those, or {name, address} objects.
AddressField = str | AddressObject | list[str | AddressObject]


class HeaderLine(BaseModel):
    """One header as Nodemailer's list form gives it."""

    model_config = ConfigDict(extra="forbid")
    key: str
    value: str


# {"X-Key": "value"} (a list of values repeats the header) or [{"key": ..., "value": ...}].
HeadersField = dict[str, str | list[str]] | list[HeaderLine]

ContentEncoding = Literal["base64", "base64url", "hex", "binary", "latin1", "ascii", "utf8", "utf-8"]


class Attachment(BaseModel):
    """An attachment with its content inline; file paths and URLs are refused (data: URIs are fine)."""

    model_config = ConfigDict(extra="forbid")
    filename: str | None = None
    content: str | None = None
    encoding: ContentEncoding | None = Field(
        default=None, description="how ``content`` is encoded; none: it is text, sent as UTF-8"
    )
    contentType: str | None = Field(default=None, description="default: guessed from the filename")
    contentDisposition: Literal["attachment", "inline"] | None = Field(
        default=None, description="default: inline with a cid, else attachment"
    )
    cid: str | None = Field(default=None, description="Content-ID, for <img src='cid:...'> in the html")
    path: str | None = Field(default=None, description="only a data: URI; file paths are refused")
    href: str | None = Field(default=None, description="refused: URLs are not fetched")


class SendEnvelope(BaseModel):
    """The SMTP envelope, when it is not to be taken from the addresses of the message."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str | AddressObject | None = Field(default=None, alias="from")
    to: AddressField | None = None
    cc: AddressField | None = None
    bcc: AddressField | None = None


class SendRequest(BaseModel):
    """A message in Nodemailer's JSON form (the fields the original's /send takes)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: AddressField = Field(alias="from")
    sender: str | AddressObject | None = None
    to: AddressField | None = None
    cc: AddressField | None = None
    bcc: AddressField | None = None
    replyTo: AddressField | None = None
    inReplyTo: str | None = None
    references: str | list[str] | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: HeadersField = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    envelope: SendEnvelope | None = None
    messageId: str | None = None
    date: str | None = Field(default=None, description="RFC 5322 or ISO 8601; a future date delays delivery")
    priority: Literal["high", "normal", "low"] | None = None


class SendResponse(BaseModel):
    id: str
    from_: str = Field(serialization_alias="from")
    to: list[str]
    response: str


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None


class Counter(BaseModel):
    entries: list[dict[str, Any]]
    rows: int


class CounterResponse(BaseModel):
    zone: str
    active: Counter
    deferred: Counter


class DeferralRecord(BaseModel):
    """One entry of a deferral's log, in the shape of the original's SMTP transcript lines."""

    time: int = Field(description="when it was recorded (ms since the epoch)")
    level: str
    tnx: str = Field(description="what the line is: the receiving server's reply")
    message: str


class DeferredInfo(BaseModel):
    """The original's ``_deferred``: times in ms since the epoch."""

    first: int
    count: int = Field(description="failed attempts so far (0: held back until a later date)")
    last: int
    next: int
    response: str
    log: list[DeferralRecord] = Field(
        description="what is kept of the deferrals: the last failed attempt's response (none when never tried)"
    )


class LockInfo(BaseModel):
    """The original's in-memory queue lock, here the sender's lease on the delivery."""

    key: str = Field(description='"lock <id> <seq>"')
    zone: str
    domain: str
    lockOwner: str = Field(description="the sender that holds the delivery")
    maxConnections: int = Field(description="the recipient domain's connection limit in the zone")
    expires: int = Field(description="when the lease runs out unless renewed (ms since the epoch)")


class QueuedDelivery(BaseModel):
    id: str
    seq: str
    zone: str
    recipient: str
    status: Literal["QUEUED", "DEFERRED"] = Field(description="DEFERRED while its next attempt is in the future")
    lock: LockInfo | None = Field(default=None, description="absent unless a sender is delivering it right now")
    deferred: DeferredInfo | None = Field(default=None, description="absent unless the status is DEFERRED")


class LogEntryModel(BaseModel):
    """One event of a message's life in the delivery log (absent values are null)."""

    time: str = Field(description="ISO 8601")
    action: str = Field(
        description="QUEUED, DROP (a suppressed recipient), ACCEPTED, DEFERRED, REJECTED, QUEUE_BOUNCE (a DSN"
        " was queued), DELETED, HELD, RELEASED"
    )
    id: str
    seq: str | None
    zone: str | None
    from_: str | None = Field(alias="from", description="the envelope sender")
    to: str | None = Field(description="the recipient")
    domain: str | None = Field(description="the recipient domain")
    interface: str | None = None
    client: str | None = Field(default=None, description="the client's address (QUEUED)")
    size: int | None = None
    local_address: str | None = None
    mx: str | None = None
    tls: str | None = None
    response: str | None = None
    category: str | None = None
    ip: str | None = Field(default=None, description="the address of the MX host the attempt reached")
    timer_ms: int | None = Field(default=None, description="how long the attempt took, in milliseconds")
    next_attempt: str | None = Field(default=None, description="DEFERRED: when it is tried again (ISO 8601)")
    bounce_id: str | None = Field(default=None, description="QUEUE_BOUNCE: the queue id of the DSN")
    reason: str | None = None

    model_config = ConfigDict(populate_by_name=True)


class LogPage(BaseModel):
    entries: list[LogEntryModel]
    next: str | None = Field(description="pass as ?cursor= for the next (older) page; null on the last one")


class HourStats(BaseModel):
    hour: str
    zone: str
    queued: int
    delivered: int
    deferred: int
    bounced: int


class CategoryCount(BaseModel):
    category: str
    count: int


class DomainTally(BaseModel):
    domain: str
    count: int


class LogStats(BaseModel):
    hours: list[HourStats]
    categories: list[CategoryCount]
    domains: list[DomainTally]


class HoldResult(BaseModel):
    success: bool
    held: int | None = None
    released: int | None = None


class RetryZoneResult(BaseModel):
    success: bool
    retried: int


class MessageResponse(BaseModel):
    meta: dict[str, Any]
    messages: list[QueuedDelivery]
    log: list[LogEntryModel] = Field(default_factory=list, description="the delivery log of the message, oldest first")


class SuppressionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(default=None, max_length=1000)
    domain: str | None = Field(default=None, max_length=1000)

    @field_validator("address", "domain", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return None if value == "" else value


class SuppressionList(BaseModel):
    suppressed: list[dict[str, Any]]


class SuppressionAdded(BaseModel):
    suppressed: dict[str, Any]


class SuppressionDeleted(BaseModel):
    deleted: str


class ZoneEntry(BaseModel):
    name: str


class QueuedItem(BaseModel):
    id: str
    seq: str
    zone: str
    recipient: str
    created: str = Field(description="when the message was queued (ISO 8601)")
    queued: str = Field(description="the next attempt (ISO 8601)")
    deferred: int = Field(description="failed attempts so far")


class QueuedList(BaseModel):
    zone: str
    type: Literal["queued", "deferred", "held"]
    items: list[QueuedItem] = Field(alias="list")
    next: str | None = Field(
        default=None, description="cursor of the next page (pass it as ?cursor=), null on the last page"
    )


class SkipDomains(BaseModel):
    skipDomains: list[str]


class BlacklistEntry(BaseModel):
    id: str = Field(description="the queue id of the delivery whose reply set the mark")
    seq: str = Field(description="that delivery's seq")
    address: str = Field(description="the local (pool) address the recipient domain refused")
    domain: str
    response: str = Field(description="the reply that said the address is listed")
    created: int = Field(description="when the mark was set (Unix time in milliseconds, as the original)")
    expires: int = Field(description="when the address is used for the domain again (Unix time in milliseconds)")


class BlacklistResponse(BaseModel):
    items: list[BlacklistEntry] = Field(alias="list")


class ShapingEntry(BaseModel):
    zone: str
    scope: Literal["site", "site_address", "zone"]
    site: str | None = Field(description="the site: its MX host names, or the `mx_hosts` pattern (null: the zone)")
    address: str | None = Field(description="the local address, at `site_address` scope")
    rule: str = Field(description="the shaping rule that set it")
    action: Literal["suspend", "throttle"]
    connections: int | None = Field(description="throttle: the site's connections while it lasts")
    rate: str | None = Field(description="throttle: the site's rate while it lasts")
    started: int = Field(description="Unix time in milliseconds")
    expires: int = Field(description="when the configured limits apply again (Unix time in milliseconds)")
    response: str = Field(description="the reply that set it")


class ShapingList(BaseModel):
    shaping: list[ShapingEntry]


class ShapingLifted(BaseModel):
    lifted: ShapingEntry


class Success(BaseModel):
    success: bool


class Outcome(Success):
    """Success, and why nothing changed where nothing did: the original answers success all
    the same on these routes, and its web admin takes anything else for a failure."""

    message: str | None = None


class PauseEntry(BaseModel):
    zone: str
    domain: str | None = Field(description="null: the whole zone is paused")
    created: str


class PauseList(BaseModel):
    paused: list[PauseEntry]


class PauseAdded(BaseModel):
    paused: PauseEntry
