"""What the commands print: plain tables for people, the API's JSON for scripts, and times
in UTC, as the API gives them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from .errors import InvalidInput

Row = Sequence[object]


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def say(text: str = "") -> None:
    typer.echo(text)


def table(headers: Sequence[str] | None, rows: Sequence[Row], indent: str = "") -> None:
    """Columns padded to their widest cell, under ``headers`` (None: without a header line);
    the last one is not padded (it may be long)."""
    cells = [[_cell(value) for value in row] for row in ([headers] if headers else []) + list(rows)]
    if not cells:
        return
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        typer.echo(indent + "  ".join([*padded, row[-1]]).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def parse_time(value: object) -> datetime | None:
    """A time as the API writes it: ISO 8601 (``...Z``) or ms since the epoch."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC) if value else None
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def clock(value: object) -> str:
    """A time from the API as ``2026-05-04 10:00:00`` (UTC); ``-`` when there is none."""
    moment = parse_time(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def age(value: object, now: datetime) -> str:
    moment = parse_time(value)
    return duration((now - moment).total_seconds()) if moment else "-"


def due(value: object, now: datetime) -> str:
    """When the next attempt is: ``now`` once its time has come, else ``in 4m59s``."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    left = (moment - now).total_seconds()
    return "now" if left <= 0 else f"in {duration(left)}"


_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def time_argument(value: str, option: str, now: datetime) -> str:
    """``--since``/``--until``: ISO 8601 (a time without a zone is UTC) or an age such as
    ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` before now; as the API writes times."""
    text = value.strip().lower()
    if match := _RELATIVE.match(text):
        moment = now - timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    else:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(
                f"{option} {value!r} is neither an ISO 8601 time nor an age such as 15m, 2h or 3d"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
