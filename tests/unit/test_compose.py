"""The message that the API's /send composes (zmta_api.compose), read back with the email package.

Line breaks in header text and the basic recipient cap are in test_header_safety.py.
"""

from __future__ import annotations

import base64
from email import message_from_bytes, message_from_string, policy
from email.message import EmailMessage
from typing import Any

import pytest

from zmta_api.compose import ComposeError, compose, parse_addresses
from zmta_api.models import AddressObject, SendRequest

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image"
PDF = b"%PDF-1.4\n% not really\n"


def send(request: dict[str, Any], max_recipients: int = 1000) -> tuple[EmailMessage, bytes, str, list[str]]:
    """The composed message parsed back, its bytes, MAIL FROM and RCPT TO."""
    raw, mail_from, recipients = compose(SendRequest.model_validate(request), max_recipients)
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed, raw, mail_from, recipients


def refusal(request: dict[str, Any], max_recipients: int = 1000) -> tuple[str, str]:
    with pytest.raises(ComposeError) as refused:
        compose(SendRequest.model_validate(request), max_recipients)
    assert str(refused.value) == f"{refused.value.field}: {refused.value.reason}"
    return refused.value.field, refused.value.reason


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    found = [part for part in payload if isinstance(part, EmailMessage)]
    assert len(found) == len(payload)
    return found


def shape(msg: EmailMessage) -> object:
    """The MIME tree as nested content types."""
    if msg.is_multipart():
        return [msg.get_content_type(), [shape(part) for part in parts(msg)]]
    return msg.get_content_type()


BASE = {"from": "a@b.test", "to": "c@d.test"}
IMAGE = {"filename": "logo.png", "content": base64.b64encode(PNG).decode(), "encoding": "base64", "cid": "logo@b.test"}
REPORT = {"filename": "report.pdf", "content": base64.b64encode(PDF).decode(), "encoding": "base64"}


def test_text_alone_is_one_utf8_text_part() -> None:
    msg, raw, _, _ = send({**BASE, "subject": "Hi", "text": "Grüße\nzweite Zeile"})
    assert shape(msg) == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content() == "Grüße\r\nzweite Zeile\r\n"  # CRLF, as on the wire
    assert raw.count(b"MIME-Version: 1.0") == 1
    assert (msg["From"], msg["To"], msg["Subject"]) == ("a@b.test", "c@d.test", "Hi")


def test_html_alone_is_one_html_part() -> None:
    msg, _, _, _ = send({**BASE, "html": "<p>Hello</p>"})
    assert shape(msg) == "text/html"
    assert msg.get_content() == "<p>Hello</p>\r\n"


def test_text_and_html_are_alternatives_plain_first() -> None:
    msg, raw, _, _ = send({**BASE, "text": "plain", "html": "<b>rich</b>"})
    assert shape(msg) == ["multipart/alternative", ["text/plain", "text/html"]]
    plain, html = parts(msg)
    assert (plain.get_content(), html.get_content()) == ("plain\r\n", "<b>rich</b>\r\n")
    assert raw.count(b"MIME-Version") == 1  # on the message, not on each part


def test_inline_images_go_next_to_the_html_with_their_content_id() -> None:
    msg, _, _, _ = send({**BASE, "text": "plain", "html": "<img src='cid:logo@b.test'>", "attachments": [IMAGE]})
    assert shape(msg) == [
        "multipart/alternative",
        ["text/plain", ["multipart/related", ["text/html", "image/png"]]],
    ]
    image = parts(parts(msg)[1])[1]
    assert image["Content-ID"] == "<logo@b.test>"
    assert image.get_content_disposition() == "inline"
    assert image.get_filename() == "logo.png"
    assert image.get_content() == PNG


def test_attachments_wrap_the_body_in_multipart_mixed_in_their_order() -> None:
    msg, _, _, _ = send(
        {
            **BASE,
            "text": "plain",
            "html": "<img src='cid:logo@b.test'>",
            "attachments": [REPORT, IMAGE, {"filename": "notes.txt", "content": "hällo"}],
        }
    )
    assert shape(msg) == [
        "multipart/mixed",
        [
            ["multipart/alternative", ["text/plain", ["multipart/related", ["text/html", "image/png"]]]],
            "application/pdf",  # guessed from the file name
            "text/plain",
        ],
    ]
    _, pdf, notes = parts(msg)
    assert (pdf.get_content_disposition(), pdf.get_filename(), pdf.get_content()) == ("attachment", "report.pdf", PDF)
    assert notes.get_content_charset() == "utf-8"  # text without an encoding is sent as UTF-8
    assert notes.get_content() == "hällo"


def test_an_image_with_a_cid_but_no_html_is_an_inline_attachment() -> None:
    msg, _, _, _ = send({**BASE, "text": "plain", "attachments": [IMAGE]})
    assert shape(msg) == ["multipart/mixed", ["text/plain", "image/png"]]
    image = parts(msg)[1]
    assert (image.get_content_disposition(), image["Content-ID"]) == ("inline", "<logo@b.test>")


@pytest.mark.parametrize(
    ("attachment", "content_type", "data"),
    [
        ({"content": "68656c6c6f", "encoding": "hex"}, "application/octet-stream", b"hello"),
        ({"content": "_-8=", "encoding": "base64url", "filename": "x.bin"}, "application/octet-stream", b"\xff\xef"),
        ({"content": "aGVs\n bG8=", "encoding": "base64", "filename": "a.gif"}, "image/gif", b"hello"),
        ({"content": "caf\u00e9", "encoding": "latin1", "contentType": "application/x-thing"}, None, b"caf\xe9"),
        ({"path": "data:image/png;base64,aGVsbG8="}, "image/png", b"hello"),
        ({"path": "data:,a%20b"}, "application/octet-stream", b"a b"),
        ({"content": "x", "filename": "a.pdf", "contentType": "text/csv; charset=latin-1"}, "text/csv", None),
    ],
)
def test_attachment_contents_and_their_types(attachment: dict, content_type: str | None, data: bytes | None) -> None:
    msg, _, _, _ = send({**BASE, "text": "t", "attachments": [attachment]})
    part = parts(msg)[1]
    assert part.get_content_type() == (content_type or attachment["contentType"])
    if data is not None:
        assert part.get_payload(decode=True) == data
    else:  # a given content type and its parameters win over the file name and the default charset
        assert part.get_content_charset() == "latin-1"


def test_headers_of_the_message() -> None:
    msg, raw, _, _ = send(
        {
            **BASE,
            "cc": "e@f.test",
            "bcc": "hidden@h.test",
            "replyTo": "Replies <r@b.test>",
            "sender": "list@b.test",
            "messageId": "abc@b.test",
            "inReplyTo": "<prev@b.test>",
            "references": "<one@b.test> two@b.test",
            "date": "Wed, 01 May 2024 14:00:00 +0200",
            "priority": "high",
            "headers": {"X-Campaign": "42", "X-Tag": ["a", "b"]},
        }
    )
    assert msg["Cc"] == "e@f.test"
    assert msg["Bcc"] is None and b"hidden@h.test" not in raw
    assert (msg["Reply-To"], msg["Sender"]) == ("Replies <r@b.test>", "list@b.test")
    assert (msg["Message-ID"], msg["In-Reply-To"]) == ("<abc@b.test>", "<prev@b.test>")
    assert msg["References"] == "<one@b.test> <two@b.test>"
    assert msg["Date"] == "Wed, 01 May 2024 14:00:00 +0200"
    assert (msg["X-Priority"], msg["X-MSMail-Priority"], msg["Importance"]) == ("1 (Highest)", "High", "High")
    assert msg["X-Campaign"] == "42"
    assert msg.get_all("X-Tag") == ["a", "b"]


def test_header_list_form_priorities_and_dates() -> None:
    msg, _, _, _ = send(
        {
            **BASE,
            "headers": [
                {"key": "X-A", "value": "1"},
                {"key": "X-A", "value": "2"},
                {"key": "Message-ID", "value": "<h@b>"},
            ],
            "priority": "low",
            "date": "2024-05-01T12:00:00",
        }
    )
    assert msg.get_all("X-A") == ["1", "2"]
    assert msg["Message-ID"] == "<h@b>"  # from "headers" when messageId is not given
    assert (msg["X-Priority"], msg["Importance"]) == ("5 (Lowest)", "Low")
    assert msg["Date"] == "Wed, 01 May 2024 12:00:00 +0000"  # ISO 8601 without a zone: UTC
    normal, _, _, _ = send({**BASE, "priority": "normal"})
    assert normal["X-Priority"] is None and normal["Importance"] is None


def test_non_ascii_names_and_subject_are_encoded_words_and_read_back() -> None:
    msg, raw, _, _ = send(
        {
            "from": {"name": "Jörg Müller", "address": "joerg@b.test"},
            "to": [{"name": "Ünï, Ltd.", "address": "u@d.test"}, "Ann Æ <ann@d.test>"],
            "subject": "Grüße " + "x" * 90,
            "text": "t",
        }
    )
    head = raw.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    assert b"=?utf-8?" in head
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Ünï, Ltd.", "u@d.test"),
        ("Ann Æ", "ann@d.test"),
    ]
    assert msg["Subject"] == "Grüße " + "x" * 90
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))  # folded


def test_the_envelope_is_taken_from_the_headers() -> None:
    _, _, mail_from, recipients = send(
        {
            "from": "Me <a@b.test>",
            "to": ["c@d.test", "C again <c@d.test>"],
            "cc": "e@f.test, c@d.test",
            "bcc": [{"name": "", "address": "g@h.test"}],
        }
    )
    assert mail_from == "a@b.test"
    assert recipients == ["c@d.test", "e@f.test", "g@h.test"]  # each once, in order: to, cc, bcc
    _, _, mail_from, _ = send({**BASE, "sender": "list@b.test"})
    assert mail_from == "list@b.test"


def test_an_envelope_overrides_the_headers() -> None:
    msg, _, mail_from, recipients = send(
        {**BASE, "envelope": {"from": "bounces@b.test", "to": "x@y.test", "bcc": ["z@y.test"]}}
    )
    assert (mail_from, recipients) == ("bounces@b.test", ["x@y.test", "z@y.test"])
    assert msg["To"] == "c@d.test"
    _, _, mail_from, recipients = send({**BASE, "envelope": {"from": ""}})
    assert (mail_from, recipients) == ("", ["c@d.test"])  # the null sender; recipients from the headers


def test_internationalised_addresses_reach_the_envelope_as_written() -> None:
    _, _, mail_from, recipients = send({"from": "Jöe <jöe@exämple.test>", "to": "ünï@exämple.test"})
    assert (mail_from, recipients) == ("jöe@exämple.test", ["ünï@exämple.test"])


def test_internationalised_addresses_are_written_as_utf8_in_the_header() -> None:
    """RFC 6532: an address that is not ASCII is written as UTF-8; encoded words are not
    allowed in an address (RFC 2047 section 5), so a receiving server could not read one."""
    _, raw, _, _ = send({"from": "Jöe <jöe@exämple.test>", "to": "ünï@exämple.test", "subject": "Grüße"})
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head
    assert "From: Jöe <jöe@exämple.test>".encode() in head
    assert "To: ünï@exämple.test".encode() in head
    read_back = message_from_string(raw.decode("utf-8"), policy=policy.default)
    assert isinstance(read_back, EmailMessage)
    assert read_back["To"].addresses[0].addr_spec == "ünï@exämple.test"


def test_ascii_addresses_keep_a_seven_bit_header() -> None:
    _, raw, _, _ = send({"from": "Jörg <joerg@b.test>", "to": "c@d.test", "subject": "Grüße"})
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # display name and subject as encoded words


def test_parse_addresses() -> None:
    assert parse_addresses(None, "to") == []
    assert parse_addresses('"Doe, John" <john@x.test>, jane@y.test', "to") == [
        ("Doe, John", "john@x.test"),
        ("", "jane@y.test"),
    ]
    assert parse_addresses([AddressObject(name="N", address=" n@x.test "), "m@y.test"], "cc") == [
        ("N", "n@x.test"),
        ("", "m@y.test"),
    ]
    with pytest.raises(ComposeError) as refused:
        parse_addresses(["ok@x.test", "@x.test"], "cc")
    assert refused.value.field == "cc"
    assert refused.value.reason == "'@x.test' is not a valid address: There must be something before the @-sign."


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"from": "a@b.test, x@y.test"}, "from", "exactly one sender address is needed"),
        ({"from": "@b.test"}, "from", "'@b.test' is not a valid address: There must be something before the @-sign."),
        ({"to": None}, "to", "at least one recipient in to, cc or bcc is needed"),
        ({"cc": ["ok@x.test", "also bad"]}, "cc", "'also' is not a valid address"),
        ({"envelope": {"from": "a@b.test, c@d.test"}}, "envelope.from", "exactly one address is needed"),
        ({"envelope": {"to": []}}, "envelope.to", "at least one recipient in to, cc or bcc is needed"),
        ({"headers": {"Subject": "x"}}, "headers", "Subject must be given as its own field"),
        ({"headers": {"bcc": "x@y.test"}}, "headers", "bcc must be given as its own field"),
        (
            {"headers": {"Content-Type": "text/plain"}},
            "headers",
            "Content-Type is set from the body and the attachments",
        ),
        ({"headers": {"Bad Name": "x"}}, "headers", "'Bad Name' is not a header name"),
        (
            {"messageId": "m@b", "headers": {"Message-ID": "<n@b>"}},
            "headers",
            "Message-ID is given as messageId already",
        ),
        ({"messageId": "two words@b"}, "messageId", "'two words@b' is not a message id"),
        ({"references": ["<a@b>", "<>"]}, "references", "'<>' is not a message id"),
        ({"date": "yesterday"}, "date", "'yesterday' is not a date (RFC 5322 or ISO 8601)"),
        ({"attachments": [{"path": "/etc/passwd"}]}, "attachments.0.path", "file paths are not read"),
        ({"attachments": [{"href": "https://x.test/a"}]}, "attachments.0.href", "URLs are not fetched"),
        ({"attachments": [{"filename": "x"}]}, "attachments.0.content", "the content is missing"),
        (
            {"attachments": [{"content": "!!", "encoding": "base64"}]},
            "attachments.0.content",
            "the content is not valid base64",
        ),
        (
            {"attachments": [{"content": "zz", "encoding": "hex"}]},
            "attachments.0.content",
            "the content is not valid hex",
        ),
        (
            {"attachments": [{"content": "é", "encoding": "ascii"}]},
            "attachments.0.content",
            "the content is not valid ascii",
        ),
        (
            {"attachments": [{"content": "x", "path": "data:,y"}]},
            "attachments.0.path",
            "give either content or a data: URI as path, not both",
        ),
        ({"attachments": [{"path": "data:text/plain"}]}, "attachments.0.path", "a data: URI needs a comma"),
        (
            {"attachments": [{"path": "data:;base64,!!"}]},
            "attachments.0.path",
            "the data: URI does not hold valid base64",
        ),
        (
            {"attachments": [{"content": "x", "contentType": "multipart/mixed"}]},
            "attachments.0.contentType",
            "an attachment cannot be multipart",
        ),
        (
            {"attachments": [{"content": "x", "contentType": "text"}]},
            "attachments.0.contentType",
            "'text' is not a content type",
        ),
        (
            {"attachments": [{"content": "x", "contentType": "text/plain; oops"}]},
            "attachments.0.contentType",
            "'oops' is not a parameter",
        ),
        ({"attachments": [{}, {"content": "x", "cid": "a b"}]}, "attachments.0.content", "the content is missing"),
        ({"attachments": [{"content": "x", "cid": "<>"}]}, "attachments.0.cid", "'<>' is not a content id"),
        ({"subject": "\ud800"}, "subject", "the value is not valid Unicode (it holds a lone surrogate)"),
    ],
)
def test_refusals_name_the_field_and_the_reason(change: dict, field: str, reason: str) -> None:
    refused_field, refused_reason = refusal({**BASE, **change})
    assert refused_field == field
    assert refused_reason.startswith(reason), refused_reason


def test_the_recipient_cap_counts_every_address_given() -> None:
    listed = [f"user{i}@x.test" for i in range(4)]
    _, _, _, recipients = send({**BASE, "to": listed}, max_recipients=4)
    assert recipients == listed
    assert refusal({**BASE, "to": [*listed, listed[0]]}, max_recipients=4) == (
        "to",
        "too many recipients: at most 4 per message",
    )  # a repeated address counts: the cap is on the work asked for
    assert refusal({**BASE, "to": listed[:2], "cc": "a@x.test, b@x.test", "bcc": "c@x.test"}, 4)[0] == "bcc"


def test_the_recipient_cap_counts_the_envelope_when_it_has_recipients() -> None:
    many = [f"user{i}@x.test" for i in range(5)]
    assert refusal({**BASE, "envelope": {"to": many}}, max_recipients=4) == (
        "envelope.to",
        "too many recipients: at most 4 per message",
    )
    _, _, _, recipients = send({**BASE, "to": many, "envelope": {"to": "one@x.test"}}, max_recipients=4)
    assert recipients == ["one@x.test"]  # header recipients past the cap are not delivered to: allowed


@pytest.mark.parametrize("value", ["ok@x.test, bad@", "bad@", "a@x.test bad@", "a@x.test, , b@y.test"])
def test_an_address_list_with_an_unreadable_entry_is_refused(value: str) -> None:
    field, reason = refusal({**BASE, "to": value})
    assert field == "to"
    assert reason == f"{value!r} cannot be read as a list of addresses"


def test_a_trailing_comma_is_no_address() -> None:
    _, _, _, recipients = send({**BASE, "to": "a@x.test, b@y.test, "})
    assert recipients == ["a@x.test", "b@y.test"]
