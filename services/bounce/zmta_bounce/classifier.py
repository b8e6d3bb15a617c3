"""Turns an SMTP reply into an action (defer, reject, blacklist) and a category.

Rules come from YAML data files: the operator's (``bounce.rules_files``) first, then
the built-in ``rules.yaml`` beside this module; ordered, first match wins. With no
match the class of the reply decides (4xx defer, 5xx reject, category "other").

Whatever a rule says, a 4xx reply is never rejected: the server said the failure is
temporary, so the delivery is retried (and bounces only when its retries or its
maximum age run out). Mail that can still be delivered must not be bounced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zmta_common.replies import STATUS, normalise, rule_entries
from zmta_common.replies import RulesError as RulesError  # raised here, the name callers catch

DEFAULT_RULES = Path(__file__).with_name("rules.yaml")
ACTIONS = ("defer", "reject", "blacklist")


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    action: str
    category: str
    message: str


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    category: str
    message: str
    code: int
    status: str


def load_rules(path: Path = DEFAULT_RULES) -> list[Rule]:
    rules = []
    for index, entry in enumerate(rule_entries(path), 1):
        where = f"{path}: rule {index}"
        if not isinstance(entry, dict) or set(entry) != {"pattern", "action", "category", "message"}:
            raise RulesError(f"{where}: needs exactly pattern, action, category, message")
        if entry["action"] not in ACTIONS:
            raise RulesError(f"{where}: action {entry['action']!r} is not one of {', '.join(ACTIONS)}")
        try:
            pattern = re.compile(str(entry["pattern"]), re.IGNORECASE)
        except re.error as exc:
            raise RulesError(f"{where}: bad pattern: {exc}") from None
        rules.append(Rule(pattern, entry["action"], str(entry["category"]), str(entry["message"])))
    return rules


def load_all(extra: Sequence[str | Path] = ()) -> list[Rule]:
    """The operator's rule files in order, then the built-in rules."""
    rules: list[Rule] = []
    for path in [*extra, DEFAULT_RULES]:
        rules.extend(load_rules(Path(path)))
    return rules


class Classifier:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def classify(self, code: int, text: str, stage: str = "") -> Verdict:
        """``stage`` is where the server refused (connect, mail, rcpt, data), when known."""
        verdict = self._classify(code, text)
        if stage == "mail" and verdict.category in ("recipient_unknown", "other"):
            # A refusal of MAIL FROM cannot be about the recipient: it is about the sender
            # (and must never get the recipient suppressed).
            return Verdict(verdict.action, "sender", verdict.message, verdict.code, verdict.status)
        return verdict

    def _classify(self, code: int, text: str) -> Verdict:
        line = normalise(code, text)
        status_match = STATUS.search(line[:100])
        status = status_match.group(0) if status_match else ""
        if code == 0:
            return Verdict("defer", "network", "Connection or DNS problem", code, status)
        # Temporary when either the reply code or the enhanced status says so (RFC 3463
        # wants them to agree; when they do not, retrying is the safe reading).
        temporary = str(code)[:1] == "4" or status[:1] == "4"
        for rule in self.rules:
            if rule.pattern.search(line):
                action = "defer" if rule.action == "reject" and temporary else rule.action
                return Verdict(action, rule.category, rule.message, code, status)
        if temporary:
            return Verdict("defer", "other", "Temporary failure", code, status)
        return Verdict("reject", "other", "Permanent failure", code, status)
