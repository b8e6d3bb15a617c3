"""The API's event loop is not the place for heavy work: a /send is composed in a thread."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.support import DeploymentFactory
from zmta_api import routes_send
from zmta_api.app import Services, create_app
from zmta_api.compose import compose
from zmta_common import service


async def test_send_composes_its_message_off_the_event_loop(
    deploy: DeploymentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Composing up to 30 MiB of MIME on the loop stalled every other request meanwhile."""
    d = await deploy(start=False)
    composed_in: list[threading.Thread] = []

    def recording(*args: Any) -> Any:
        composed_in.append(threading.current_thread())
        return compose(*args)

    monkeypatch.setattr(routes_send, "compose", recording)
    async with service.connections(d.config, "api-test") as conn:
        app = create_app(Services(d.config, conn.store, conn.bus, redis=conn.redis))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
            answer = await client.post("/send", json={"from": "s@origin.test", "to": ["r@b.test"], "text": "x" * 1000})
    assert answer.status_code == 200, answer.text
    assert composed_in and composed_in[0] is not threading.main_thread()
