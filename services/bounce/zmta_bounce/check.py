"""``check-bounce``: classify an SMTP reply read from stdin, as the original's utility does.

$ echo "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown" | check-bounce
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from .classifier import Classifier, RulesError, load_all

cli = typer.Typer(add_completion=False)


def describe(data: str, classifier: Classifier) -> str:
    """The original's report: data, action, message, category, code and status."""
    data = data.strip("\r\n")
    match = re.match(r"\s*(\d{3})[ -]?(.*)", data, re.DOTALL)
    code = int(match.group(1)) if match else 0
    verdict = classifier.classify(code, match.group(2) if match else data)
    lines = data.splitlines() or [""]
    out = [f"data     : {lines[0]}", *(f"           {line}" for line in lines[1:])]
    out += [
        f"action   : {verdict.action}",
        f"message  : {verdict.message}",
        f"category : {verdict.category}",
        f"code     : {verdict.code or ''}",
        f"status   : {verdict.status}",
    ]
    return "\n".join(out)


@cli.command()
def main(
    rules: Annotated[
        list[Path] | None, typer.Option(help="extra rules file (YAML), checked before the built-in rules")
    ] = None,
) -> None:
    """Read an SMTP reply on stdin and print how ZoneMTA-py classifies it."""
    try:
        classifier = Classifier(load_all(rules or []))
    except RulesError as exc:
        print(f"check-bounce: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(describe(sys.stdin.read(), classifier))


if __name__ == "__main__":
    cli()
