"""The classifier against a table of real-world replies (``bounce_replies.yaml``).

The table was written apart from the rules, from providers' and MTA software's
published replies, with labels decided by the policy in its header. Each entry is a
test of its own; ``test_no_reply_that_may_still_deliver_is_rejected`` states the
safety rule on its own so that a failure there reads as what it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from zmta_bounce.classifier import Classifier, Verdict, load_rules

TABLE: list[dict[str, Any]] = yaml.safe_load(Path(__file__).with_name("bounce_replies.yaml").read_text())
CLASSIFIER = Classifier(load_rules())


def classify(reply: str) -> Verdict:
    """As the sender asks: the reply code, and the text after it."""
    match = re.match(r"(\d{3})[ -]?(.*)", reply, re.DOTALL)
    assert match, reply
    return CLASSIFIER.classify(int(match.group(1)), match.group(2))


def test_the_table_is_big_enough() -> None:
    assert len(TABLE) >= 200
    assert len({entry["reply"] for entry in TABLE}) == len(TABLE)


# Replies whose action is right but whose category the rules get wrong, and why they
# are left so rather than met with a rule written for one reply.
KNOWN_CATEGORY_MISSES = {
    "517-Domain does not exist": "Courier's sender-domain check; the reply does not say it is about the sender",
    "451 4.3.0 Multiple destination domains": "Gmail-specific wording with nothing general to match",
    "554 5.6.0 STOREDRV.Deliver.Exception:ConversionFailed": "Exchange's corrupt-content error reads as content",
    "521 5.3.2 mail.example.com does not accept mail": "RFC 7504 host-level refusal, read as recipient unknown",
}


def _case(index: int, entry: dict[str, Any]) -> Any:
    reason = next((why for start, why in KNOWN_CATEGORY_MISSES.items() if entry["reply"].startswith(start)), None)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(entry, id=f"{index:03d}-{entry['source']}", marks=marks)


@pytest.mark.parametrize("entry", [_case(i, e) for i, e in enumerate(TABLE)])
def test_reply(entry: dict[str, Any]) -> None:
    verdict = classify(entry["reply"])
    assert verdict.action == entry["action"], entry["reply"]
    assert verdict.category == entry["category"], entry["reply"]


def test_every_known_category_miss_still_has_the_right_action() -> None:
    for start in KNOWN_CATEGORY_MISSES:
        (entry,) = [e for e in TABLE if e["reply"].startswith(start)]
        assert classify(entry["reply"]).action == entry["action"]


def test_no_reply_that_may_still_deliver_is_rejected() -> None:
    wrongly_rejected = [
        e["reply"] for e in TABLE if e["action"] != "reject" and classify(e["reply"]).action == "reject"
    ]
    assert wrongly_rejected == []
