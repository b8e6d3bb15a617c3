"""The api's queue and operator routes against running services: the original's JSON shapes,
and retry now, drop and pause acting on real queued deliveries that senders deliver to sinks."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import re
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.support import Deployment, DeploymentFactory, eventually, work_requests
from zmta_common import redis_keys
from zmta_common.intake import CHUNK_SIZE
from zmta_common.limits import Blacklist, Candidate, ZoneLimits
from zmta_common.store import Deferral, LeaseCandidate, OutcomeBatch

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))  # binary, every byte value
PDF = b"%PDF-1.4\n" + bytes(range(255, -1, -1)) * 4


@pytest.fixture(scope="module")
async def api(module_deploy: DeploymentFactory) -> Deployment:
    """No senders: whatever is queued stays queued."""
    return await module_deploy(
        {
            "queue": {"max_future_date": 86400},
            "zones": {
                "listing": {"recipient_domains": ["list.test"]},
                "default": {"domains": {"ratelimited.test": {"rate": "1/hour"}}},
            },
        },
        senders={},
    )


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


async def send(client: httpx.AsyncClient, payload: dict[str, Any]) -> str:
    response = await client.post("/send", json=payload)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


# -- shapes ---------------------------------------------------------------


async def test_zones_sorted_by_name(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        zones = (await client.get("/zones")).json()
        everything = (await client.get("/zones", params={"includeDisabled": "true"})).json()
    assert zones == [{"name": "bounces"}, {"name": "default"}, {"name": "listing"}]
    assert everything == zones  # no zone is disabled


async def test_queued_lists_pages_and_cursors(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        first = await send(client, {"from": "s@origin.test", "to": [f"r{n}@list.test" for n in range(5)], "text": "x"})
        second = await send(client, {"from": "s@origin.test", "to": "late@list.test", "text": "y"})
        later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
        held = await send(client, {"from": "s@origin.test", "to": "held@list.test", "text": "z", "date": later})

        listing = (await client.get("/queued/active/listing")).json()
        assert listing["zone"] == "listing"
        assert listing["type"] == "queued"
        assert listing["next"] is None
        assert [(i["id"], i["seq"]) for i in listing["list"]] == [(second, "001")] + [
            (first, f"{n:03x}") for n in range(5, 0, -1)
        ]  # default: by id, newest first
        item = listing["list"][-1]
        assert set(item) == {"id", "seq", "zone", "recipient", "created", "queued", "deferred"}
        assert (item["zone"], item["recipient"], item["deferred"]) == ("listing", "r0@list.test", 0)
        assert ISO.match(item["created"]) and ISO.match(item["queued"])
        assert (await client.get("/queued/queued/listing")).json()["list"] == listing["list"]

        deferred = (await client.get("/queued/deferred/listing")).json()
        assert deferred["type"] == "deferred"
        assert [(i["id"], i["recipient"], i["deferred"]) for i in deferred["list"]] == [(held, "held@list.test", 0)]
        assert deferred["list"][0]["queued"][:13] == later[:13]  # held until its Date

        ascending = (await client.get("/queued/queued/listing", params={"sort": "created", "order": "asc"})).json()
        assert [i["id"] for i in ascending["list"]] == [first] * 5 + [second]
        offset = (await client.get("/queued/queued/listing", params={"order": "asc", "start": 4})).json()
        assert [(i["id"], i["seq"]) for i in offset["list"]] == [(first, "005"), (second, "001")]

        pages: list[dict[str, Any]] = []
        params: dict[str, Any] = {"sort": "queued", "order": "asc", "pageSize": 2}
        while True:
            page = (await client.get("/queued/queued/listing", params=params)).json()
            pages.append(page)
            if page["next"] is None:
                break
            params = {"pageSize": 2, "cursor": page["next"]}
        assert [len(p["list"]) for p in pages] == [2, 2, 2]
        paged = [(i["id"], i["seq"]) for p in pages for i in p["list"]]
        assert sorted(paged) == sorted((i["id"], i["seq"]) for i in listing["list"])
        assert len(set(paged)) == 6

        # One recipient domain: every row here is list.test's; a cursor keeps its domain.
        by_domain = (await client.get("/queued/queued/listing", params={"domain": "LIST.test", "pageSize": 4})).json()
        assert [(i["id"], i["seq"]) for i in by_domain["list"]] == [(i["id"], i["seq"]) for i in listing["list"][:4]]
        assert (await client.get("/queued/queued/listing", params={"domain": "other.test"})).json()["list"] == []
        other_domain = await client.get(
            "/queued/queued/listing", params={"cursor": by_domain["next"], "domain": "other.test"}
        )
        assert (other_domain.status_code, other_domain.json()["field"]) == (400, "cursor")

        too_small = await client.get("/queued/queued/listing", params={"pageSize": 0})
        bad_cursor = await client.get("/queued/queued/listing", params={"cursor": "bm90IGEgY3Vyc29y"})
        wrong_sort = await client.get("/queued/queued/listing", params={"cursor": pages[0]["next"], "sort": "id"})
    assert (too_small.status_code, too_small.json()["field"]) == (400, "pageSize")
    assert (bad_cursor.status_code, bad_cursor.json()["field"]) == (400, "cursor")
    assert (wrong_sort.status_code, wrong_sort.json()["field"]) == (400, "cursor")


async def test_fetch_streams_the_stored_message(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        message_id = await send(
            client,
            {"from": "s@origin.test", "to": "f@list.test", "subject": "fetch me", "text": "line\n" * (CHUNK_SIZE // 4)},
        )
        whole = await client.get(f"/fetch/{message_id}")
        body = await client.get(f"/fetch/{message_id}", params={"body": "yes"})
        missing = await client.get("/fetch/1a2b3c4d5e6f700000")
        malformed = await client.get("/fetch/not-an-id")
    stored = await api.store.get_message(message_id)
    assert stored is not None
    stored_body = b"".join([c async for c in api.store.iter_body(message_id)])
    assert len(stored_body) > CHUNK_SIZE  # more than one chunk
    assert whole.status_code == 200
    assert whole.headers["content-type"].startswith("message/rfc822")
    assert whole.content == stored.headers + b"\r\n" + stored_body
    assert body.content == stored_body
    parsed = email.message_from_bytes(whole.content, policy=email.policy.default)
    assert parsed["Subject"] == "fetch me"
    assert parsed["Received"] is None and parsed["DKIM-Signature"] is None
    assert (missing.status_code, missing.json()["field"]) == (404, "id")
    assert malformed.status_code == 400


async def test_store_upload_is_not_supported(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        response = await client.put("/store/1a2b3c4d5e6f700000", content=b"Subject: x\r\n\r\nx\r\n")
    assert response.status_code == 410
    assert "/send-raw" in response.json()["error"]


async def test_skipdomains_lists_domains_at_their_limit(api: Deployment) -> None:
    redis = Redis.from_url(api.config.dbs.redis)
    try:
        limits = ZoneLimits(redis, "default", api.config.zones["default"])
        candidates = [Candidate(f"{n:x}0000000000000000.001", "ratelimited.test", None) for n in range(1, 4)]
        admitted = await limits.admit(candidates, 3, time.time() + 30)
        assert len(admitted) < 3  # 1/hour: the rest must wait, so the domain is skipped
        async with httpx.AsyncClient(base_url=api.api_url) as client:
            skipped = (await client.get("/skipdomains/default")).json()
            other = (await client.get("/skipdomains/listing")).json()
        assert skipped == {"skipDomains": ["ratelimited.test"]}
        assert other == {"skipDomains": []}
    finally:
        await redis.aclose()


async def test_blacklist_lists_the_marks_in_force(api: Deployment) -> None:
    redis = Redis.from_url(api.config.dbs.redis)
    try:
        refusal = "550 5.7.1 Service unavailable; client host [192.0.2.7] blocked using zen.spamhaus.org"
        before = time.time()
        await Blacklist(redis).mark(
            "listed.test", "192.0.2.7", 600, id="18f2a1c0b7e0004a1b", seq="001", response=refusal
        )
        await Blacklist(redis).mark("gone.test", "192.0.2.8", -1)  # expired already
        async with httpx.AsyncClient(base_url=api.api_url) as client:
            marks = (await client.get("/blacklist")).json()
    finally:
        await redis.aclose()
    entries = [e for e in marks["list"] if e["domain"] in ("listed.test", "gone.test")]
    assert len(entries) == 1
    (entry,) = entries
    assert set(entry) == {"id", "seq", "address", "domain", "response", "created", "expires"}
    assert (entry["address"], entry["domain"]) == ("192.0.2.7", "listed.test")
    # What set the mark, as the original records it; times in milliseconds, as the original's.
    assert (entry["id"], entry["seq"], entry["response"]) == ("18f2a1c0b7e0004a1b", "001", refusal)
    assert before * 1000 - 1 <= entry["created"] <= time.time() * 1000 + 1
    assert entry["expires"] - entry["created"] == pytest.approx(600_000, abs=2)
    # An expired mark takes what set it along.
    redis = Redis.from_url(api.config.dbs.redis)
    try:
        why = await redis.hkeys(redis_keys.BLACKLIST_WHY)
        assert b"listed.test|192.0.2.7" in why and b"gone.test|192.0.2.8" not in why
    finally:
        await redis.aclose()


async def test_unknown_zone_reads_are_empty_not_404(api: Deployment) -> None:
    """The original answers 200 with the usual shape for a zone it does not know: the web admin
    shows an empty zone rather than an error page."""
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        counter = await client.get("/counter/zone/atlantis")
        queued = await client.get("/queued/queued/atlantis")
        deferred = await client.get("/queued/deferred/atlantis")
        skipped = await client.get("/skipdomains/atlantis")
    empty = {"entries": [], "rows": 0}
    assert (counter.status_code, counter.json()) == (200, {"zone": "atlantis", "active": empty, "deferred": empty})
    assert queued.status_code == 200
    assert queued.json() == {"zone": "atlantis", "type": "queued", "list": [], "next": None}
    assert deferred.json() == {"zone": "atlantis", "type": "deferred", "list": [], "next": None}
    assert (skipped.status_code, skipped.json()) == (200, {"skipDomains": []})


async def test_unknown_queue_type_lists_the_queued(api: Deployment) -> None:
    """As the original: the type is lower-cased and trimmed, and anything but deferred is queued."""
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        later = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
        await send(client, {"from": "s@origin.test", "to": "typed@list.test", "text": "x"})
        await send(client, {"from": "s@origin.test", "to": "typed-later@list.test", "text": "y", "date": later})
        queued = (await client.get("/queued/queued/listing")).json()
        deferred = (await client.get("/queued/deferred/listing")).json()
        sideways = await client.get("/queued/sideways/listing")
        shouted = await client.get("/queued/DEFERRED/listing")
    assert sideways.status_code == 200, sideways.text
    assert sideways.json() == queued
    assert "typed@list.test" in [i["recipient"] for i in queued["list"]]
    assert shouted.status_code == 200, shouted.text
    assert shouted.json() == deferred
    assert "typed-later@list.test" in [i["recipient"] for i in deferred["list"]]


async def test_message_source_md5_is_that_of_the_stored_body(api: Deployment) -> None:
    """meta.sourceMd5: the hex MD5 of the body as stored (the message without its top-level
    header block, line ends CRLF), also for a body of several chunks."""
    head = b"From: s@origin.test\nTo: md5@a.test\nSubject: md5\n\n"
    small_body = b"Hello world\n\n--\nbye\n"  # bare LF, as curl --data-binary sends a file
    big_body = b"line\n" * (CHUNK_SIZE // 3)  # more than one chunk once CRLF
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        small = (await client.post("/send-raw", content=head + small_body)).json()["id"]
        big = (await client.post("/send-raw", content=head + big_body)).json()["id"]
        small_meta = (await client.get(f"/message/{small}")).json()["meta"]
        big_meta = (await client.get(f"/message/{big}")).json()["meta"]
    assert small_meta["sourceMd5"] == md5(b"Hello world\r\n\r\n--\r\nbye\r\n")
    assert big_meta["sourceMd5"] == md5(b"line\r\n" * (CHUNK_SIZE // 3))
    stored = b"".join([c async for c in api.store.iter_body(big)])
    assert len(stored) > CHUNK_SIZE
    assert big_meta["sourceMd5"] == md5(stored)
    assert big_meta["bodySize"] == len(stored)


async def test_message_user_is_false_without_an_authenticated_user(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        anonymous = await send(client, {"from": "s@origin.test", "to": "u1@a.test", "text": "x"})
        named = await client.post(
            "/send",
            json={"from": "s@origin.test", "to": "u2@a.test", "text": "x"},
            headers={"X-Authenticated-User": "andris"},
        )
        anonymous_meta = (await client.get(f"/message/{anonymous}")).json()["meta"]
        named_meta = (await client.get(f"/message/{named.json()['id']}")).json()["meta"]
    assert anonymous_meta["user"] is False
    assert named_meta["user"] == "andris"


async def test_message_deliveries_in_the_originals_shape(api: Deployment) -> None:
    """Per delivery: lock an object while a sender holds it (absent otherwise), deferred with
    its log while it waits for a later attempt (absent otherwise, never null)."""
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        rcpts = ["held@shape.test", "later@shape.test", "fresh@shape.test", "retried@shape.test"]
        message_id = await send(client, {"from": "s@origin.test", "to": rcpts, "text": "x"})

        async def mine(ready: list[LeaseCandidate]) -> list[int]:
            return [i for i, r in enumerate(ready) if r.id == message_id and r.seq in ("001", "002", "004")]

        leases = {lease.seq: lease for lease in await api.store.lease("default", 1000, 600, "sender-7", admit=mine)}
        assert sorted(leases) == ["001", "002", "004"]
        next_attempt = datetime.now(UTC) + timedelta(hours=1)
        response = "451 4.3.0 Please try again later"
        deferred = [
            Deferral(message_id, seq, leases[seq].lease_token, next_attempt, response) for seq in ("002", "004")
        ]
        assert len(await api.store.apply_outcomes(OutcomeBatch(deferred=deferred))) == 2
        assert (await client.put(f"/message/{message_id}/004")).json() == {"success": True}  # its time is now

        status = await client.get(f"/message/{message_id}")
        later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
        dated = await send(client, {"from": "s@origin.test", "to": "dated@shape.test", "text": "y", "date": later})
        dated_status = (await client.get(f"/message/{dated}")).json()
    assert status.status_code == 200, status.text
    held, waiting, fresh, retried = status.json()["messages"]

    assert set(held) == {"id", "seq", "zone", "recipient", "status", "lock"}
    assert held["status"] == "QUEUED"
    assert held["lock"] == {
        "key": f"lock {message_id} 001",
        "zone": "default",
        "domain": "shape.test",
        "lockOwner": "sender-7",
        "maxConnections": 5,
        "expires": int(leases["001"].lease_expires.timestamp() * 1000),
    }

    assert set(waiting) == {"id", "seq", "zone", "recipient", "status", "deferred"}
    assert waiting["status"] == "DEFERRED"
    info = waiting["deferred"]
    assert set(info) == {"first", "count", "last", "next", "response", "log"}
    assert (info["count"], info["response"]) == (1, response)
    assert info["next"] == int(next_attempt.timestamp() * 1000)
    assert info["first"] == info["last"] and abs(info["last"] / 1000 - time.time()) < 60
    assert info["log"] == [{"time": info["last"], "level": "info", "tnx": "server", "message": response}]

    for plain in (fresh, retried):  # never deferred, or deferred but due now: neither lock nor deferred
        assert set(plain) == {"id", "seq", "zone", "recipient", "status"}
        assert plain["status"] == "QUEUED"

    (dated_row,) = dated_status["messages"]
    assert dated_row["status"] == "DEFERRED"
    assert "lock" not in dated_row
    assert dated_row["deferred"]["count"] == 0
    assert dated_row["deferred"]["response"] == "Deferred by router"
    assert dated_row["deferred"]["log"] == []
    assert dated_row["deferred"]["next"] // 1000 == int(datetime.fromisoformat(later).timestamp())


# -- acting on queued deliveries ------------------------------------------


async def test_drop_one_delivery_then_the_message(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        message_id = await send(client, {"from": "s@origin.test", "to": ["d1@list.test", "d2@list.test"], "text": "x"})
        one = await client.delete(f"/message/{message_id}/001")
        left = (await client.get(f"/message/{message_id}")).json()["messages"]
        assert one.json() == {"success": True}
        assert [m["seq"] for m in left] == ["002"]
        again = await client.delete(f"/message/{message_id}/001")  # as the original: success all the same
        assert (again.status_code, again.json()["success"]) == (200, True)
        assert again.json()["message"] == f"delivery {message_id}.001 is not in the queue"

        rest = await client.delete(f"/message/{message_id}")
        assert rest.json() == {"success": True}
        assert (await client.get(f"/message/{message_id}")).status_code == 404
        assert "not in the queue" in (await client.delete(f"/message/{message_id}")).json()["message"]
    assert await api.store.get_message(message_id) is None  # the message and its body went with the last row
    assert [c async for c in api.store.iter_body(message_id)] == []


async def test_the_web_admins_whole_message_routes(api: Deployment) -> None:
    """zmta-webadmin sends now and deletes a whole message with an empty seq and a trailing
    slash, and follows no redirect."""
    async with httpx.AsyncClient(base_url=api.api_url, follow_redirects=False) as client:
        message_id = await send(client, {"from": "s@origin.test", "to": ["w1@list.test", "w2@list.test"], "text": "x"})
        await api.store.pool.execute(
            "UPDATE deliveries SET next_attempt = now() + interval '1 hour' WHERE id = $1", message_id
        )
        send_now = await client.put(f"/message/{message_id}/")
        ready = await api.store.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE id = $1 AND next_attempt <= now()", message_id
        )
        without_slash = await client.put(f"/message/{message_id}")
        deleted = await client.delete(f"/message/{message_id}/")
    assert (send_now.status_code, send_now.json()) == (200, {"success": True})
    assert ready == 2
    assert without_slash.status_code == 200
    assert (deleted.status_code, deleted.json()) == (200, {"success": True})
    assert await api.store.get_message(message_id) is None


async def test_leased_deliveries_are_neither_dropped_nor_retried(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        message_id = await send(client, {"from": "s@origin.test", "to": "busy@b.test", "text": "x"})
        leases = await api.store.lease("default", 1000, 60, "a-test-sender")
        assert message_id in {lease.id for lease in leases}
        retry = await client.put(f"/message/{message_id}/001")
        drop_one = await client.delete(f"/message/{message_id}/001")
        drop_all = await client.delete(f"/message/{message_id}")
        status = (await client.get(f"/message/{message_id}")).json()
        unknown = await client.put("/message/1a2b3c4d5e6f700000/001")
        bad_seq = await client.put(f"/message/{message_id}/x")
    # The original answers success whatever happened; "message" says why nothing changed.
    assert (retry.status_code, drop_one.status_code, drop_all.status_code) == (200, 200, 200)
    for answer in (retry, drop_one, drop_all):
        assert "being delivered right now" in answer.json()["message"]
    lock = status["messages"][0]["lock"]
    assert (lock["lockOwner"], lock["key"], lock["zone"]) == ("a-test-sender", f"lock {message_id} 001", "default")
    assert (unknown.status_code, unknown.json()["success"]) == (200, True)
    assert "not in the queue" in unknown.json()["message"]
    assert (bad_seq.status_code, bad_seq.json()["success"]) == (200, True)
    assert await api.store.deliveries_of(message_id)  # nothing was dropped


async def test_pause_routes(api: Deployment) -> None:
    async with httpx.AsyncClient(base_url=api.api_url) as client:
        zone = (await client.post("/pause/listing")).json()
        twice = (await client.post("/pause/listing")).json()
        domain = (await client.post("/pause/default/Example.TEST.")).json()
        listing = (await client.get("/pause")).json()
        unknown = await client.post("/pause/atlantis")
        bad_domain = await client.post("/pause/default/not a domain")
        resumed_zone = await client.delete("/pause/listing")
        resumed_domain = await client.delete("/pause/default/example.test")
        not_paused = await client.delete("/pause/listing")
        after = (await client.get("/pause")).json()
    assert zone["paused"]["zone"] == "listing"
    assert zone["paused"]["domain"] is None
    assert ISO.match(zone["paused"]["created"])
    assert twice == zone
    assert domain["paused"]["domain"] == "example.test"
    assert listing == {"paused": [domain["paused"], zone["paused"]]}
    assert (unknown.status_code, unknown.json()["field"]) == (404, "zone")
    assert (bad_domain.status_code, bad_domain.json()["field"]) == (400, "domain")
    assert resumed_zone.json() == resumed_domain.json() == {"success": True}
    assert (not_paused.status_code, not_paused.json()["field"]) == (404, "zone")
    assert after == {"paused": []}


# -- with a sender, to the sinks ------------------------------------------


async def test_retry_now_sends_a_deferred_delivery_at_once(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"zones": {"default": {"defer_times": [3600]}}}, senders={"default": 1})
    sink = sinks["127.0.0.2"]
    sink.handler.scripted["later@a.test"] = ["451 4.3.0 Please try again later"]
    async with work_requests(d) as requests, httpx.AsyncClient(base_url=d.api_url) as client:
        message_id = await send(client, {"from": "s@origin.test", "to": "later@a.test", "text": "retry me"})

        async def deferred() -> list[dict[str, Any]]:
            return list((await client.get("/queued/deferred/default")).json()["list"])

        (row,) = await eventually(deferred, what="the deferral")
        assert (row["id"], row["seq"], row["deferred"]) == (message_id, "001", 1)
        # The queue has answered a work request since, and left the delivery out.
        await requests.two_more()
        assert sink.messages == []  # not before its hour is up
        assert [(r.leased, r.attempts) for r in await d.store.deliveries_of(message_id)] == [(False, 1)]
        retry = await client.put(f"/message/{message_id}/001")
        assert retry.json() == {"success": True}
        await eventually(lambda: sink.messages, what="the delivery after retry now")
        assert sink.messages[0].rcpt_tos == ["later@a.test"]

        async def gone() -> bool:
            return (await client.get(f"/message/{message_id}")).status_code == 404

        await eventually(gone, what="the delivery leaving the queue")
        again = await client.put(f"/message/{message_id}/001")  # the original answers success all the same
        assert (again.status_code, again.json()["success"]) == (200, True)
        assert "not in the queue" in again.json()["message"]


async def test_pause_holds_delivery_until_resumed(deploy: DeploymentFactory, sinks: dict) -> None:
    # The queue reads the pauses for every work request (queue.pauses_ttl 0), so a pause
    # holds from the moment the API has answered.
    d = await deploy({"queue": {"pauses_ttl": 0}}, senders={"default": 1})
    a, b = sinks["127.0.0.2"], sinks["127.0.0.3"]
    async with work_requests(d) as requests, httpx.AsyncClient(base_url=d.api_url) as client:
        assert (await client.post("/pause/default/a.test")).status_code == 200
        # One message to both domains: the lease that hands out b.test's delivery leaves
        # a.test's out; then two more work requests, each answered without it.
        held = await send(client, {"from": "s@origin.test", "to": ["held@a.test", "free@b.test"], "text": "x"})
        await eventually(lambda: b.messages, what="b.test, not paused")
        await requests.two_more()
        assert a.messages == []
        assert [row.leased for row in await d.store.deliveries_of(held)] == [False]
        queued = (await client.get("/queued/queued/default")).json()["list"]
        assert [i["recipient"] for i in queued] == ["held@a.test"]
        assert (await client.delete("/pause/default/a.test")).json() == {"success": True}
        await eventually(lambda: a.messages, what="a.test after resuming")

        # a whole zone
        assert (await client.post("/pause/default")).status_code == 200
        later = await send(client, {"from": "s@origin.test", "to": "later@b.test", "text": "y"})
        await requests.two_more()
        assert [row.leased for row in await d.store.deliveries_of(later)] == [False]
        assert [m.rcpt_tos for m in b.messages] == [["free@b.test"]]
        assert (await client.delete("/pause/default")).json() == {"success": True}
        await eventually(lambda: len(b.messages) == 2, what="the zone after resuming")


async def test_send_with_attachments_and_inline_images(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy(senders={"default": 1})
    payload = {
        "from": {"name": "Sändér", "address": "author@origin.test"},
        "sender": "agent@origin.test",
        "to": "One <one@a.test>",
        "cc": [{"name": "Two", "address": "two@a.test"}],
        "bcc": "hidden@a.test",
        "replyTo": "replies@origin.test",
        "inReplyTo": "<parent@origin.test>",
        "references": ["root@origin.test", "<parent@origin.test>"],
        "subject": "Attachments ✓",
        "text": "See the logo.",
        "html": '<p>See the logo: <img src="cid:logo@origin.test"></p>',
        "headers": [{"key": "X-Campaign", "value": "spring"}],
        "attachments": [
            {"filename": "logo.png", "content": base64.b64encode(PNG).decode(), "encoding": "base64",
             "cid": "logo@origin.test"},
            {"filename": "report.pdf", "content": base64.b64encode(PDF).decode(), "encoding": "base64"},
            {"filename": "notes.txt", "content": "plain text, ü"},
            {"filename": "tiny.bin", "path": "data:application/octet-stream;base64,AAEC/w=="},
        ],
        "messageId": "composed-1@origin.test",
        "date": "Tue, 02 Jan 2024 03:04:05 +0000",
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=d.api_url) as client:
        reply = (await client.post("/send", json=payload)).json()
        refused = await client.post("/send", json={**payload, "attachments": [{"path": "/etc/passwd"}]})
        url = await client.post("/send", json={**payload, "attachments": [{"href": "http://example.com/x.png"}]})
    assert reply["from"] == "agent@origin.test"  # the Sender is the envelope sender
    assert reply["to"] == ["one@a.test", "two@a.test", "hidden@a.test"]
    assert (refused.status_code, refused.json()["field"]) == (400, "attachments.0.path")
    assert (url.status_code, url.json()["field"]) == (400, "attachments.0.href")

    sink = sinks["127.0.0.2"]
    await eventually(lambda: len(sink.messages) == 3, what="a delivery to each recipient")
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == ["hidden@a.test", "one@a.test", "two@a.test"]
    received = sink.messages[0]
    assert received.mail_from == "agent@origin.test"
    msg = email.message_from_bytes(received.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Bcc"] is None
    assert str(msg["From"]) == "Sändér <author@origin.test>"
    assert (msg["Sender"], msg["To"], msg["Cc"]) == ("agent@origin.test", "One <one@a.test>", "Two <two@a.test>")
    assert (msg["Reply-To"], msg["Subject"], msg["X-Campaign"]) == ("replies@origin.test", "Attachments ✓", "spring")
    assert msg["Message-ID"] == "<composed-1@origin.test>"
    assert (msg["In-Reply-To"], msg["References"]) == (
        "<parent@origin.test>",
        "<root@origin.test> <parent@origin.test>",
    )
    assert msg["Date"] == "Tue, 02 Jan 2024 03:04:05 +0000"

    assert msg.get_content_type() == "multipart/mixed"
    alternative, *attachments = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = alternative.iter_parts()
    assert text.get_content().strip() == "See the logo."
    assert related.get_content_type() == "multipart/related"
    html, logo = related.iter_parts()
    assert "cid:logo@origin.test" in html.get_content()
    assert (logo.get_content_type(), logo["Content-ID"], logo.get_content_disposition()) == (
        "image/png",
        "<logo@origin.test>",
        "inline",
    )
    assert logo.get_content() == PNG
    assert [(a.get_filename(), a.get_content_type(), a.get_content_disposition()) for a in attachments] == [
        ("report.pdf", "application/pdf", "attachment"),
        ("notes.txt", "text/plain", "attachment"),
        ("tiny.bin", "application/octet-stream", "attachment"),
    ]
    assert attachments[0].get_content() == PDF
    assert attachments[1].get_content() == "plain text, ü"
    assert attachments[2].get_content() == b"\x00\x01\x02\xff"
