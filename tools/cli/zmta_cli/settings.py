"""Where the API is and which key to present: the options, the environment, then a file.

For each of the URL and the key, the first that is set wins: ``--api`` / ``--key``, then
``ZMTA_API_URL`` / ``ZMTA_API_KEY`` (typer reads those for the options), then ``url`` /
``key`` in the TOML file ``$ZMTA_CLI_CONFIG``, or else ``$XDG_CONFIG_HOME/zmta/cli.toml``
(``~/.config/zmta/cli.toml``), then the API's default address. No key at all is fine
against an API with ``api.open_access``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import InvalidInput

# The API's own default: api.host and api.port of zmta_common.config (a test checks they agree).
DEFAULT_URL = "http://127.0.0.1:12080"
CONFIG_ENV = "ZMTA_CLI_CONFIG"
FILE_KEYS = ("url", "key")


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    key: str | None
    timeout: float


def config_path() -> Path:
    """The CLI's config file (it need not exist)."""
    if given := os.environ.get(CONFIG_ENV):
        return Path(given)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "zmta" / "cli.toml"


def read_file(path: Path) -> dict[str, str]:
    """``url`` and ``key`` from the file; nothing when it does not exist."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise InvalidInput(f"{path}: unknown key {unknown[0]!r} (it may hold {', '.join(FILE_KEYS)})")
    for name, value in data.items():
        if not isinstance(value, str):
            raise InvalidInput(f"{path}: {name} must be a string")
    return dict(data)


def resolve(url: str | None, key: str | None, timeout: float) -> Settings:
    """The settings from the options (or their environment variables), else the file."""
    stored = read_file(config_path()) if url is None or key is None else {}
    chosen = (url or stored.get("url") or DEFAULT_URL).rstrip("/")
    parsed = urlsplit(chosen)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidInput(f"the API URL {chosen!r} is not an http(s) URL")
    return Settings(chosen, key or stored.get("key") or None, timeout)
