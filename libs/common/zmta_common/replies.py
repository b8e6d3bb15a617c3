"""SMTP replies as the rules read them: the bounce classifier's and traffic shaping's.

Both match regular expressions against one normalised line, so the normalisation is one
rule, here.
"""

from __future__ import annotations

import re

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
