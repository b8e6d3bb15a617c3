"""Cleanup: the rules a parsed message goes through between its intake and its storing.

The original applies them in its ``default-headers`` plugin (on ``message:headers``) and
in the master's routing at ``PUSH``. Here :class:`~zmta_common.intake.MessageIntake`
calls this module with the parsed header block, the envelope and the config, at the same
points of its pipeline (the original's ingest order: ``message:headers``, routing and
``queue:route``, ``message:store``, store). In order:

1. (In the intake, before this module.) For ``/send-raw`` the envelope comes from the
   headers: MAIL FROM from Sender or From, the recipients from To, Cc and Bcc. Then the
   ``message:headers`` plugins run.
2. :func:`route_recipients`: a zone per recipient, as :mod:`zmta_common.routing` decides:
   the ``X-Sending-Zone`` header (lower-cased; only on an interface that allows routing
   headers; a zone that does not exist is an error), a zone's ``routing_headers`` (the
   bottom-most field decides), the envelope sender's domain, each recipient's domain,
   else the default zone. The intake then runs the ``queue:route`` plugins, which may
   change any recipient's zone, and the ``message:store`` plugins.
3. :func:`clean`, as the message is stored:

   a. ``parsedEnvelope``: the addresses of From, To, Cc, Bcc, Reply-To and Sender, taken
      before anything is removed (Bcc is still in them);
   b. ``X-Sending-Zone`` and ``Bcc`` are removed: they are for us, never for a recipient;
   c. ``Message-ID: <uuid@domain>`` (the envelope sender's domain, else our hostname) is
      added at the bottom when missing;
   d. ``Date`` (now, ``+0000``) is added at the bottom when missing, unparseable or
      before 1970, in place of any there;
   e. delayed delivery (the original's ``futureDate`` and ``deferDelivery``): a Date more
      than 5 minutes ahead holds the message until then, at most
      ``queue.max_future_date`` seconds ahead (0, the default, turns it off);
   f. the meta stored with the message: the original's envelope object (``from``, ``to``,
      ``origin``, ``transtype``, ``user``, the DKIM body hash, ``messageId``, ``date``,
      ``parsedEnvelope``, ``bodySize``, ...).

Unlike the original, Message-ID and Date are always added (there is no ``addMissing``
list), ``X-FBL`` is read from the stored headers only when a bounce is made, and no
``X-Originating-IP`` is written.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from typing import TYPE_CHECKING

from .config import Config
from .domains import domain_of
from .headers import HeaderBlock
from .routing import ZONE_HEADER, route

if TYPE_CHECKING:
    from .intake import Envelope

# A Date no further ahead than this is taken for a clock a little fast, not for a delay.
FUTURE_DATE_SLACK = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What the intake learnt of the body while storing it."""

    size: int
    hash_algo: str  # of the DKIM body hash
    body_hash: str  # base64
    canonicalization: str


@dataclass(frozen=True, slots=True)
class Cleaned:
    """What the intake stores besides the header block that :func:`clean` edited."""

    message_id: str
    not_before: datetime | None  # delayed delivery: no attempt before then
    meta: dict[str, object]


def route_recipients(config: Config, headers: HeaderBlock, envelope: Envelope) -> list[str]:
    """The zone of each recipient of ``envelope``, in order (step 2).

    Raises :class:`~zmta_common.routing.UnknownZoneError` for a zone named that does not exist.
    """
    return route(config, headers, envelope.mail_from, envelope.recipients, envelope.allow_routing_headers)


def clean(config: Config, headers: HeaderBlock, envelope: Envelope, queue_id: str, body: BodyFacts) -> Cleaned:
    """Edit ``headers`` in place for storing and build the meta of message ``queue_id`` (step 3)."""
    parsed_envelope = _parsed_envelope(headers)
    message_id = _complete_headers(headers, envelope.mail_from, config.hostname)
    now = datetime.now(UTC)
    meta = _meta(queue_id, envelope, body, message_id, headers.get("date") or "", parsed_envelope, now)
    return Cleaned(message_id, _hold_until(headers, now, config.queue.max_future_date), meta)


def _parsed_envelope(headers: HeaderBlock) -> dict[str, object]:
    def first(key: str) -> str | bool:
        found = [addr for _, addr in getaddresses(headers.get_all(key)) if addr]
        return found[0] if found else False

    return {
        "from": first("from") or "",
        "to": headers.addresses("to"),
        "cc": headers.addresses("cc"),
        "bcc": headers.addresses("bcc"),
        "replyTo": first("reply-to"),
        "sender": first("sender"),
    }


def _complete_headers(headers: HeaderBlock, mail_from: str, hostname: str) -> str:
    """Drop routing-only fields; add Message-ID and Date when missing. Returns the Message-ID."""
    headers.remove(ZONE_HEADER)
    headers.remove("bcc")
    message_id = headers.get("message-id")
    if not message_id:
        message_id = f"<{uuid.uuid4()}@{domain_of(mail_from) or hostname}>"
        headers.add("Message-ID", message_id)
    if not _valid_date(headers.get("date")):
        headers.remove("date")
        headers.add("Date", format_datetime(datetime.now(UTC)))
    return message_id


def _hold_until(headers: HeaderBlock, now: datetime, limit: float) -> datetime | None:
    """Delayed delivery: the Date of a message dated in the future, at most ``limit`` seconds ahead."""
    date = _parse_date(headers.get("date")) if limit else None
    if date is None or date <= now + FUTURE_DATE_SLACK:
        return None
    return min(date, now + timedelta(seconds=limit))


def _meta(
    queue_id: str,
    envelope: Envelope,
    body: BodyFacts,
    message_id: str,
    date: str,
    parsed_envelope: dict[str, object],
    now: datetime,
) -> dict[str, object]:
    """The meta stored with the message: the original's envelope object, keys in its order."""
    return {
        "id": queue_id,
        "interface": envelope.interface,
        "from": envelope.mail_from,
        "to": list(envelope.recipients),
        "origin": envelope.origin,
        "originhost": envelope.originhost,
        "transhost": envelope.transhost,
        "transtype": envelope.transtype,
        "user": envelope.user,
        "time": int(time.time() * 1000),
        "dkim": {"hashAlgo": body.hash_algo, "bodyHash": body.body_hash, "bodyCanon": body.canonicalization},
        "messageId": message_id,
        "date": date,
        "parsedEnvelope": parsed_envelope,
        "bodySize": body.size,
        "created": int(now.timestamp() * 1000),
        **envelope.extra,
    }


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _valid_date(value: str | None) -> bool:
    parsed = _parse_date(value)
    return parsed is not None and parsed > datetime(1970, 1, 1, tzinfo=UTC)
