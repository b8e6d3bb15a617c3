"""Delivery status notifications (zmta_bounce.dsn): when none may be sent, and the RFC 3464
report that is, read back with the email package."""

from __future__ import annotations

from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest

from zmta_bounce.dsn import build, skip_reason
from zmta_common.events import DELAYED, FAILED, BounceEvent
from zmta_common.headers import HeaderBlock

QUEUED = 1714561200.0  # Wed, 01 May 2024 11:00:00 +0000
ORIGINAL = (
    b"From: Joe <joe@origin.test>\r\nTo: rcpt@a.test\r\nSubject: Hello \xc3\xbc\r\nMessage-ID: <orig@origin.test>\r\n"
)
EVENT = BounceEvent(
    id="18f2a3b4c5d",
    seq="001",
    zone="default",
    recipient="rcpt@a.test",
    mail_from="joe@origin.test",
    response="550 5.1.1 <rcpt@a.test>: user unknown",
    category="recipient_unknown",
    time=QUEUED + 600,
    headers=ORIGINAL,
    mx="mx.a.test",
    arrival=QUEUED,
)


def report(event: BounceEvent, retry_until: float | None = None) -> tuple[EmailMessage, bytes, str]:
    raw, recipient = build(event, "mta.test", "bounces", retry_until)
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed, raw, recipient


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    found = [part for part in payload if isinstance(part, EmailMessage)]
    assert len(found) == len(payload)
    return found


def status_blocks(msg: EmailMessage) -> tuple[dict[str, str], dict[str, str]]:
    """The per-message and the per-recipient fields of the delivery-status part."""
    per_message, per_recipient = parts(parts(msg)[1])
    return dict(per_message.items()), dict(per_recipient.items())


def test_a_failure_report_is_a_multipart_report_of_three_parts() -> None:
    msg, raw, recipient = report(EVENT)
    assert recipient == "joe@origin.test"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert raw.isascii()
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n")


def test_the_failure_reports_headers() -> None:
    msg, _, _ = report(EVENT)
    assert msg["From"] == "Mail Delivery Subsystem <mailer-daemon@mta.test>"
    assert msg["To"] == "joe@origin.test"
    assert msg["Subject"] == "Delivery Status Notification (Failure: rcpt@a.test)"
    assert msg["Auto-Submitted"] == "auto-replied"  # never answered by another auto-reply
    assert msg["X-Failed-Recipients"] == "rcpt@a.test"
    assert msg["X-Sending-Zone"] == "bounces"
    assert msg["Message-ID"].endswith("@mta.test>")
    assert (msg["In-Reply-To"], msg["References"]) == ("<orig@origin.test>", "<orig@origin.test>")
    assert parsedate_to_datetime(msg["Date"]).tzinfo is not None


def test_the_delivery_status_fields_of_a_failure() -> None:
    per_message, per_recipient = status_blocks(report(EVENT)[0])
    assert per_message == {
        "Reporting-MTA": "dns; mta.test",
        "X-ZoneMTA-Queue-ID": "18f2a3b4c5d",
        "X-ZoneMTA-Sender": "rfc822; joe@origin.test",
        "Arrival-Date": "Wed, 01 May 2024 11:00:00 +0000",
    }
    assert per_recipient == {
        "Final-Recipient": "rfc822; rcpt@a.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.a.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 <rcpt@a.test>: user unknown",
    }


def test_the_readable_part_and_the_original_headers() -> None:
    msg, _, _ = report(EVENT)
    notice, _, original = parts(msg)
    text = notice.get_content()
    assert "This is the mail system at host mta.test." in text
    assert "could not be delivered" in text
    assert "<rcpt@a.test>: 550 5.1.1 <rcpt@a.test>: user unknown" in text
    headers = original.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert headers.replace(b"\r\n", b"\n") == ORIGINAL.replace(b"\r\n", b"\n")  # the UTF-8 subject intact
    assert b"Hello" not in parts(msg)[1].as_bytes()  # only the headers part carries the original


def test_a_delay_report() -> None:
    retry_until = QUEUED + 48 * 3600
    delayed = replace(EVENT, kind=DELAYED, response="451 4.7.1 greylisted, try later")
    msg, _, _ = report(delayed, retry_until)
    assert msg["Subject"] == "Delivery Status Notification (Delay: rcpt@a.test)"
    assert msg["X-Failed-Recipients"] is None
    _, per_recipient = status_blocks(msg)
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.7.1"
    assert per_recipient["Will-Retry-Until"] == "Fri, 03 May 2024 11:00:00 +0000"
    text = parts(msg)[0].get_content()
    assert "has not been delivered yet" in text and "do not need to\nsend it again" in text.replace("\r\n", "\n")
    assert "retried until Fri, 03 May 2024 11:00:00 +0000." in text


def test_a_delay_report_without_a_known_end_and_a_failure_ignore_retry_until() -> None:
    msg, _, _ = report(replace(EVENT, kind=DELAYED))
    assert "Will-Retry-Until" not in status_blocks(msg)[1]
    assert "Delivery will be retried." in parts(msg)[0].get_content()
    failed, _, _ = report(EVENT, retry_until=QUEUED + 3600)
    assert "Will-Retry-Until" not in status_blocks(failed)[1]
    assert "retried" not in parts(failed)[0].get_content()


@pytest.mark.parametrize(
    ("response", "kind", "status"),
    [
        ("550 5.1.1 user unknown", FAILED, "5.1.1"),
        ("550 user unknown", FAILED, "5.0.0"),  # no enhanced status: the class of the code
        ("421 4.4.2 timeout (gave up after 17 attempts)", FAILED, "4.4.2"),
        ("451 greylisted (gave up after 17 attempts)", FAILED, "4.0.0"),
        ("domain x.test does not exist", FAILED, "5.0.0"),  # no reply at all
        ("550 5.1 not enhanced", FAILED, "5.0.0"),
        ("550 2.0.0 not a failure status", FAILED, "5.0.0"),
        ("550 5.1.1 user unknown", DELAYED, "4.1.1"),  # a delay is transient, whatever the reply
        ("452 4.2.2 mailbox full", DELAYED, "4.2.2"),
        ("451 try later", DELAYED, "4.0.0"),
    ],
)
def test_status(response: str, kind: str, status: str) -> None:
    msg, _, _ = report(replace(EVENT, response=response, kind=kind))
    _, per_recipient = status_blocks(msg)
    assert (per_recipient["Status"], per_recipient["Diagnostic-Code"]) == (status, f"smtp; {response}")


def test_optional_fields_left_out_when_unknown() -> None:
    msg, _, _ = report(replace(EVENT, mx="", arrival=0.0, headers=b"Subject: no id\r\n"))
    per_message, per_recipient = status_blocks(msg)
    assert "Remote-MTA" not in per_recipient
    assert per_message["Arrival-Date"] == "Wed, 01 May 2024 11:10:00 +0000"  # the bounce's time instead
    assert msg["In-Reply-To"] is None and msg["References"] is None


def test_text_parts_are_ascii_when_they_can_be_else_quoted_printable_utf8() -> None:
    notice, _, original = parts(report(EVENT)[0])
    assert (notice.get_content_charset(), notice["Content-Transfer-Encoding"]) == ("us-ascii", "7bit")
    assert (original.get_content_charset(), original["Content-Transfer-Encoding"]) == ("utf-8", "quoted-printable")
    _, _, plain = parts(report(replace(EVENT, headers=b"Subject: plain\r\n"))[0])
    assert plain.get_content_charset() == "us-ascii"


def skip(mail_from: str = "joe@origin.test", headers: bytes = b"") -> str | None:
    return skip_reason(replace(EVENT, mail_from=mail_from), HeaderBlock.parse(headers))


def test_an_ordinary_message_gets_a_dsn() -> None:
    assert skip() is None
    assert skip(headers=b"Auto-Submitted: no\r\nPrecedence: first-class\r\nContent-Type: text/plain\r\n") is None
    assert skip(headers=b"Auto-Submitted: No \r\nX-Auto-Response-Suppress: OOF\r\n") is None


@pytest.mark.parametrize("mail_from", ["", "MAILER-DAEMON@mta.test", "mailer-daemon@elsewhere.test"])
def test_never_to_the_null_sender_or_a_mailer_daemon(mail_from: str) -> None:
    assert skip(mail_from) == "null or mailer-daemon sender"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"Auto-Submitted: auto-replied\r\n", "Auto-Submitted: auto-replied"),
        (b"Auto-Submitted: Auto-Generated; owner-email=x@y\r\n", "Auto-Submitted: auto-generated; owner-email=x@y"),
        (b"Precedence: bulk\r\n", "Precedence: bulk"),
        (b"Precedence:  List \r\n", "Precedence: List"),
        (b"precedence: JUNK\r\n", "Precedence: JUNK"),
        (b"Content-Type: multipart/report; report-type=delivery-status\r\n", "the message is a report itself"),
        (b"X-Auto-Response-Suppress: DR, All\r\n", "X-Auto-Response-Suppress: All"),
        # Auto-Submitted is checked first.
        (b"Precedence: bulk\r\nAuto-Submitted: auto-notified\r\n", "Auto-Submitted: auto-notified"),
    ],
)
def test_never_for_automatic_mail_or_reports(headers: bytes, reason: str) -> None:
    assert skip(headers=headers) == reason


def test_the_null_sender_is_checked_before_the_headers() -> None:
    assert skip("", b"Precedence: bulk\r\n") == "null or mailer-daemon sender"


def test_a_reply_and_host_not_in_ascii_are_escaped_in_an_ascii_report() -> None:
    event = replace(EVENT, response="550 5.1.1 Benutzer unbekannt: Grüße", mx="mx.bücher.test")
    msg, raw, _ = report(event)
    assert raw.isascii()
    assert parts(msg)[1].get_content_type() == "message/delivery-status"
    _, per_recipient = status_blocks(msg)
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: Gr\\x{FC}\\x{DF}e"
    assert per_recipient["Remote-MTA"] == "dns; mx.b\\x{FC}cher.test"
    assert "Grüße" in parts(msg)[0].get_content()  # the readable part keeps the reply as it was


@pytest.mark.parametrize("who", ["mail_from", "recipient"])
def test_an_address_not_in_ascii_gets_the_international_report(who: str) -> None:
    address = "jöe@ürigin.test"
    event = replace(EVENT, mail_from=address) if who == "mail_from" else replace(EVENT, recipient=address)
    msg, raw, recipient = report(event)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert parts(msg)[1].get_content_type() == "message/global-delivery-status"
    assert address.encode() in raw  # written as UTF-8, not as encoded words
    assert b"=?utf-8?" not in raw.split(b"\r\n\r\n", 1)[0]
    per_message, per_recipient = global_status_blocks(raw)
    field = per_message["X-ZoneMTA-Sender"] if who == "mail_from" else per_recipient["Final-Recipient"]
    assert field == f"utf-8; {address}"
    assert per_recipient["Action"] == "failed"
    assert recipient == (address if who == "mail_from" else EVENT.mail_from)


def global_status_blocks(raw: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """The two field blocks of a message/global-delivery-status part (which the email
    package reads as one opaque message), split by hand."""
    section = raw.split(b"Content-Type: message/global-delivery-status", 1)[1]
    body = section.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0].decode("utf-8").strip()
    blocks = [dict(line.split(": ", 1) for line in block.split("\r\n")) for block in body.split("\r\n\r\n")]
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]
