import pytest

from zmta_common.config import Config, Zone
from zmta_common.domains import domain_of
from zmta_common.headers import HeaderBlock
from zmta_common.routing import UnknownZoneError, route


def make_config() -> Config:
    return Config(
        zones={
            "default": Zone(),
            "bounces": Zone(),
            "vip": Zone(routing_headers={"X-User-ID": "123"}),
            "brand": Zone(sender_domains=["Brand.example"]),
            "gmail": Zone(recipient_domains=["gmail.test"]),
        }
    )


def headers(text: str) -> HeaderBlock:
    return HeaderBlock.parse(text.replace("\n", "\r\n").encode())


def test_zone_header_wins_where_allowed() -> None:
    h = headers("X-Sending-Zone: VIP\nX-User-ID: 999\n")
    assert route(make_config(), h, "a@brand.example", ["x@gmail.test"], allow_header=True) == ["vip"]


def test_zone_header_ignored_where_not_allowed() -> None:
    h = headers("X-Sending-Zone: vip\n")
    assert route(make_config(), h, "a@other.example", ["x@other.test"], allow_header=False) == ["default"]


def test_unknown_zone_named_is_an_error() -> None:
    with pytest.raises(UnknownZoneError, match="nosuch"):
        route(make_config(), headers("X-Sending-Zone: nosuch\n"), "", ["x@y.test"], allow_header=True)


def test_routing_header_before_sender_domain() -> None:
    h = headers("X-User-ID: 123\n")
    assert route(make_config(), h, "a@brand.example", ["x@gmail.test"], allow_header=False) == ["vip"]


def test_bottom_most_routing_header_decides() -> None:
    h = headers("X-User-ID: 123\nX-User-ID: 7\n")
    assert route(make_config(), h, "a@z.example", ["x@q.test"], allow_header=False) == ["default"]


def test_sender_domain_before_recipient_domain() -> None:
    assert route(make_config(), headers(""), "a@BRAND.example", ["x@gmail.test"], allow_header=False) == ["brand"]


def test_recipient_domain_fans_out_per_recipient() -> None:
    zones = route(make_config(), headers(""), "a@z.example", ["x@gmail.test", "y@other.test"], allow_header=False)
    assert zones == ["gmail", "default"]


def test_domain_of_literal_and_case() -> None:
    assert domain_of("User@Example.COM") == "example.com"
    assert domain_of("u@[127.0.0.1]") == "127.0.0.1"
