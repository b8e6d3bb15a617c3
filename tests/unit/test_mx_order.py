"""Where mail for a domain goes (zmta_common.mx.MxLookup), from DNS answers given by a table:
MX hosts by preference, each with its A then AAAA addresses, else the domain's own
addresses; null MX and unknown domains are permanent failures, timeouts temporary."""

from __future__ import annotations

from collections.abc import Iterator

import dns.exception
import dns.rdata
import dns.resolver
import dns.rrset
import pytest

from zmta_common.config import Dns
from zmta_common.mx import CACHE_TTL_CAP, DnsFailure, Hosts, MxLookup

Records = dict[tuple[str, str], list[str] | type[Exception]]


class Answer:
    """What the resolver answers: the records, and the set's TTL."""

    def __init__(self, name: str, rdtype: str, texts: list[str], ttl: int) -> None:
        self.rrset = dns.rrset.from_text(name, ttl, "IN", rdtype, *texts)

    def __iter__(self) -> Iterator[dns.rdata.Rdata]:
        return iter(self.rrset)


def lookup(records: Records, monkeypatch: pytest.MonkeyPatch, ttl: int = 300) -> tuple[MxLookup, list[tuple[str, str]]]:
    """An MxLookup (no cache) whose resolver answers from ``records``; names missing from it
    have no records of that type. Also the questions it was asked."""
    mx = MxLookup(Dns(nameservers=["192.0.2.53"]))
    asked: list[tuple[str, str]] = []

    async def resolve(name: str, rdtype: str) -> Answer:
        asked.append((name, rdtype))
        found = records.get((name, rdtype))
        if isinstance(found, type):
            raise found()
        if found is None:
            raise dns.resolver.NoAnswer
        return Answer(name + ".", rdtype, found, ttl)

    monkeypatch.setattr(mx.resolver, "resolve", resolve)
    return mx, asked


async def test_mx_hosts_in_preference_order_each_with_a_then_aaaa(monkeypatch: pytest.MonkeyPatch) -> None:
    records: Records = {
        ("a.test", "MX"): ["30 mx3.a.test.", "10 mx1.a.test.", "20 mx2.a.test."],
        ("mx1.a.test", "A"): ["198.51.100.1"],
        ("mx1.a.test", "AAAA"): ["2001:db8::1"],
        ("mx2.a.test", "AAAA"): ["2001:db8::2"],
        ("mx3.a.test", "A"): ["198.51.100.3", "198.51.100.4"],
    }
    mx, _ = lookup(records, monkeypatch)
    assert await mx.hosts("a.test") == [
        ("mx1.a.test", ["198.51.100.1", "2001:db8::1"]),
        ("mx2.a.test", ["2001:db8::2"]),
        ("mx3.a.test", ["198.51.100.3", "198.51.100.4"]),
    ]


async def test_an_mx_host_without_addresses_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    records: Records = {
        ("a.test", "MX"): ["10 gone.a.test.", "20 mx.a.test."],
        ("gone.a.test", "A"): dns.resolver.NXDOMAIN,
        ("mx.a.test", "A"): ["198.51.100.2"],
    }
    mx, _ = lookup(records, monkeypatch)
    assert await mx.hosts("a.test") == [("mx.a.test", ["198.51.100.2"])]


async def test_without_mx_the_domains_own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    records: Records = {("a-only.test", "A"): ["198.51.100.7"], ("a-only.test", "AAAA"): ["2001:db8::7"]}
    mx, asked = lookup(records, monkeypatch)
    assert await mx.hosts("A-Only.TEST.") == [("a-only.test", ["198.51.100.7", "2001:db8::7"])]
    assert asked == [("a-only.test", "MX"), ("a-only.test", "A"), ("a-only.test", "AAAA")]  # the canonical name


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({("x.test", "MX"): dns.resolver.NXDOMAIN}, "domain x.test does not exist"),
        ({("x.test", "MX"): ["0 ."]}, "x.test accepts no mail (null MX)"),
        ({}, "no MX or address records for x.test"),
    ],
)
async def test_domains_that_cannot_receive_mail_fail_for_good(
    records: Records, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx, _ = lookup(records, monkeypatch)
    with pytest.raises(DnsFailure) as failed:
        await mx.hosts("x.test")
    assert (str(failed.value), failed.value.permanent) == (message, True)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({("x.test", "MX"): dns.exception.Timeout}, "DNS lookup of x.test failed"),
        ({("x.test", "MX"): ["10 mx.x.test."], ("mx.x.test", "A"): dns.exception.Timeout}, "DNS lookup of mx.x.test"),
        ({("x.test", "MX"): dns.resolver.NoNameservers}, "DNS lookup of x.test failed"),
    ],
)
async def test_lookups_that_fail_on_the_way_are_temporary(
    records: Records, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx, _ = lookup(records, monkeypatch)
    with pytest.raises(DnsFailure) as failed:
        await mx.hosts("x.test")
    assert str(failed.value).startswith(message)
    assert failed.value.permanent is False


async def test_the_answer_is_kept_for_its_shortest_ttl_at_most_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    records: Records = {("a.test", "MX"): ["10 mx.a.test."], ("mx.a.test", "A"): ["198.51.100.1"]}
    mx, _ = lookup(records, monkeypatch, ttl=60)
    hosts, ttl = await mx._lookup("a.test")
    assert (hosts, ttl) == ([("mx.a.test", ["198.51.100.1"])], 60)
    mx, _ = lookup(records, monkeypatch, ttl=86400)
    expected: Hosts = [("mx.a.test", ["198.51.100.1"])]
    assert await mx._lookup("a.test") == (expected, CACHE_TTL_CAP)
