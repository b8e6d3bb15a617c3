"""API keys: every route but /health needs one, with the right scope, checked before the
body is read; bodies stop at their limit; recipients are capped; no input gets a 500."""

from __future__ import annotations

import asyncio
import hashlib
import re
import select
import socket

import httpx
import pytest
from starlette.datastructures import Headers

from tests.support import Deployment, DeploymentFactory
from zmta_api.security import Guard, Refused
from zmta_common.config import Api, ApiKey

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
    api = {"open_access": False, "keys": keys, "max_body": MAX_BODY, "max_recipients": 50}
    return await module_deploy({"api": api}, senders={})


MAX_BODY = 1024 * 1024


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


def http_exchange(port: int, head: str, body_pieces: int = 0, piece: bytes = b"") -> tuple[bytes, int]:
    """Send a request head, then up to ``body_pieces`` chunks of ``piece`` (chunked encoding),
    one at a time, until the server answers; return the answer and the body bytes sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        sent = 0
        for _ in range(body_pieces):
            if select.select([sock], [], [], 0.05)[0]:
                break  # the server has answered
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        return answer, sent


def _length(answer: bytes) -> int:
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
    return int(found.group(1)) if found else 0


async def test_the_key_is_checked_before_a_byte_of_the_body_is_read(api: Deployment) -> None:
    port = api.config.api.port
    for path in ("/send", "/send-raw"):
        announced = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        announced += f"Content-Length: {50 * 1024 * 1024}\r\n\r\n"
        answer, _ = await asyncio.to_thread(http_exchange, port, announced)  # no body is ever sent
        assert answer.startswith(b"HTTP/1.1 401 "), answer
    chunked = "POST /send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent = await asyncio.to_thread(http_exchange, port, chunked, 800, b"x" * 65536)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert sent <= 65536  # answered on the head alone


async def test_a_body_stops_being_read_at_its_limit(api: Deployment) -> None:
    port = api.config.api.port
    before = await api.store.row_counts()
    keyed = f"POST /send-raw HTTP/1.1\r\nHost: x\r\nX-API-Key: {SENDER_KEY}\r\n"
    answer, _ = await asyncio.to_thread(http_exchange, port, keyed + f"Content-Length: {MAX_BODY + 1}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert f"request body over {MAX_BODY} bytes".encode() in answer
    # Chunked, so no length is announced: the server answers once it has read past the limit,
    # long before the 50 MiB a client could send.
    chunked = keyed + "Content-Type: message/rfc822\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent = await asyncio.to_thread(http_exchange, port, chunked, 800, b"Subject: x\r\n" * 5000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert sent < 2 * MAX_BODY  # answered just past the limit, not at the end of a 50 MiB body
    assert await api.store.row_counts() == before  # nothing of either was kept


async def test_too_many_recipients_is_a_400_with_the_limit(api: Deployment) -> None:
    many = [f"user{i}@a.test" for i in range(40_000)]  # under max_body, far over max_recipients
    headers = {"X-API-Key": SENDER_KEY}
    async with httpx.AsyncClient(base_url=api.api_url, timeout=60) as client:
        sent = await client.post("/send", json={**MESSAGE, "to": many}, headers=headers)
        assert sent.status_code == 400, sent.text
        assert sent.json() == {"error": "to: too many recipients: at most 50 per message", "field": "to"}
        raw = b"From: s@origin.test\r\nTo: " + ", ".join(many[:51]).encode() + b"\r\n\r\nhi\r\n"
        sent = await client.post("/send-raw", content=raw, headers=headers)
        assert sent.status_code == 400, sent.text
        assert "at most 50" in sent.json()["error"]
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("subject", ["a\u2028b", "a\x85b", "a\u2029b", "a\x1cb", "a\rb"])
async def test_a_line_breaker_in_the_subject_is_a_400(api: Deployment, subject: str) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        sent = await client.post("/send", json={**MESSAGE, "subject": subject}, headers={"X-API-Key": SENDER_KEY})
    assert sent.status_code == 400, sent.text
    assert sent.json()["field"] == "subject"


async def test_the_documentation_needs_a_key(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 401, path
            for key in (SENDER_KEY, ADMIN_KEY):  # any valid key will do
                assert (await client.get(path, headers={"X-API-Key": key})).status_code == 200, path
        schema = (await client.get("/openapi.json", headers={"X-API-Key": ADMIN_KEY})).json()
        assert "/send" in schema["paths"]


def test_public_docs_opens_the_documentation_only() -> None:
    guard = Guard(Api(public_docs=True, keys=[ApiKey.model_validate(entry("ops", ADMIN_KEY, ["admin"]))]))
    assert guard.caller("/openapi.json", Headers()) is None
    assert guard.caller("/redoc", Headers()) is None
    with pytest.raises(Refused) as refused:
        guard.caller("/counter/zone/", Headers())
    assert refused.value.status == 401
