import subprocess
import sys
from pathlib import Path

import pytest

from zmta_bounce.classifier import Classifier, RulesError, load_all, load_rules
from zmta_common.replies import normalise


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_rules())


@pytest.mark.parametrize(
    ("code", "text", "action", "category"),
    [
        (
            550,
            "5.1.1 <x@y.test>: Recipient address rejected: User unknown in virtual mailbox table",
            "reject",
            "recipient_unknown",
        ),
        (451, "4.7.1 Greylisted, see http://postgrey.schweikert.ch/help/y.test.html", "defer", "greylisted"),
        (
            554,
            "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            "blacklist",
            "blacklisted",
        ),
        (452, "4.2.2 The email account that you tried to reach is over quota.", "defer", "mailbox_full"),
        (421, "4.7.0 Try again later, closing connection. (rate limit exceeded)", "defer", "rate_limited"),
        (
            550,
            "5.7.26 This mail has been blocked because the sender is unauthenticated. DMARC policy",
            "reject",
            "policy",
        ),
        (552, "5.3.4 Message size exceeds fixed limit", "reject", "too_large"),
        (450, "4.2.0 something odd", "defer", "other"),
        (554, "5.0.0 something odd", "reject", "other"),
        (0, "Connection refused", "defer", "network"),
    ],
)
def test_classification(classifier: Classifier, code: int, text: str, action: str, category: str) -> None:
    verdict = classifier.classify(code, text)
    assert (verdict.action, verdict.category) == (action, category)


def test_enhanced_status_decides_over_the_basic_code(classifier: Classifier) -> None:
    assert classifier.classify(550, "4.4.1 odd mix").action == "defer"
    assert classifier.classify(550, "4.4.1 odd mix").status == "4.4.1"


def test_multiline_replies_are_normalised() -> None:
    text = "5.7.0 This message was blocked because its content presents a potential\n552-5.7.0 security issue."
    assert normalise(552, text) == (
        "552 5.7.0 This message was blocked because its content presents a potential security issue."
    )


README_EXAMPLE = (
    "552-5.7.0 This message was blocked because its content presents a potential\n"
    "552-5.7.0 security issue. Please visit\n"
    "552-5.7.0 http://support.google.com/mail/bin/answer.py?answer=6590 to review our\n"
    "552 5.7.0 message content and attachment content guidelines. cp3si16622595oec.101 - gsmtp\n"
)


def test_check_bounce_prints_what_the_original_prints() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zmta_bounce.check"], input=README_EXAMPLE, capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [
        "data     : 552-5.7.0 This message was blocked because its content presents a potential",
        "           552-5.7.0 security issue. Please visit",
        "           552-5.7.0 http://support.google.com/mail/bin/answer.py?answer=6590 to review our",
        "           552 5.7.0 message content and attachment content guidelines. cp3si16622595oec.101 - gsmtp",
        "action   : reject",
        "message  : Message blocked as a security risk",
        "category : virus",
        "code     : 552",
        "status   : 5.7.0",
    ]


def test_bad_rules_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("- {pattern: '(', action: defer, category: x, message: y}\n")
    with pytest.raises(RulesError, match="rule 1: bad pattern"):
        load_rules(path)
    path.write_text("- {pattern: 'x', action: bounce, category: x, message: y}\n")
    with pytest.raises(RulesError, match="action 'bounce'"):
        load_rules(path)


def test_operator_rules_come_first_and_4xx_is_never_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "- {pattern: 'acme-quota', action: reject, category: acme, message: ACME quota}\n"
        "- {pattern: '^5\\d\\d .*user unknown', action: defer, category: mine, message: retry anyway}\n"
    )
    classifier = Classifier(load_all([path]))
    assert len(classifier.rules) == len(load_rules()) + 2
    assert classifier.classify(550, "5.1.1 user unknown").category == "mine"  # before the built-in rule
    permanent = classifier.classify(554, "5.7.1 acme-quota reached")
    assert (permanent.action, permanent.category) == ("reject", "acme")
    temporary = classifier.classify(452, "4.2.2 acme-quota reached")
    assert (temporary.action, temporary.category) == ("defer", "acme")  # the rule says reject, the code says retry


def test_check_bounce_takes_extra_rules_and_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("- {pattern: 'acme', action: blacklist, category: acme, message: ACME block}\n")
    command = [sys.executable, "-m", "zmta_bounce.check", "--rules", str(path)]
    result = subprocess.run(command, input="554 acme says no\n", capture_output=True, text=True, check=True)
    assert "action   : blacklist" in result.stdout
    assert "category : acme" in result.stdout
    missing = [sys.executable, "-m", "zmta_bounce.check", "--rules", str(tmp_path / "nope.yaml")]
    result = subprocess.run(missing, input="554 x\n", capture_output=True, text=True)
    assert result.returncode == 2
    assert "nope.yaml: cannot read the rules" in result.stderr


def test_a_refusal_of_mail_from_is_about_the_sender(classifier: Classifier) -> None:
    reply = "5.1.1 Domain does not exist: bogus.example"
    assert classifier.classify(550, reply, "rcpt").category == "recipient_unknown"
    at_mail = classifier.classify(550, reply, "mail")
    assert (at_mail.action, at_mail.category) == ("reject", "sender")
    listed = classifier.classify(554, "5.7.1 Client host [192.0.2.1] blocked using zen.spamhaus.org", "mail")
    assert listed.category == "blacklisted"  # what the stage cannot change
