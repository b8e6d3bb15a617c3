"""zmta_sender.mta_sts: the TXT record, the policy file (RFC 8461 §3), MX matching (§4.1), apply()."""

from __future__ import annotations

import pytest

from zmta_common.config import ConfigError, Zone, load_config
from zmta_sender.errors import DeliveryError
from zmta_sender.mta_sts import PolicyError, StsPolicy, apply, mx_matches, parse_policy, record_id
from zmta_sender.mx import Target
from zmta_sender.tls import OPPORTUNISTIC, REQUIRED, TlsContexts, TlsPolicy

GOOD = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    "mx: backupmx.example.com\r\nmax_age: 604800\r\n"
)


def test_valid_policy_is_parsed() -> None:
    policy = parse_policy(GOOD, "20160831085700Z")
    assert policy == StsPolicy(
        mode="enforce",
        max_age=604800,
        mx=("mail.example.com", "*.example.net", "backupmx.example.com"),
        id="20160831085700Z",
    )


def test_lf_line_ends_unknown_keys_and_order_are_accepted() -> None:
    text = "mx: MX1.Example.COM.\nmax_age: 86400\nfuture_key: whatever\nmode: testing\nversion: STSv1\n\n"
    policy = parse_policy(text)
    assert (policy.mode, policy.max_age, policy.mx) == ("testing", 86400, ("mx1.example.com",))


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


def test_max_age_is_capped_at_the_rfc_limit() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n").max_age == 31557600


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "without mx"),
        ("version: STSv1\nmode: enforce\nmx: mail.*.example\nmax_age: 86400\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 86400\n", "mx"),
        ("<html>not a policy</html>\n", "key: value"),
        ("", "version"),
    ],
)
def test_invalid_policies_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("mail.example.com", "mx.example.com", False),
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard stands for one label ...
        ("*.example.com", "foo.mail.example.com", False),  # ... and only one
        ("*.example.com", "mail.example.com.evil", False),
        ("*.example.com", "mailexample.com", False),
        ("*.mail.protection.outlook.com", "x-y.mail.protection.outlook.com", True),
    ],
)
def test_mx_patterns_match_per_rfc_8461_section_4_1(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["something else", "v=STSv1; id=1"], "1"),  # records not starting with v=STSv1; are discarded
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # more than one: no policy
        (["v=STSv1; id=bad-id!"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv1;"], None),
        (["v=spf1 -all"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert record_id(records) == expected


def test_policy_survives_its_json_round_trip() -> None:
    policy = parse_policy(GOOD, "x1")
    assert StsPolicy.from_json(policy.to_json()) == policy


@pytest.fixture(scope="module")
def contexts() -> TlsContexts:
    return TlsContexts(None)


TARGETS = [Target("mx1.a.example", "192.0.2.1", 25), Target("other.example", "192.0.2.2", 25)]


def test_enforce_keeps_the_matching_mx_and_requires_verified_tls(contexts: TlsContexts) -> None:
    policy = StsPolicy("enforce", 86400, ("*.a.example",), "1")
    tls, targets = apply(policy, "a.example", TlsPolicy(OPPORTUNISTIC, contexts), TARGETS)
    assert targets == TARGETS[:1]
    assert (tls.mode, tls.source) == (REQUIRED, "MTA-STS policy of a.example")


def test_enforce_without_a_matching_mx_defers_with_the_reason(contexts: TlsContexts) -> None:
    policy = StsPolicy("enforce", 86400, ("mail.b.example",), "1")
    with pytest.raises(DeliveryError) as caught:
        apply(policy, "a.example", TlsPolicy(OPPORTUNISTIC, contexts), TARGETS)
    assert str(caught.value) == (
        "MTA-STS policy of a.example (enforce) allows none of its MX hosts: mx1.a.example, other.example"
    )
    assert (caught.value.category, caught.value.permanent) == ("tls", False)


@pytest.mark.parametrize("mode", ["testing", "none"])
def test_testing_and_none_change_nothing(contexts: TlsContexts, mode: str) -> None:
    base = TlsPolicy(OPPORTUNISTIC, contexts)
    policy = StsPolicy(mode, 86400, ("mail.b.example",), "1")
    assert apply(policy, "a.example", base, TARGETS) == (base, TARGETS)
    assert apply(None, "a.example", base, TARGETS) == (base, TARGETS)


def test_zone_tls_mode_comes_from_the_domain_then_star_then_the_zone() -> None:
    zone = Zone.model_validate(
        {
            "tls": "required",
            "domains": {"a.test": {"tls": "none"}, "b.test": {"connections": 2}, "*": {"tls": "opportunistic"}},
        }
    )
    assert zone.tls_mode("a.test") == "none"
    assert zone.tls_mode("b.test") == "opportunistic"  # its entry says nothing: the "*" entry's
    assert Zone(tls="required").tls_mode("c.test") == "required"
    assert Zone().tls_mode("c.test") == "opportunistic"


def test_an_unknown_tls_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"zones\.default\.tls"):
        load_config(None, zones={"default": {"tls": "sometimes"}})
