"""The web console: a small operator's UI served by the api at ``/ui``.

Plain HTML, one CSS file and one JavaScript module (``console/``), no build step and nothing
from another origin. The files themselves hold no data, so they need no key: the gate
(security.py) lets exactly ``/ui``, ``/ui/`` and ``/ui/<file>`` through, a single plain file
name, never an API route. Everything a page shows it gets from the JSON API with
``fetch()``, sending the key the operator typed on the login page as ``X-API-Key``; the key
lives in the tab's ``sessionStorage`` (gone with the tab) and a 401 or 403 sends the
operator back to the login page with the API's error.

**No CSRF surface.** The console uses no cookies and the API sets none: the browser never
attaches a credential to a request by itself, so a page of another site cannot make one
that carries the key (and the API sends no CORS headers, so another origin can neither set
``X-API-Key`` nor read an answer). The API's 401 challenge is ``Bearer``, so the browser
never asks for, nor caches, Basic credentials either.

**No XSS.** The data includes remote servers' replies and addresses chosen by whoever sends
mail, so the JavaScript puts every value in the page with ``textContent`` and DOM calls,
never ``innerHTML``; and the Content-Security-Policy sent with the files allows scripts,
styles and requests from this origin only (no inline script, no ``eval``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

MOUNT = "/ui"
FILES = Path(__file__).with_name("console")

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on each load (ETag): an upgraded api serves its new console at once.
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """The console's files, each answered with the security headers above."""

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the console at ``/ui`` (``/ui`` itself redirects to ``/ui/``, its index.html)."""
    app.mount(MOUNT, ConsoleFiles(directory=FILES, html=True), name="console")
