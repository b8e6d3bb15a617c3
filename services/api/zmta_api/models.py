"""Request and response bodies of the API, in the original's JSON shapes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AddressObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    address: str


# Nodemailer accepts "a@x, B <b@y>", a list of those, or {name, address} objects.
AddressField = str | AddressObject | list[str | AddressObject]


class SendRequest(BaseModel):
    """A message in Nodemailer's JSON form (the fields the original's /send takes)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: AddressField = Field(alias="from")
    to: AddressField | None = None
    cc: AddressField | None = None
    bcc: AddressField | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


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


class DeferredInfo(BaseModel):
    first: int
    count: int
    last: int
    next: int
    response: str


class QueuedDelivery(BaseModel):
    id: str
    seq: str
    zone: str
    recipient: str
    status: str
    lock: bool
    deferred: DeferredInfo | None = None


class MessageResponse(BaseModel):
    meta: dict[str, Any]
    messages: list[QueuedDelivery]


class SuppressionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    domain: str | None = None


class SuppressionList(BaseModel):
    suppressed: list[dict[str, Any]]


class SuppressionAdded(BaseModel):
    suppressed: dict[str, Any]


class SuppressionDeleted(BaseModel):
    deleted: str
