"""A zone's policy for one recipient domain (Zone.domain_policy) and the rates it is written in.

The field-by-field merge of an entry, "*" and the default is in test_config.py; this file
adds what the merge means for each field, the spellings of the keys, and parse_rate.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zmta_common.config import DEFAULT_DOMAIN_CONNECTIONS, DomainPolicy, Limit, Zone, parse_rate
from zmta_common.domains import canonical_domain, domain_of
from zmta_common.sites import site_name

RATE_ERROR = "must be N/unit with unit sec, min, hour or day, as 100/min"


def test_a_zone_without_entries_gives_every_domain_the_default_and_nothing_else() -> None:
    zone = Zone(tls="required")
    policy = zone.domain_policy("any.test")
    assert policy == DomainPolicy(connections=DEFAULT_DOMAIN_CONNECTIONS)
    assert (policy.rate, policy.tls, policy.http_url, policy.disabled_addresses) == (None, None, None, [])
    assert zone.tls_mode("any.test") == "required"  # no domain tls: the zone's


def test_a_star_entry_alone_sets_the_default_for_every_domain() -> None:
    zone = Zone.model_validate({"domains": {"*": {"connections": 2, "rate": "10/sec", "tls": "none"}}})
    for domain in ("a.test", "b.test", "xn--exmple-cua.test"):
        assert zone.domain_policy(domain) == DomainPolicy(connections=2, rate="10/sec", tls="none")
    assert zone.tls_mode("a.test") == "none"


def test_an_entry_replaces_the_star_lists_and_may_lift_its_rate() -> None:
    zone = Zone.model_validate(
        {
            "domains": {
                "*": {"rate": "100/min", "disabled_addresses": ["192.0.2.9"]},
                "own.test": {"disabled_addresses": ["192.0.2.1", "192.0.2.2"]},
                "none.test": {"disabled_addresses": []},
                "free.test": {"rate": None},  # explicitly no rate, whatever "*" says
                "fast.test": {"rate": "5000/hour"},
            }
        }
    )
    assert zone.domain_policy("own.test").disabled_addresses == ["192.0.2.1", "192.0.2.2"]  # not merged with "*"
    assert zone.domain_policy("none.test").disabled_addresses == []
    assert zone.domain_policy("other.test").disabled_addresses == ["192.0.2.9"]
    assert zone.domain_policy("own.test").rate == "100/min"  # not set by the entry: "*"'s
    assert zone.domain_policy("free.test").rate is None
    assert zone.domain_policy("free.test").disabled_addresses == ["192.0.2.9"]
    assert zone.domain_policy("fast.test").rate == "5000/hour"


def test_http_url_belongs_to_its_domain_only() -> None:
    zone = Zone.model_validate({"domains": {"tickets.test": {"http_url": "https://helpdesk.test/in"}}})
    assert zone.domain_policy("tickets.test").http_url == "https://helpdesk.test/in"
    assert zone.domain_policy("tickets.test").connections == DEFAULT_DOMAIN_CONNECTIONS
    assert zone.domain_policy("other.test").http_url is None


def test_a_policy_for_one_domain_leaves_the_other_zones_alone() -> None:
    limited = Zone.model_validate({"domains": {"a.test": {"connections": 1}}})
    assert limited.domain_policy("a.test").connections == 1
    assert Zone().domain_policy("a.test").connections == DEFAULT_DOMAIN_CONNECTIONS


@pytest.mark.parametrize(
    ("written", "looked_up"),
    [
        ("Big.Test", "big.test"),
        (" big.test. ", "BIG.test."),
        ("Exämple.TEST.", "exämple.test"),
        ("XN--EXMPLE-CUA.TEST", "EXÄMPLE.test"),
        ("[192.0.2.50]", "[192.0.2.50]"),
        ("[IPv6:2001:db8::1]", "[ipv6:2001:DB8::1]"),
    ],
)
def test_entries_are_found_in_any_spelling_of_their_domain(written: str, looked_up: str) -> None:
    zone = Zone.model_validate({"domains": {"*": {"connections": 3}, written: {"connections": 1}}})
    assert zone.domain_policy(canonical_domain(looked_up)).connections == 1
    assert zone.domain_policy(domain_of(f"Someone@{looked_up}")).connections == 1
    assert zone.domain_policy("unrelated.test").connections == 3


def test_keys_are_stored_in_the_canonical_form() -> None:
    zone = Zone.model_validate({"domains": {"*": {}, "Exämple.TEST.": {}, "[192.0.2.50]": {}}})
    assert list(zone.domains) == ["*", "xn--exmple-cua.test", "192.0.2.50"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("100/min", (100, 60.0)),
        ("10000/hour", (10000, 3600.0)),
        ("1/day", (1, 86400.0)),
        ("30/sec", (30, 1.0)),
        (" 5 / SEC ", (5, 1.0)),
        ("1 message/day", (1, 86400.0)),
        ("2 messages / h", (2, 3600.0)),
        ("3/m", (3, 60.0)),
        ("7/d", (7, 86400.0)),
        ("4/s", (4, 1.0)),
        ("4/second", (4, 1.0)),
        ("4/minute", (4, 60.0)),
    ],
)
def test_rates(text: str, parsed: tuple[int, float]) -> None:
    assert parse_rate(text) == parsed


@pytest.mark.parametrize(
    "text", ["", "100", "/min", "0/min", "-1/min", "1.5/min", "100/week", "min/100", "100 per min", "100/min/2"]
)
def test_bad_rates_are_refused_with_the_form_they_should_have(text: str) -> None:
    with pytest.raises(ValueError, match=RATE_ERROR):
        parse_rate(text)


def test_a_bad_rate_in_the_config_names_where_it_is() -> None:
    with pytest.raises(ValidationError) as refused:
        Zone.model_validate({"domains": {"a.test": {"rate": "5/week"}}})
    assert "domains.`a.test`.rate" in str(refused.value)
    assert RATE_ERROR in str(refused.value)
    with pytest.raises(ValidationError, match=r"throttling\n.*" + RATE_ERROR):
        Zone(throttling="0/min")
    with pytest.raises(ValidationError, match=RATE_ERROR):
        Limit(rate="lots")


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"http_url\n.*'ftp://x' is not an http\(s\) URL"):
        DomainPolicy.model_validate({"http_url": "ftp://x"})
    with pytest.raises(ValidationError, match="connections"):
        DomainPolicy(connections=0)
    with pytest.raises(ValidationError, match="tls"):
        DomainPolicy.model_validate({"tls": "sometimes"})
    with pytest.raises(ValidationError, match="conections"):
        Zone.model_validate({"domains": {"a.test": {"conections": 1}}})


def test_mx_host_groups_match_whatever_the_case_and_the_first_pattern_wins() -> None:
    zone = Zone.model_validate(
        {"mx_hosts": {"*.Mail.Protection.Outlook.com": {"connections": 20}, "*.outlook.com": {"connections": 1}}}
    )
    assert zone.mx_group("A-b.MAIL.protection.outlook.com.") == "*.mail.protection.outlook.com"
    assert zone.mx_group("smtp.outlook.com") == "*.outlook.com"
    assert zone.mx_group("outlook.com") is None
    assert zone.mx_group("mx.example.test") is None


def test_a_site_is_its_set_of_mx_hosts_in_one_spelling() -> None:
    google = ["aspmx.l.google.com", "ALT1.aspmx.l.google.com.", "alt2.aspmx.l.google.com"]
    assert site_name(google) == "alt1.aspmx.l.google.com,alt2.aspmx.l.google.com,aspmx.l.google.com"
    assert site_name(reversed(google)) == site_name(google)  # preference order does not matter
    assert site_name(["mx.a.test", "mx.a.test."]) == "mx.a.test"
    many = [f"mx{n}.very-long-provider-name.test" for n in range(20)]
    short = site_name(many)
    assert len(short) <= 200 and short.startswith("mx0.very-long-provider-name.test,+19:")
    assert site_name(many[:19]) != short


def test_a_site_takes_its_pattern_limits_else_the_zone_sites() -> None:
    zone = Zone.model_validate(
        {"sites": {"connections": 7, "rate": "100/min"}, "mx_hosts": {"*.outlook.test": {"connections": 2}}}
    )
    outlook = zone.site_of(["a-test.mail.outlook.test", "backup.example.test"])
    assert outlook == "*.outlook.test" and zone.site_limit(outlook).connections == 2
    # Only the best host decides the pattern; otherwise the set is the site.
    other = zone.site_of(["backup.example.test", "a-test.mail.outlook.test"])
    assert other == "a-test.mail.outlook.test,backup.example.test"
    assert (zone.site_limit(other).connections, zone.site_limit(other).rate) == (7, "100/min")
    assert Zone().site_limit("mx.a.test").connections == 20  # Postfix's default destination concurrency
