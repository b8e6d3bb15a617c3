"""Which IP version a delivery uses: the targets the sender keeps for the zone's
``ignore_ipv6`` (MxResolver.targets) and for its local address (delivery.same_family)."""

from __future__ import annotations

import pytest

from zmta_common import local_address
from zmta_common.config import PoolAddress
from zmta_common.mx import DnsFailure, Hosts, MxLookup
from zmta_sender.delivery import same_family
from zmta_sender.errors import DeliveryError
from zmta_sender.mx import MAX_ADDRESSES, MxResolver, Target

V4 = PoolAddress(name="v4.example", address="192.0.2.1")
V4B = PoolAddress(name="v4b.example", address="192.0.2.2")
V6 = PoolAddress(name="v6.example", address="2001:db8::1")
V6B = PoolAddress(name="v6b.example", address="2001:db8::2")

MIXED = [
    Target("mx1.a.test", "2001:db8:a::1", 25),
    Target("mx1.a.test", "198.51.100.1", 25),
    Target("mx2.a.test", "2001:db8:a::2", 25),
    Target("mx2.a.test", "198.51.100.2", 25),
]
ONLY_V4 = [t for t in MIXED if ":" not in t.ip]
ONLY_V6 = [t for t in MIXED if ":" in t.ip]
KEY = "18f2a3b4c5d.001"


def test_without_a_local_address_every_target_is_kept_in_order() -> None:
    assert same_family(None, MIXED, [V4, V6], KEY, "a.test") == (None, MIXED)


@pytest.mark.parametrize(("local", "expected"), [(V4, ONLY_V4), (V6, ONLY_V6)])
def test_the_local_address_keeps_the_targets_of_its_version(local: PoolAddress, expected: list[Target]) -> None:
    assert same_family(local, MIXED, [V4, V4B, V6, V6B], KEY, "a.test") == (local, expected)


def test_a_domain_with_only_the_other_version_gets_an_address_of_that_version() -> None:
    pool = [V4, V4B, V6, V6B]
    local, targets = same_family(V4, ONLY_V6, pool, KEY, "a.test")
    assert targets == ONLY_V6
    assert local in (V6, V6B)
    assert local == local_address.choose([V6, V6B], KEY, ipv6=True)  # stable for the delivery: its retries too
    chosen = [same_family(V4, ONLY_V6, pool, f"18f2a3b4c5d.{n:03x}", "a.test")[0] for n in range(1, 40)]
    assert {a.name for a in chosen if a is not None} == {V6.name, V6B.name}  # spread, not always the first
    local, targets = same_family(V6, ONLY_V4, pool, KEY, "a.test")
    assert local in (V4, V4B)
    assert targets == ONLY_V4


@pytest.mark.parametrize(
    ("local", "targets", "pool", "version"),
    [
        (V4, ONLY_V6, [V4, V4B], "IPv6"),
        (V6, ONLY_V4, [V6, V6B], "IPv4"),
        (V4, ONLY_V6, [V4, PoolAddress(name="off.example", address="2001:db8::9", ratio=0)], "IPv6"),
    ],
)
def test_no_address_of_the_targets_version_is_a_network_deferral(
    local: PoolAddress, targets: list[Target], pool: list[PoolAddress], version: str
) -> None:
    with pytest.raises(DeliveryError) as failed:
        same_family(local, targets, pool, KEY, "a.test")
    assert str(failed.value) == f"the mail servers of a.test have only {version} addresses"
    assert (failed.value.category, failed.value.permanent) == ("network", False)


class FixedHosts(MxLookup):
    """An MX lookup that answers from a table."""

    def __init__(self, hosts: Hosts | DnsFailure) -> None:
        self.answer = hosts

    async def hosts(self, domain: str) -> Hosts:
        if isinstance(self.answer, DnsFailure):
            raise self.answer
        return self.answer


HOSTS: Hosts = [
    ("mx1.a.test", ["198.51.100.1", "2001:db8:a::1"]),
    ("mx2.a.test", ["2001:db8:a::2"]),
    ("mx3.a.test", ["198.51.100.3", "198.51.100.4"]),
]


async def test_ignore_ipv6_drops_aaaa_addresses_and_keeps_the_mx_order() -> None:
    resolver = MxResolver(FixedHosts(HOSTS))
    assert await resolver.targets("a.test", 2525, ipv6=False) == [
        Target("mx1.a.test", "198.51.100.1", 2525),
        Target("mx3.a.test", "198.51.100.3", 2525),
        Target("mx3.a.test", "198.51.100.4", 2525),
    ]
    assert [(t.host, t.ip) for t in await resolver.targets("a.test", 25, ipv6=True)] == [
        ("mx1.a.test", "198.51.100.1"),
        ("mx1.a.test", "2001:db8:a::1"),
        ("mx2.a.test", "2001:db8:a::2"),
        ("mx3.a.test", "198.51.100.3"),
        ("mx3.a.test", "198.51.100.4"),
    ]


async def test_at_most_twenty_addresses_are_tried_the_best_first() -> None:
    many: Hosts = [(f"mx{n}.a.test", [f"198.51.100.{n}", f"203.0.113.{n}"]) for n in range(1, 16)]
    targets = await MxResolver(FixedHosts(many)).targets("a.test", 25, ipv6=False)
    assert len(targets) == MAX_ADDRESSES == 20
    assert targets[0] == Target("mx1.a.test", "198.51.100.1", 25)
    assert targets[-1] == Target("mx10.a.test", "203.0.113.10", 25)


async def test_an_ipv6_only_domain_is_a_dns_deferral_when_ipv6_is_ignored() -> None:
    resolver = MxResolver(FixedHosts([("mx.v6.test", ["2001:db8::25"])]))
    with pytest.raises(DeliveryError) as failed:
        await resolver.targets("v6.test", 25, ipv6=False)
    assert str(failed.value) == "no usable address for the mail servers of v6.test"
    assert (failed.value.category, failed.value.permanent) == ("dns", False)
    assert await resolver.targets("v6.test", 25, ipv6=True) == [Target("mx.v6.test", "2001:db8::25", 25)]


@pytest.mark.parametrize("permanent", [True, False])
async def test_a_dns_failure_keeps_its_message_and_whether_it_is_permanent(permanent: bool) -> None:
    resolver = MxResolver(FixedHosts(DnsFailure("domain x.test does not exist", permanent=permanent)))
    with pytest.raises(DeliveryError) as failed:
        await resolver.targets("x.test", 25, ipv6=True)
    assert str(failed.value) == "domain x.test does not exist"
    assert (failed.value.category, failed.value.permanent) == ("dns", permanent)
