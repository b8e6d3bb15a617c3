"""API keys: every route but /health needs one, with the right scope."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.conftest import Deployment, DeploymentFactory

SENDER_KEY = "zmta_sender-key-for-tests"
ADMIN_KEY = "zmta_admin-key-for-tests"
TRUSTED_KEY = "zmta_trusted-key-for-tests"


def entry(name: str, key: str, scopes: list[str], may_set_user: bool = False) -> dict:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return {"name": name, "hash": f"sha256:{digest}", "scopes": scopes, "may_set_user": may_set_user}


@pytest.fixture(scope="module")
async def api(module_deploy: DeploymentFactory) -> Deployment:
    keys = [
        entry("app", SENDER_KEY, ["send"]),
        entry("ops", ADMIN_KEY, ["admin"]),
        entry("portal", TRUSTED_KEY, ["send"], may_set_user=True),
    ]
    return await module_deploy({"api": {"open_access": False, "keys": keys}}, senders={})


MESSAGE = {"from": "s@origin.test", "to": "x@a.test", "text": "hi"}


async def test_no_key_is_401_and_health_is_public(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        assert (await client.get("/health")).status_code == 200
        for method, path in (("POST", "/send"), ("GET", "/counter/zone/"), ("GET", "/metrics")):
            response = await client.request(method, path, json=MESSAGE if method == "POST" else None)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "API key" in response.json()["error"]
        wrong = await client.get("/counter/zone/", headers={"Authorization": "Bearer zmta_not-a-key"})
        assert wrong.status_code == 401


async def test_each_scope_opens_its_routes_only(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        sent = await client.post("/send", json=MESSAGE, headers={"Authorization": f"Bearer {SENDER_KEY}"})
        assert sent.status_code == 200, sent.text
        denied = await client.get("/counter/zone/", headers={"X-API-Key": SENDER_KEY})
        assert denied.status_code == 403
        assert "'admin'" in denied.json()["error"]
        counters = await client.get("/counter/zone/", auth=("webadmin", ADMIN_KEY))  # HTTP Basic, as an URL gives
        assert counters.status_code == 200
        assert (await client.post("/send", json=MESSAGE, headers={"X-API-Key": ADMIN_KEY})).status_code == 403


async def test_only_trusted_keys_may_name_the_user_and_origin(api: Deployment) -> None:
    claims = {"X-Authenticated-User": "mallory", "X-Originating-IP": "192.0.2.7"}
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        plain = await client.post("/send", json=MESSAGE, headers={"X-API-Key": SENDER_KEY, **claims})
        trusted = await client.post("/send", json=MESSAGE, headers={"X-API-Key": TRUSTED_KEY, **claims})
    untrusted_meta = (await api.store.get_message(plain.json()["id"])).meta  # type: ignore[union-attr]
    trusted_meta = (await api.store.get_message(trusted.json()["id"])).meta  # type: ignore[union-attr]
    assert untrusted_meta["user"] == "app" and untrusted_meta["origin"] == "127.0.0.1"
    assert trusted_meta["user"] == "mallory" and trusted_meta["origin"] == "192.0.2.7"
