"""Markdown helpers of the generated documents: table cells and heading anchors."""

from __future__ import annotations

import re

# A code span (`...`), which is shown as it is written, or the text between two of them.
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def cell(text: str) -> str:
    """``text`` as one table cell: on one line, its ``|`` no column break (one escaped
    already stays so), and outside code spans its ``<`` and ``>`` shown, not taken for HTML."""
    one_line = " ".join(text.split())
    escaped = one_line.replace("\\|", "\0").replace("|", "\\|").replace("\0", "\\|")
    parts = []
    last = 0
    for span in _CODE_SPAN.finditer(escaped):
        parts += [_entities(escaped[last : span.start()]), span.group(0)]
        last = span.end()
    return "".join([*parts, _entities(escaped[last:])])


def _entities(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")
