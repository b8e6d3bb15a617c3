"""Traffic shaping rules as data: the file format's checks, which shipped rule answers which
provider signal, and how a throttle lowers a site's limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zmta_common.config import Limit
from zmta_common.limits import _throttled
from zmta_common.replies import normalise
from zmta_common.shaping import InForce, Override, RulesError, ShapingRule, load_all, load_rules, scope_key

SHIPPED = load_all()


def first_rule(reply: str, category: str = "other") -> str | None:
    code, _, text = reply.partition(" ")
    line = normalise(int(code), text)
    return next((r.name for r in SHIPPED if r.matches(line, category)), None)


@pytest.mark.parametrize(
    ("reply", "category", "rule"),
    [
        (
            "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating"
            " from your IP address. To protect our users from spam, mail sent from your IP address has been"
            " temporarily rate limited. gsmtp",
            "blacklisted",
            "google-ip-unsolicited-rate",
        ),
        (
            "550 5.7.28 There is an unusual rate of unsolicited mail originating from your IP",
            "blacklisted",
            "google-ip-unsolicited-rate",
        ),
        (
            "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional"
            " messages from being delivered. a1si123 - gsmtp",
            "rate_limited",
            "google-rate",
        ),
        (
            "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
            "capacity",
            "microsoft-throttle",
        ),
        (
            "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation."
            " For e-mail delivery information, see https://postmaster.live.com (S3150)",
            "blacklisted",
            "microsoft-throttle",
        ),
        (
            "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
            "rate_limited",
            "yahoo-deferred",
        ),
        (
            "421 4.7.1 [TS01] Messages from 192.0.2.1 temporarily deferred due to user complaints",
            "blacklisted",
            "yahoo-deferred",
        ),
        (
            "554 5.7.9 [TS03] All messages from 192.0.2.1 will be permanently deferred",
            "blacklisted",
            "yahoo-ip-deferred",
        ),
        (
            "421 4.7.0 Too many concurrent SMTP connections from this IP address; please try again later",
            "rate_limited",
            "too-many-connections",
        ),
        ("450 4.7.1 Error: too many connections from 192.0.2.1", "rate_limited", "too-many-connections"),
        ("452 4.5.3 Too many messages, slow down", "rate_limited", "rate-limited"),
        ("0 connection to mx.a.test[192.0.2.9] refused", "network", "site-unreachable"),
        # Look-alikes that are not shaping's business: one mailbox, greylisting, a listing.
        ("452 4.2.2 Mailbox full", "mailbox_full", None),
        ("451 4.7.1 Greylisted, please try again later", "greylisted", None),
        ("550 5.1.1 The email account that you tried to reach does not exist. gsmtp", "recipient_unknown", None),
        ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "blacklisted", None),
    ],
)
def test_the_shipped_rules_answer_provider_signals(reply: str, category: str, rule: str | None) -> None:
    assert first_rule(reply, category) == rule


def test_the_first_matching_rule_wins_and_operator_files_come_first(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("- {name: mine, match: 'too many connections', action: suspend, duration: 60}\n")
    rules = load_all([mine])
    line = normalise(421, "4.7.0 Too many connections")
    assert next(r.name for r in rules if r.matches(line, "rate_limited")) == "mine"
    assert [r.name for r in rules[1:]] == [r.name for r in SHIPPED]


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("{name: x, action: suspend, duration: 60}", "needs `match`, `category` or both"),
        ("{name: x, match: a, action: throttle, scope: zone, connections: 50%, duration: 60}", "scope must be `site`"),
        ("{name: x, match: a, action: throttle, duration: 60}", "needs `connections`, `rate` or both"),
        ("{name: x, match: a, action: suspend, connections: 2, duration: 60}", "takes no `connections`"),
        ("{name: x, match: a, action: throttle, connections: 150%, duration: 60}", "connections: Value error"),
        ("{name: x, match: a, action: throttle, rate: fast, duration: 60}", "rate: Value error"),
        ("{name: x, match: '(', action: suspend, duration: 60}", "match: Value error"),
        ("{name: x, match: a, action: slow, duration: 60}", "action: Input should be 'suspend' or 'throttle'"),
        ("{name: x, match: a, action: suspend, duration: 60, scoep: site}", "scoep: Extra inputs are not permitted"),
        ("{name: x, match: a, action: suspend}", "duration: Field required"),
    ],
)
def test_a_bad_rule_is_refused_with_its_place_and_reason(tmp_path: Path, entry: str, error: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(f"- {{name: fine, match: b, action: suspend, duration: 1}}\n- {entry}\n")
    with pytest.raises(RulesError, match=r"rules\.yaml: rule 2: .*" + re.escape(error)):
        load_rules(path)


def test_a_rules_file_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("name: x\n")
    with pytest.raises(RulesError, match="must be a YAML list"):
        load_rules(path)


def override(scope: str = "site", action: str = "suspend", **kwargs: object) -> Override:
    fields: dict = {"zone": "z", "scope": scope, "site": "mx.a.test", "address": "", "rule": "r", "action": action}
    fields |= {"connections": None, "rate": None, "started": 0.0, "expires": 1e12, "response": "421"} | kwargs
    return Override(**fields)


def test_a_throttle_only_ever_lowers_a_sites_limits() -> None:
    configured = Limit(connections=20, rate="600/min")
    assert _throttled(configured, None) is configured
    lowered = _throttled(configured, override(action="throttle", connections=10, rate="300/min"))
    assert (lowered.connections, lowered.rate) == (10, "300/min")
    # A throttle above the configured values changes nothing; one with no rate keeps the configured one.
    same = _throttled(configured, override(action="throttle", connections=50, rate="20/sec"))
    assert (same.connections, same.rate) == (20, "600/min")
    unlimited = _throttled(Limit(), override(action="throttle", connections=3))
    assert (unlimited.connections, unlimited.rate) == (3, None)


def test_in_force_tells_what_is_held_where() -> None:
    held = InForce(
        [
            override("site", "suspend", site="mx.a.test"),
            override("site_address", "suspend", site="mx.b.test", address="192.0.2.1"),
            override("site", "throttle", site="mx.c.test", connections=2),
        ]
    )
    assert held.zone is None
    assert held.site("mx.a.test") is not None and held.site("mx.a.test").action == "suspend"  # type: ignore[union-attr]
    assert held.site("mx.b.test") is None and held.site(None) is None
    assert held.suspended_addresses("mx.b.test") == {"192.0.2.1"}
    assert held.suspended_addresses("mx.a.test") == set()
    assert InForce([override("zone", site="")]).zone is not None
    assert scope_key("site_address", "mx.b.test", "192.0.2.1") == "site:mx.b.test|192.0.2.1"


def test_the_rule_model_takes_a_single_category_as_a_list() -> None:
    rule = ShapingRule.model_validate({"name": "x", "category": "rate_limited", "action": "suspend", "duration": 1})
    assert rule.category == ["rate_limited"] and rule.matches("anything", "rate_limited")
    assert not rule.matches("anything", "greylisted")
