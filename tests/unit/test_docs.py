"""The documentation says what the code does: the generated files are current, every config
key has a description, and every relative link of the Markdown files leads to a file (and
to a heading there, where it names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zmta_common import events
from zmta_devtools import config_doc, docs
from zmta_devtools.markdown import slug

ROOT = Path(__file__).resolve().parents[2]
LINKED = ["README.md", "CONTRIBUTING.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# [text](target) outside code; a target with a scheme (https:, mailto:) is not in the repository.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


@pytest.mark.parametrize("name", sorted(docs.generated()))
def test_generated_file_is_current(name: str) -> None:
    path = ROOT / name
    on_disk = path.read_text(encoding="utf-8") if path.is_file() else None
    if on_disk != docs.generated()[name]():
        pytest.fail(f"{name} is stale: run `python -m zmta_devtools.docs` and commit the result", pytrace=False)


def test_every_config_key_is_described() -> None:
    assert config_doc.undescribed() == [], "give these keys a Field(description=...) in zmta_common/config.py"


def test_architecture_names_every_subject_and_stream() -> None:
    zone_subjects = (events.queued_subject, events.ready_subject, events.work_subject, events.reported_subject)
    subjects = [f("<zone>") for f in (*zone_subjects, events.bounced_subject, events.delayed_subject)]
    names = [*subjects, events.CLASSIFY_SUBJECT, events.NOTIFY_SUBJECT, *events.STREAMS]
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert [name for name in names if f"`{name}`" not in text] == [], "docs/architecture.md, Events"


def _without_fences(text: str) -> str:
    """The Markdown text without its fenced code blocks."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)


def links(text: str) -> list[tuple[str, str]]:
    """(file, anchor) of each relative link in the Markdown ``text``; file "" for this one."""
    prose = re.sub(r"(`+).+?\1", "", _without_fences(text))  # brackets in code are no links
    targets = [match.group(1) for match in LINK.finditer(prose)]
    return [(file, anchor) for file, _, anchor in (t.partition("#") for t in targets if not SCHEME.match(t))]


def anchors(text: str) -> set[str]:
    """The anchors of the headings of ``text``; a repeated one gets -1, -2... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _without_fences(text).splitlines():
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#").strip())
            repeat = counts.get(base, 0)
            found.add(f"{base}-{repeat}" if repeat else base)
            counts[base] = repeat + 1
    return found


def test_links_are_found() -> None:
    text = "see [a](docs/a.md#x), [b](https://example.com), [c](#here), `[d](no.md)`\n```\n[e](no.md)\n```\n"
    assert links(text) == [("docs/a.md", "x"), ("", "here")]
    assert anchors("# A b\n## `c.<d>`\n```\n# no\n```\n## A b\n") == {"a-b", "cd", "a-b-1"}


@pytest.mark.parametrize("name", LINKED)
def test_relative_links_lead_to_files(name: str) -> None:
    source = ROOT / name
    assert source.is_file(), f"{name} is missing"
    files = {f for f, _ in links(source.read_text(encoding="utf-8")) if f}
    broken = sorted(f for f in files if not (source.parent / f).exists())
    assert broken == [], f"{name} links to files that do not exist: {', '.join(broken)}"


@pytest.mark.parametrize("name", LINKED)
def test_anchors_lead_to_headings(name: str) -> None:
    source = ROOT / name
    broken = []
    for file, anchor in links(source.read_text(encoding="utf-8")):
        target = (source.parent / file) if file else source
        checked = anchor and target.suffix == ".md" and target.is_file()
        if checked and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{file}#{anchor}")
    assert broken == [], f"{name} links to headings that do not exist: {', '.join(broken)}"
