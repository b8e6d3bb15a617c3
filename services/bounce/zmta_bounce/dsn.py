"""Delivery status notifications (RFC 3464) for rejected deliveries.

A DSN goes from the null sender to the envelope sender of the failed message, as
``multipart/report; report-type=delivery-status`` with a readable part, the
machine-readable ``message/delivery-status`` part and the original's headers
(``text/rfc822-headers``). None is sent for mail from the null sender, nor for
automatic mail (``Auto-Submitted`` other than ``no``, ``Precedence: bulk``,
``list`` or ``junk``), nor for a report itself: never a bounce of a bounce.

Where the sender's or the recipient's address is not ASCII (SMTPUTF8 mail), the report
is the international one of RFC 6533: ``message/global-delivery-status`` with ``utf-8``
address types, written as UTF-8 (its delivery needs SMTPUTF8 anyway). Otherwise the
status fields stay ASCII, as RFC 3464 wants them: a reply or host name with other
characters carries them as RFC 6533's ``\\x{HEX}`` escapes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.charset import QP, Charset
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, make_msgid

from zmta_common.events import DELAYED, BounceEvent
from zmta_common.headers import HeaderBlock

MAILER_DAEMON = "Mail Delivery Subsystem"


def skip_reason(event: BounceEvent, headers: HeaderBlock) -> str | None:
    """Why no DSN may be sent for this bounce, or None when one should be."""
    if not event.mail_from or event.mail_from.lower().startswith("mailer-daemon@"):
        return "null or mailer-daemon sender"
    auto = (headers.get("auto-submitted") or "no").strip().lower()
    if auto != "no":
        return f"Auto-Submitted: {auto}"
    if (headers.get("precedence") or "").strip().lower() in ("bulk", "list", "junk"):
        return "Precedence: " + (headers.get("precedence") or "")
    if (headers.get("content-type") or "").lower().startswith("multipart/report"):
        return "the message is a report itself"
    if "all" in (headers.get("x-auto-response-suppress") or "").lower():
        return "X-Auto-Response-Suppress: All"
    return None


def _text(text: str, subtype: str) -> MIMEText:
    """A text part that stays readable: plain ASCII, else quoted-printable UTF-8."""
    if text.isascii():
        return MIMEText(text, subtype, "us-ascii")
    utf8 = Charset("utf-8")
    utf8.body_encoding = QP
    return MIMEText(text, subtype, utf8)  # type: ignore[arg-type]


def _status(response: str, delayed: bool) -> str:
    """The enhanced status of the reply when it has one, else the class of its code.

    A delay report always carries a 4.x.x status (RFC 3464: "delayed" is transient).
    """
    parts = response.split()
    status = ""
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "45":
        status = parts[1]
    if delayed:
        return "4" + status[1:] if status else "4.0.0"
    return status or ("5.0.0" if response[:1] != "4" else "4.0.0")


def build(event: BounceEvent, reporting_mta: str, zone: str, retry_until: float | None = None) -> tuple[bytes, str]:
    """The DSN message and its envelope recipient (the failed message's sender).

    A "delayed" event gives a delay warning (``Action: delayed``, with
    ``Will-Retry-Until`` when ``retry_until`` is known); any other a failure report.
    """
    delayed = event.kind == DELAYED
    headers = HeaderBlock.parse(event.headers)
    arrival = datetime.fromtimestamp(event.arrival or event.time, UTC)
    notice = _text(_notice(event, reporting_mta, retry_until if delayed else None), "plain")
    international = not (event.mail_from.isascii() and event.recipient.isascii())
    address_type = "utf-8" if international else "rfc822"
    mx, response = (event.mx, event.response) if international else (_escaped(event.mx), _escaped(event.response))
    per_message = [
        ("Reporting-MTA", f"dns; {reporting_mta}"),
        ("X-ZoneMTA-Queue-ID", event.id),
        ("X-ZoneMTA-Sender", f"{address_type}; {event.mail_from}"),
        ("Arrival-Date", format_datetime(arrival)),
    ]
    per_recipient = [
        ("Final-Recipient", f"{address_type}; {event.recipient}"),
        ("Action", "delayed" if delayed else "failed"),
        ("Status", _status(event.response, delayed)),
    ]
    if mx:
        per_recipient.append(("Remote-MTA", f"dns; {mx}"))
    per_recipient.append(("Diagnostic-Code", f"smtp; {response}"))
    if delayed and retry_until:
        per_recipient.append(("Will-Retry-Until", format_datetime(datetime.fromtimestamp(retry_until, UTC))))
    report_type = "global-delivery-status" if international else "delivery-status"
    status = _status_part(report_type, [per_message, per_recipient])
    original = _text(event.headers.decode("utf-8", "replace").replace("\r\n", "\n"), "rfc822-headers")
    report = MIMEMultipart("report", report_type=report_type, _subparts=[notice, status, original])
    report["From"] = f"{MAILER_DAEMON} <mailer-daemon@{reporting_mta}>"
    report["To"] = event.mail_from
    what = "Delay" if delayed else "Failure"
    report["Subject"] = f"Delivery Status Notification ({what}: {event.recipient})"
    report["Auto-Submitted"] = "auto-replied"
    if not delayed:
        report["X-Failed-Recipients"] = event.recipient
    report["X-Sending-Zone"] = zone
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Date"] = format_datetime(datetime.now(UTC))
    if message_id := headers.get("message-id"):
        report["In-Reply-To"] = message_id
        report["References"] = message_id
    if international:
        # As text, then UTF-8: the email package's bytes writer takes 8-bit text only in
        # the parts it decodes itself, not in this one.
        return report.as_string(policy=SMTPUTF8).encode("utf-8"), event.mail_from
    return report.as_bytes(policy=SMTP), event.mail_from


def _status_part(subtype: str, blocks: list[list[tuple[str, str]]]) -> MIMEBase:
    """The machine-readable part: its blocks of fields, a blank line between them.

    The email package lays out the blocks of ``message/delivery-status`` (ASCII) itself,
    each given as a header block; those of ``message/global-delivery-status`` are
    written out here, as UTF-8.
    """
    part = MIMEBase("message", subtype)
    if subtype == "delivery-status":
        for block in blocks:
            fields = Message()
            for name, value in block:
                fields[name] = value
            part.attach(fields)
        return part
    text = "\r\n\r\n".join("\r\n".join(f"{name}: {value}" for name, value in block) for block in blocks)
    part.set_payload(text + "\r\n")  # UTF-8 when written: see build()
    if not text.isascii():
        part["Content-Transfer-Encoding"] = "8bit"
    return part


def _escaped(text: str) -> str:
    """``text`` in ASCII: every other character as RFC 6533's ``\\x{HEX}``."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _notice(event: BounceEvent, reporting_mta: str, retry_until: float | None) -> str:
    head = f"This is the mail system at host {reporting_mta}.\n\n"
    reply = f"<{event.recipient}>: {event.response}\n"
    if event.kind != DELAYED:
        return head + "Your message could not be delivered to one or more recipients.\n\n" + reply
    until = ""
    if retry_until:
        until = f" until {format_datetime(datetime.fromtimestamp(retry_until, UTC))}"
    return (
        head
        + "Your message has not been delivered yet. This is only a warning: you do not need to\n"
        + f"send it again. Delivery will be retried{until}.\n\n"
        + reply
    )
