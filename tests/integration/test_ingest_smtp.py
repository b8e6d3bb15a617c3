"""The SMTP ingest against a real client socket: strictness, limits, pipelining, storing."""

from __future__ import annotations

import re

import pytest

from tests.smtpwire import SmtpWire
from tests.support import Deployment, DeploymentFactory

OVERRIDES = {
    "smtp_interfaces": {
        "feeder": {"max_recipients": 3, "max_size": 65536},
    },
}


@pytest.fixture(scope="module")
async def ingest(module_deploy: DeploymentFactory) -> Deployment:
    # No senders: what ingest stores stays in the store for the test to look at.
    return await module_deploy(OVERRIDES, senders={})


def session(d: Deployment) -> SmtpWire:
    wire = SmtpWire(d.smtp_port)
    assert wire.greeting[0] == 220
    code, text = wire.command("EHLO client.test")
    assert code == 250, text
    return wire


def queued_id(reply: tuple[int, str]) -> str:
    assert reply[0] == 250, reply
    match = re.search(r"queued as ([0-9a-f]+)", reply[1])
    assert match, reply
    return match.group(1)


async def body_of(d: Deployment, message_id: str) -> bytes:
    return b"".join([chunk async for chunk in d.store.iter_body(message_id)])


async def test_ehlo_advertises_what_we_do(ingest: Deployment) -> None:
    with SmtpWire(ingest.smtp_port) as wire:
        code, text = wire.command("EHLO client.test")
    assert code == 250
    for extension in ("PIPELINING", "SIZE 65536", "8BITMIME", "SMTPUTF8"):
        assert extension in text.splitlines(), text


async def test_pipelined_transaction(ingest: Deployment) -> None:
    with session(ingest) as wire:
        wire.send(b"MAIL FROM:<s@origin.test>\r\nRCPT TO:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
        assert [wire.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        # After the end of data a client may pipeline the next transaction too.
        wire.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<s@origin.test>\r\nRCPT TO:<c@a.test>\r\nDATA\r\n")
        first = queued_id(wire.reply())
        assert [wire.reply()[0] for _ in range(3)] == [250, 250, 354]
        second = queued_id(wire.command(b"Subject: two\r\n\r\nsecond\r\n."))
    rows = await ingest.store.deliveries_of(first)
    assert [(r.seq, r.recipient) for r in rows] == [("001", "a@a.test"), ("002", "b@b.test")]
    assert await body_of(ingest, second) == b"second\r\n"


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:s@origin.test", 501),  # no angle brackets
        ("MAIL FROM: s@origin.test", 501),
        ("MAIL FROM:<s@origin.test> junk", 555),
        ("MAIL FROM:<s\x00x@origin.test>", 501),  # NUL byte
        ("MAIL FROM:<not an address>", 553),
        ("MAIL FROM:<s@origin.test> SIZE=99999999", 552),  # over the interface's max_size
    ],
)
async def test_bad_mail_from_is_refused(ingest: Deployment, command: str, code: int) -> None:
    with session(ingest) as wire:
        reply = wire.command(command)
        assert reply[0] == code, reply
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250  # the session goes on


async def test_null_sender_is_accepted(ingest: Deployment) -> None:
    with session(ingest) as wire:
        assert wire.command("MAIL FROM:<>")[0] == 250
        assert wire.command("RCPT TO:<a@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        message_id = queued_id(wire.command(b"Subject: bounce\r\n\r\nbounced\r\n."))
    message = await ingest.store.get_message(message_id)
    assert message is not None
    assert message.mail_from == ""


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("RCPT TO:a@a.test", 501),
        ("RCPT TO:<a\x00@a.test>", 501),
        ("RCPT TO:<@@a.test>", 553),
        ("RCPT TO:<>", 501),
        ("RCPT TO:<a@a.test> NOTIFY=NEVER", 555),
    ],
)
async def test_bad_rcpt_to_is_refused(ingest: Deployment, command: str, code: int) -> None:
    with session(ingest) as wire:
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        reply = wire.command(command)
        assert reply[0] == code, reply


async def test_rcpt_before_mail_and_data_before_rcpt(ingest: Deployment) -> None:
    with session(ingest) as wire:
        assert wire.command("RCPT TO:<a@a.test>")[0] == 503
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command("DATA")[0] == 503


async def test_recipients_are_capped(ingest: Deployment) -> None:
    with session(ingest) as wire:
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        for n in range(3):
            assert wire.command(f"RCPT TO:<r{n}@a.test>")[0] == 250
        code, text = wire.command("RCPT TO:<r3@a.test>")
        assert code == 452, text
        assert "Too many recipients" in text
        assert wire.command("DATA")[0] == 354
        message_id = queued_id(wire.command(b"Subject: capped\r\n\r\nx\r\n."))
    assert len(await ingest.store.deliveries_of(message_id)) == 3


async def test_oversized_message_gets_552_and_nothing_is_stored(ingest: Deployment) -> None:
    before = await ingest.store.row_counts()
    with session(ingest) as wire:
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command("RCPT TO:<a@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        wire.send(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 1000)  # 100 kB > 64 KiB
        code, text = wire.command(b".")
        assert code == 552, text
        assert wire.command("NOOP")[0] == 250
    assert await ingest.store.row_counts() == before


async def test_overlong_line_is_refused(ingest: Deployment) -> None:
    with session(ingest) as wire:
        wire.command("MAIL FROM:<s@origin.test>")
        wire.command("RCPT TO:<a@a.test>")
        assert wire.command("DATA")[0] == 354
        wire.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")
        code, text = wire.command(b".")
        assert code == 500, text
        assert "Line too long" in text
        # The dot added for transparency does not count (RFC 5321 4.5.3.1.6): 998 octets pass.
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        wire.command("RCPT TO:<a@a.test>")
        assert wire.command("DATA")[0] == 354
        wire.send(b"Subject: longest\r\n\r\n" + b"." + b"." * 998 + b"\r\n")
        code, text = wire.command(b".")
        assert code == 250, text


async def test_bare_line_ends_cannot_smuggle_a_second_message(ingest: Deployment) -> None:
    smuggled = (
        b"Subject: smuggle\r\n\r\n"
        b"before\n.\nMAIL FROM:<evil@origin.test>\nRCPT TO:<victim@a.test>\nDATA\nevil\n.\n"
        b"more\r\n.\nafter\n.\r\ntail\r\n"
    )
    before = await ingest.store.row_counts()
    with session(ingest) as wire:
        wire.command("MAIL FROM:<s@origin.test>")
        wire.command("RCPT TO:<a@a.test>")
        assert wire.command("DATA")[0] == 354
        wire.send(smuggled)
        message_id = queued_id(wire.command(b"."))
        assert wire.command("QUIT")[0] == 221
    assert (await ingest.store.row_counts())["messages"] == before["messages"] + 1
    body = await body_of(ingest, message_id)
    # Every bare line end became CRLF; the would-be terminators are plain body lines. (The
    # ".<LF>after" line began after a real CRLF, so its first dot was a stuffed one.)
    assert body == (
        b"before\r\n.\r\nMAIL FROM:<evil@origin.test>\r\nRCPT TO:<victim@a.test>\r\nDATA\r\nevil\r\n.\r\n"
        b"more\r\n\r\nafter\r\n.\r\ntail\r\n"
    )
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"\r" not in body.replace(b"\r\n", b"")


async def test_dots_are_unstuffed_and_headers_kept(ingest: Deployment) -> None:
    with session(ingest) as wire:
        wire.command("MAIL FROM:<s@origin.test>")
        wire.command("RCPT TO:<a@a.test>")
        wire.command("DATA")
        message_id = queued_id(wire.command(b"Subject: dots\r\nX-Sending-Zone: bounces\r\n\r\n..one\r\n...two\r\n."))
    assert await body_of(ingest, message_id) == b".one\r\n..two\r\n"
    message = await ingest.store.get_message(message_id)
    assert message is not None
    assert b"X-Sending-Zone" not in message.headers  # internal routing header removed
    rows = await ingest.store.deliveries_of(message_id)
    assert rows[0].zone == "default"  # the feeder does not honour routing headers


async def test_routing_header_on_an_interface_that_allows_it(deploy: DeploymentFactory) -> None:
    d = await deploy({"smtp_interfaces": {"feeder": {"allow_routing_headers": True}}}, senders={})
    with session(d) as wire:
        wire.command("MAIL FROM:<s@origin.test>")
        wire.command("RCPT TO:<a@a.test>")
        wire.command("DATA")
        message_id = queued_id(wire.command(b"X-Sending-Zone: bounces\r\nSubject: z\r\n\r\nx\r\n."))
        wire.command("MAIL FROM:<s@origin.test>")
        wire.command("RCPT TO:<a@a.test>")
        wire.command("DATA")
        code, text = wire.command(b"X-Sending-Zone: atlantis\r\n\r\nx\r\n.")
    assert (await d.store.deliveries_of(message_id))[0].zone == "bounces"
    assert code == 550
    assert "atlantis" in text
