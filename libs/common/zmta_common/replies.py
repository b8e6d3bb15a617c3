"""SMTP replies as the rules read them: the bounce classifier's and traffic shaping's.

Both match regular expressions against one normalised line, and both come as YAML lists
of rules in files, so the normalisation and the reading of a rules file are one rule each,
here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# An enhanced status code (RFC 3463): class, subject, detail.
STATUS = re.compile(r"\b([245])\.\d{1,3}\.\d{1,3}\b")


def normalise(code: int, text: str) -> str:
    """One line: ``<code> <text>``, without the reply-code and repeated status prefixes of
    continuation lines, and with runs of whitespace collapsed."""
    lines = text.strip().splitlines() or [""]
    first = re.sub(r"^\d{3}[ -]", "", lines[0])
    status = STATUS.match(first)
    rest = []
    for line in lines[1:]:
        line = re.sub(r"^\d{3}[ -]", "", line)
        if status and line.startswith(status.group(0)):
            line = line[len(status.group(0)) :]
        rest.append(line)
    joined = " ".join([first, *rest])
    joined = " ".join(joined.split())
    return f"{code} {joined}" if code else joined


class RulesError(ValueError):
    """A rules file that cannot be read, or a rule in it that is wrong (the message says where)."""


def rule_entries(path: Path) -> list[Any]:
    """The entries of a rules file (a YAML list), for the caller to check one by one."""
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"{path}: cannot read the rules: {exc}") from None
    if not isinstance(entries, list):
        raise RulesError(f"{path}: must be a YAML list of rules")
    return entries
