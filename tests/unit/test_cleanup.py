"""The cleanup rules (zmta_common.cleanup) on real header blocks, envelopes and configs."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from zmta_common.cleanup import BodyFacts, Cleaned, clean, route_recipients
from zmta_common.config import Config, Queue, Zone
from zmta_common.headers import HeaderBlock
from zmta_common.intake import Envelope
from zmta_common.routing import UnknownZoneError

BODY = BodyFacts(size=42, hash_algo="sha256", body_hash="aGFzaA==", canonicalization="relaxed")


def make_config(max_future_date: float = 0.0) -> Config:
    return Config(
        hostname="mta.example",
        zones={"default": Zone(), "bounces": Zone(), "vip": Zone()},
        queue=Queue(max_future_date=max_future_date),
    )


def make_envelope(mail_from: str = "Sender@Origin.Example", allow_routing_headers: bool = False) -> Envelope:
    return Envelope(
        mail_from=mail_from,
        recipients=["a@one.test", "b@two.test"],
        interface="api",
        transtype="HTTP",
        origin="192.0.2.1",
        user="alice",
        allow_routing_headers=allow_routing_headers,
    )


def headers(*lines: str) -> HeaderBlock:
    return HeaderBlock.parse("".join(f"{line}\r\n" for line in lines).encode())


def run(block: HeaderBlock, config: Config | None = None, envelope: Envelope | None = None) -> Cleaned:
    return clean(config or make_config(), block, envelope or make_envelope(), "0123456789abcdef", BODY)


def test_message_id_and_date_added_at_the_bottom_in_that_order_when_missing() -> None:
    block = headers("From: s@origin.example", "Subject: hi")
    before = datetime.now(UTC).replace(microsecond=0)
    cleaned = run(block)
    assert [f.key for f in block.fields] == ["from", "subject", "message-id", "date"]
    assert re.fullmatch(r"<[0-9a-f-]{36}@origin\.example>", cleaned.message_id)
    assert block.get("message-id") == cleaned.message_id
    assert block.fields[2].raw == f"Message-ID: {cleaned.message_id}\r\n".encode()
    date = block.get("date") or ""
    assert date.endswith(" +0000")
    assert before <= parsedate_to_datetime(date) <= datetime.now(UTC)


def test_message_id_uses_the_hostname_without_a_sender() -> None:
    cleaned = run(headers("Subject: bounce"), envelope=make_envelope(mail_from=""))
    assert cleaned.message_id.endswith("@mta.example>")


def test_message_id_and_a_valid_date_are_kept_untouched() -> None:
    raw = b"Message-ID:   <given@x.example>\r\nDate: Tue, 1 Jul 2003 10:52:37 +0200\r\nSubject: s\r\n"
    block = HeaderBlock.parse(raw)
    cleaned = run(block)
    assert cleaned.message_id == "<given@x.example>"
    assert block.to_bytes() == raw


@pytest.mark.parametrize(
    "date",
    ["not a date", "", "Thu, 01 Jan 1970 00:00:00 +0000", "Wed, 31 Dec 1969 23:00:00 +0000"],
)
def test_a_missing_invalid_or_pre_1970_date_is_replaced_at_the_bottom(date: str) -> None:
    block = headers(f"Date: {date}", "Subject: s", "Date: Tue, 1 Jul 2003 10:52:37 +0200")
    run(block)
    assert [f.key for f in block.fields] == ["subject", "message-id", "date"]
    assert block.get("date") != date
    assert parsedate_to_datetime(block.get("date") or "").year >= 2024


def test_bcc_and_x_sending_zone_are_removed_but_bcc_is_in_the_parsed_envelope() -> None:
    block = headers(
        "From: Sender <s@origin.example>",
        "BCC: hidden@three.test",
        "To: a@one.test, B <b@two.test>",
        "x-sending-zone: vip",
        "Bcc: other@four.test",
        "X-Sending-Zone: vip",
    )
    cleaned = run(block)
    assert [f.key for f in block.fields] == ["from", "to", "message-id", "date"]
    assert cleaned.meta["parsedEnvelope"] == {
        "from": "s@origin.example",
        "to": ["a@one.test", "b@two.test"],
        "cc": [],
        "bcc": ["hidden@three.test", "other@four.test"],
        "replyTo": False,
        "sender": False,
    }


def test_meta_is_the_original_envelope_object() -> None:
    envelope = make_envelope()
    envelope.extra = {"spam": {"score": 1}}
    block = headers("Date: Tue, 1 Jul 2003 10:52:37 +0200", "Message-ID: <m@x>")
    before = int(datetime.now(UTC).timestamp() * 1000)
    meta = run(block, envelope=envelope).meta
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert list(meta) == [
        "id",
        "interface",
        "from",
        "to",
        "origin",
        "originhost",
        "transhost",
        "transtype",
        "user",
        "time",
        "dkim",
        "messageId",
        "date",
        "parsedEnvelope",
        "bodySize",
        "created",
        "spam",
    ]
    assert meta["id"] == "0123456789abcdef"
    assert (meta["interface"], meta["from"], meta["to"]) == ("api", "Sender@Origin.Example", envelope.recipients)
    assert meta["to"] is not envelope.recipients
    assert (meta["origin"], meta["transtype"], meta["user"]) == ("192.0.2.1", "HTTP", "alice")
    assert meta["dkim"] == {"hashAlgo": "sha256", "bodyHash": "aGFzaA==", "bodyCanon": "relaxed"}
    assert (meta["messageId"], meta["date"]) == ("<m@x>", "Tue, 1 Jul 2003 10:52:37 +0200")
    assert meta["bodySize"] == 42
    for key in ("time", "created"):
        stamp = meta[key]
        assert isinstance(stamp, int) and before <= stamp <= after
    assert meta["spam"] == {"score": 1}


def not_before(date: datetime | str, max_future_date: float = 3600) -> datetime | None:
    value = date if isinstance(date, str) else format_datetime(date)
    return run(headers(f"Date: {value}"), config=make_config(max_future_date)).not_before


def test_a_future_date_sets_not_before() -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=30)
    assert not_before(when) == when


def test_not_before_is_capped_at_max_future_date() -> None:
    start = datetime.now(UTC)
    held = not_before(start + timedelta(days=3))
    assert held is not None
    assert start + timedelta(hours=1) <= held <= datetime.now(UTC) + timedelta(hours=1)


@pytest.mark.parametrize("ahead", [timedelta(minutes=4), timedelta(hours=-1)])
def test_a_date_at_most_5_minutes_ahead_or_past_sends_at_once(ahead: timedelta) -> None:
    assert not_before(datetime.now(UTC) + ahead) is None


def test_future_dates_are_ignored_when_delayed_delivery_is_off() -> None:
    assert not_before(datetime.now(UTC) + timedelta(hours=2), max_future_date=0) is None


def test_an_invalid_date_is_replaced_and_holds_nothing() -> None:
    assert not_before("someday") is None


@pytest.mark.parametrize(("allowed", "zones"), [(True, ["vip", "vip"]), (False, ["default", "default"])])
def test_x_sending_zone_is_honoured_only_where_the_interface_allows_it(allowed: bool, zones: list[str]) -> None:
    envelope = make_envelope(allow_routing_headers=allowed)
    assert route_recipients(make_config(), headers("X-Sending-Zone: VIP"), envelope) == zones


def test_an_unknown_zone_named_where_allowed_is_an_error() -> None:
    with pytest.raises(UnknownZoneError, match="nosuch"):
        route_recipients(make_config(), headers("X-Sending-Zone: nosuch"), make_envelope(allow_routing_headers=True))
    # Where routing headers are not allowed the header is not even looked at.
    assert route_recipients(make_config(), headers("X-Sending-Zone: nosuch"), make_envelope()) == ["default"] * 2
