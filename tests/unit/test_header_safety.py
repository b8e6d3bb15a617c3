"""Nothing a client sends reaches a header we write with a line break or a control character."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from zmta_api.compose import ComposeError, compose
from zmta_api.models import SendRequest
from zmta_common.headers import HeaderBlock, header_safe, unsafe_character, without_bare_line_ends
from zmta_ingest.smtp_server import helo_error
from zmta_sender.outgoing import received_header


def line_breakers() -> list[str]:
    """Every character that Python's str.splitlines, or a receiver, may take for a line end,
    and every other control character but TAB."""
    chars = []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char == "\t":
            continue
        if len(f"a{char}b".splitlines()) > 1 or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            chars.append(char)
    return chars


BREAKERS = line_breakers()


def test_every_line_breaker_is_unsafe_and_made_safe() -> None:
    assert {"\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028", "\u2029"} <= set(BREAKERS)
    for char in BREAKERS:
        assert unsafe_character(f"ok{char}ok") == char, repr(char)
        assert header_safe(f"ok{char}ok") == "ok?ok"
    assert unsafe_character("plain text, with\ttab and ünïcödé") is None
    assert header_safe("x" * 300) == "x" * 255


def test_header_block_never_writes_a_bare_line_end() -> None:
    block = HeaderBlock()
    block.add("X-Evil", "yes\rX-Injected: 1\n.\r\nnot-a-fold")
    block.set("X-Other", "a\u2028b")
    block.add("X-Folded", "first\r\n second")  # a real fold stays
    raw = block.to_bytes()
    assert raw.count(b"\r\n") == 4, raw  # three fields, one of them folded
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    assert b"\r\nX-Injected" not in raw
    with pytest.raises(ValueError, match="not a header field name"):
        block.add("Bad Name", "x")


def test_received_header_from_a_poisoned_meta_has_no_bare_line_end() -> None:
    meta = {"transhost": "probe.example\rX-Injected: yes\r.\r", "originhost": "[127.0.0.1]\n", "transtype": "ESMTP"}
    header = received_header(meta, "abc.001", "rcpt@a.test", "mta.test", "zmta")
    assert header.count(b"\r") == header.count(b"\n") == header.count(b"\r\n") == 3
    assert b"from probe.example?X-Injected: yes?.? ([127.0.0.1]?)" in header


def test_without_bare_line_ends() -> None:
    assert without_bare_line_ends(b"A: 1\r\nB: 2\r\n") == b"A: 1\r\nB: 2\r\n"
    assert without_bare_line_ends(b"A: 1\rB: 2\nC: 3\r\n\r\r\n") == b"A: 1 B: 2 C: 3\r\n \r\n"


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("client.example", False),
        ("[192.0.2.1]", False),
        ("[IPv6:2001:db8::1]", False),
        ("xn--bcher-kva.example", False),
        ("bücher.example", False),
        ("probe.example\rX-Injected: yes", True),
        ("probe.example\r.\r", True),
        ("probe.example\nX: y", True),
        ("two words", True),
        ("tab\there", True),
        ("a\u2028b", True),
        ("a\x85b", True),
        ("x" * 256, True),
    ],
)
def test_helo_names(name: str, refused: bool) -> None:
    reply = helo_error(name)
    assert (reply is not None) == refused, reply
    if reply is not None:
        assert reply.startswith("501 ")


@pytest.mark.parametrize("char", BREAKERS[:40] + BREAKERS[-6:])
def test_send_refuses_a_line_breaker_in_any_header_text_with_a_400(char: str) -> None:
    for field in ("subject", "inReplyTo"):
        request = SendRequest.model_validate({"from": "a@b.test", "to": "c@d.test", field: f"one{char}two"})
        with pytest.raises(ComposeError) as refused:
            compose(request)
        assert refused.value.field == field
    named = SendRequest.model_validate({"from": {"name": f"A{char}B", "address": "a@b.test"}, "to": "c@d.test"})
    with pytest.raises(ComposeError):
        compose(named)


def test_send_counts_recipients_before_working_on_them() -> None:
    many = ", ".join(f"user{i}@example.test" for i in range(1001))
    with pytest.raises(ComposeError, match="at most 1000") as refused:
        compose(SendRequest.model_validate({"from": "a@b.test", "to": "c@d.test", "bcc": many}))
    assert refused.value.field == "bcc"
    listed = [f"user{i}@example.test" for i in range(600)]
    with pytest.raises(ComposeError, match="at most 1000"):
        compose(SendRequest.model_validate({"from": "a@b.test", "to": listed, "cc": listed}))
    raw, _, recipients = compose(SendRequest.model_validate({"from": "a@b.test", "to": listed}), 600)
    assert len(recipients) == 600
    assert raw.startswith(b"From: a@b.test\r\n")
