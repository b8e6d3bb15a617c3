"""The HTTP API as the commands call it: JSON in and out, errors turned into :mod:`.errors`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from .errors import ApiFailure, Unreachable
from .settings import Settings

Params = Mapping[str, str | int | None]
PAGE_MAX = 1000  # the most a page of /queued holds; asked of /log too


def path(*segments: str) -> str:
    """A route from segments, each escaped: a zone, an id or a domain is one segment, never more."""
    return "/" + "/".join(quote(segment, safe="@") for segment in segments)


class Api:
    def __init__(self, settings: Settings) -> None:
        # A key given as the password of the URL (http://user:key@host:port) is sent as HTTP
        # Basic credentials by httpx, and the API takes it as such; it is never shown.
        headers = {"Authorization": f"Bearer {settings.key}"} if settings.key else {}
        self.url = _shown(settings.url)
        self.http = httpx.Client(base_url=settings.url, headers=headers, timeout=settings.timeout)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, route: str, params: Params | None = None, body: Any = None) -> Any:
        """The answer's JSON; raises ApiFailure for an error status, Unreachable for no answer."""
        query = {name: value for name, value in (params or {}).items() if value is not None}
        try:
            response = self.http.request(method, route, params=query, json=body)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the API at {self.url}: {_reason(exc)}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.is_error:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise ApiFailure(response.status_code, str(error or response.reason_phrase or "error"))
        if answer is None:
            raise Unreachable(f"the answer of {self.url}{route} is not JSON: is that the ZoneMTA API?")
        return answer

    def get(self, route: str, params: Params | None = None) -> Any:
        return self.call("GET", route, params)

    def collect(
        self,
        route: str,
        key: str,
        params: Params,
        limit: int,
        size_param: str,
        keep: Callable[[dict[str, Any]], bool] | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Listing:
        """Up to ``limit`` items of ``key`` (those ``keep`` accepts) from pages linked by
        ``next``, passed back as ``?cursor=``; each page asks for what is still wanted, and
        ``check`` may refuse a page (by raising)."""
        listing = Listing([], more=False, next=None)
        cursor: str | None = None
        while True:
            wanted = PAGE_MAX if keep else min(limit - len(listing.items), PAGE_MAX)
            query = {**params, size_param: wanted, "cursor": cursor}
            page = self.get(route, query)
            if check is not None:
                check(page)
            listing.next = page.get("next") or None
            for item in page.get(key) or []:
                if keep is not None and not keep(item):
                    continue
                if len(listing.items) >= limit:
                    listing.more = True
                    return listing
                listing.items.append(item)
            if listing.next is None:
                return listing
            if len(listing.items) >= limit:
                listing.more = True
                return listing
            cursor = listing.next


@dataclass(slots=True)
class Listing:
    items: list[dict[str, Any]]
    more: bool  # items were left out (past the limit)
    next: str | None  # the last page's cursor


def _shown(url: str) -> str:
    """The URL without its credentials, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]
