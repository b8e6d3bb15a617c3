"""Spam check with Rspamd: every message is scanned before it is queued.

On ``message:store`` (ingest and api) the message as it will be stored (headers, blank
line, body streamed from the store) is POSTed to Rspamd's ``/checkv2`` with what Rspamd
knows from an MTA: ``From`` (MAIL FROM), one ``Rcpt`` per recipient, ``IP`` (the client),
``User`` (when authenticated), ``Queue-Id``, ``Helo`` (SMTP). Rspamd's action decides:

==================== ===============================================================
action               what happens
==================== ===============================================================
``reject``           ``550 5.7.1 Message rejected as spam`` (with ``reject_spam``;
                     without it the message is only marked, as for ``add header``)
``soft reject``      ``451 4.7.1 Try again later`` (greylisting, rate limits)
``rewrite subject``  Subject prefixed with ``subject_prefix`` (``{score}`` is replaced
                     by the score), or else rewritten as Rspamd proposes; ``X-Spam: Yes``
``add header``       ``X-Spam: Yes``
others               nothing more (``no action``, ``greylist``)
==================== ===============================================================

A message that was scanned and not refused gets, for debugging only (the recipient has
no reason to trust them)::

    X-Zone-Spam-Resolution: add header
    X-Zone-Spam-Status: add header score=6.20/15.00 [HFILTER_URL_ONLY=2.20, MIME_GOOD=-0.10]

Messages larger than ``max_size`` are not scanned (as the original). When Rspamd cannot be
reached, times out or answers with an error, ``on_error: accept`` (the default) lets the
message through unscanned, so a failing Rspamd never blocks mail; ``on_error: defer``
answers ``451 4.7.1 Spam check unavailable, try again later``. Configuration::

    plugins:
      zmta_common.plugins.rspamd:
        url: http://127.0.0.1:11333   # Rspamd's normal worker (or its proxy)
        timeout: 15                   # seconds for the whole check
        max_size: 10485760            # bytes; larger messages are not scanned (0: no limit)
        reject_spam: true             # refuse "reject"; false: only mark it
        subject_prefix: "[SPAM]"      # for "rewrite subject"; may contain {score}
        on_error: accept              # or "defer" (451 while Rspamd is down)
        settings_id: outbound         # optional: Rspamd settings to apply (Settings-ID)

The plugin needs ``httpx``.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from email.header import Header
from types import ModuleType
from typing import TYPE_CHECKING, Any

from zmta_common.headers import HeaderBlock
from zmta_common.hooks import PluginApp, PluginError, Reject

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:11333"
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
MAX_SYMBOLS = 12  # in X-Zone-Spam-Status, the highest scoring first

SPAM_REPLY = (550, "5.7.1 Message rejected as spam")
SOFT_REPLY = (451, "4.7.1 Try again later")
ERROR_REPLY = (451, "4.7.1 Spam check unavailable, try again later")
MARKED = frozenset({"add header", "rewrite subject", "reject"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RspamdError(Exception):
    """Rspamd did not give a usable answer."""


def init(app: PluginApp) -> None:
    if app.service not in ("ingest", "api"):
        return  # messages are only stored there
    try:
        import httpx  # only the services that scan need it
    except ImportError:
        raise PluginError(f"plugin {app.name!r} needs httpx (pip install httpx)") from None
    checker = RspamdCheck(app, httpx)
    app.hook("message:store", checker.message_store)


class RspamdCheck:
    def __init__(self, app: PluginApp, httpx_module: ModuleType) -> None:
        options = app.options
        self.log = app.log
        self.httpx = httpx_module
        self.url = str(options.get("url", DEFAULT_URL)).rstrip("/") + "/checkv2"
        try:
            self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
            self.max_size = int(options.get("max_size", DEFAULT_MAX_SIZE))
        except (TypeError, ValueError) as exc:
            raise PluginError(f"plugin {app.name!r}: bad timeout or max_size: {exc}") from None
        self.reject_spam = bool(options.get("reject_spam", True))
        self.subject_prefix = str(options.get("subject_prefix") or "")
        self.settings_id = str(options.get("settings_id") or "")
        self.on_error = str(options.get("on_error", "accept")).lower()
        if self.on_error not in ("accept", "defer"):
            raise PluginError(f"plugin {app.name!r}: on_error must be 'accept' or 'defer', not {self.on_error!r}")
        if self.timeout <= 0:
            raise PluginError(f"plugin {app.name!r}: timeout must be positive")
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (a service runs one)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = self.httpx.AsyncClient(timeout=self.timeout)
            self._client_loop = loop
        return self._client

    async def message_store(self, envelope: Any, headers: HeaderBlock, body: Any) -> None:
        queue_id = str(getattr(body, "queue_id", "") or "")
        head = headers.to_bytes() + b"\r\n"
        size = len(head) + int(body.size)
        if self.max_size > 0 and size > self.max_size:
            self.log.info("message too large to scan", extra={"id": queue_id, "size": size})
            return
        try:
            async with asyncio.timeout(self.timeout):
                result = await self.check(envelope, head, body, size, queue_id)
        except Exception as exc:  # a failing Rspamd must not look like a failing plugin
            reason = str(exc) or type(exc).__name__
            self.log.warning("spam check failed", extra={"id": queue_id, "url": self.url, "error": reason})
            if self.on_error == "defer":
                raise Reject(*ERROR_REPLY) from None
            return
        self.apply(result, headers, queue_id)

    async def check(self, envelope: Any, head: bytes, body: Any, size: int, queue_id: str) -> dict[str, Any]:
        fields: list[tuple[str, str]] = [("Content-Length", str(size))]
        if envelope.mail_from:
            fields.append(("From", envelope.mail_from))
        fields += [("Rcpt", rcpt) for rcpt in envelope.recipients]
        optional = {
            "IP": getattr(envelope, "origin", ""),
            "User": getattr(envelope, "user", None),
            "Helo": getattr(envelope, "transhost", ""),
            "Queue-Id": queue_id,
            "Settings-ID": self.settings_id,
        }
        fields += [(name, str(value)) for name, value in optional.items() if value]
        # UTF-8, not httpx's ASCII default: addresses may be internationalised (SMTPUTF8).
        request_headers = [(name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in fields]

        async def content() -> AsyncIterator[bytes]:
            yield head
            async for chunk in body.chunks():
                yield chunk

        response = await self.client().post(self.url, content=content(), headers=request_headers)
        if response.status_code != 200:
            raise RspamdError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            result = response.json()
        except ValueError:
            raise RspamdError("the answer is not JSON") from None
        if not isinstance(result, dict) or "action" not in result:
            raise RspamdError(f"unexpected answer: {str(result)[:200]}")
        return result

    def apply(self, result: dict[str, Any], headers: HeaderBlock, queue_id: str) -> None:
        action = _clean(result.get("action", "no action"))
        score = _number(result.get("score"))
        required = _number(result.get("required_score"))
        symbols = result.get("symbols") if isinstance(result.get("symbols"), dict) else {}
        self.log.info(
            "spam check", extra={"id": queue_id, "action": action, "score": score, "symbols": sorted(symbols or {})}
        )
        if action == "reject" and self.reject_spam:
            raise Reject(*SPAM_REPLY)
        if action == "soft reject":
            raise Reject(*SOFT_REPLY)
        if action == "rewrite subject":
            self.rewrite_subject(headers, score, result.get("subject"))
        if action in MARKED:
            headers.remove("x-spam")  # a client must not decide this for us
            headers.add("X-Spam", "Yes")
        headers.remove("x-zone-spam-resolution")
        headers.remove("x-zone-spam-status")
        headers.add("X-Zone-Spam-Resolution", action)
        headers.add("X-Zone-Spam-Status", status_line(action, score, required, symbols or {}))

    def rewrite_subject(self, headers: HeaderBlock, score: float, proposed: object) -> None:
        subject = headers.get("subject") or ""
        if self.subject_prefix:
            prefix = self.subject_prefix.replace("{score}", f"{score:.2f}")
            if subject.startswith(prefix):
                return
            new = f"{prefix} {subject}".strip()
        elif isinstance(proposed, str) and proposed:
            new = _clean(proposed)
            new = new if new.isascii() else Header(new, "utf-8").encode()
        else:
            return
        headers.set("Subject", new)


def status_line(action: str, score: float, required: float, symbols: dict[str, Any]) -> str:
    """``<action> score=<score>/<required> [SYMBOL=score, ...]``, folded between symbols."""
    scored = sorted(
        (-abs(value), str(name), value)
        for name, info in symbols.items()
        for value in [_number(info.get("score") if isinstance(info, dict) else None)]
    )
    parts = [f"{_clean(name)}={value:.2f}" for _, name, value in scored[:MAX_SYMBOLS]]
    if len(scored) > MAX_SYMBOLS:
        parts.append(f"+{len(scored) - MAX_SYMBOLS} more")
    tokens = [f"{part}," for part in parts[:-1]] + [f"{parts[-1]}]"] if parts else ["]"]
    tokens[0] = "[" + tokens[0]
    text = f"{action} score={score:.2f}/{required:.2f}"
    width = len("X-Zone-Spam-Status: ") + len(text)
    for token in tokens:
        if width + 1 + len(token) > 78:
            text += "\r\n " + token
            width = 1 + len(token)
        else:
            text += " " + token
            width += 1 + len(token)
    return text


def _clean(value: object) -> str:
    """Text from Rspamd made safe for a header line: no control characters (no CR, LF)."""
    return _CONTROL.sub("", str(value)).strip()


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0
