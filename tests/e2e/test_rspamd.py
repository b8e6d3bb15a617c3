"""The Rspamd plugin against a real rspamd: GTUBE is refused, clean mail is marked and
delivered, and a missing rspamd never blocks mail unless told to (on_error: defer)."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support import Deployment, DeploymentFactory, eventually
from zmta_common.config import Config, Plugin
from zmta_common.headers import HeaderBlock
from zmta_common.hooks import Reject, load
from zmta_common.intake import Envelope
from zmta_devtools.servers import RspamdServer, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("rspamd") is None, reason="rspamd is not installed (make setup installs it)"
)

PLUGIN = "zmta_common.plugins.rspamd"
# GTUBE and rspamd's test variants of it (test patterns are on in RspamdServer's config).
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = b"Y" + GTUBE[1:]
GTUBE_REWRITE_SUBJECT = b"Z" + GTUBE[1:]
# A rule of our own for the one action the patterns lack.
SOFT_REJECT_RULE = """
rspamd_config:register_symbol({
  name = 'ZMTA_TEST_SOFT_REJECT',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local subject = task:get_subject() or ''
    if subject:find('please soft reject', 1, true) then
      task:set_pre_result('soft reject', 'Try again later (test)')
    end
  end
})
"""


@pytest.fixture(scope="module")
def rspamd() -> Iterator[RspamdServer]:
    server = RspamdServer(lua=SOFT_REJECT_RULE)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def message(subject: str, body: bytes = b"Hello, this is a perfectly ordinary message.") -> bytes:
    return b"From: Sender <s@b.test>\r\nTo: x@a.test\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body + b"\r\n"


def submit(port: int, data: bytes, rcpt: str = "x@a.test") -> tuple[int, str]:
    """The reply to the end of DATA (what smtplib's sendmail would raise on)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("s@b.test")
        code, text = client.rcpt(rcpt)
        assert code == 250, (code, text)
        code, text = client.data(data)
        return code, text.decode()


async def stored_messages(d: Deployment) -> int:
    return int(await d.store.pool.fetchval("SELECT count(*) FROM messages"))


def head_of(data: bytes) -> HeaderBlock:
    return HeaderBlock.parse(data.split(b"\r\n\r\n", 1)[0] + b"\r\n")


async def test_spam_is_refused_and_clean_mail_is_marked(
    deploy: DeploymentFactory, sinks: dict, rspamd: RspamdServer
) -> None:
    options = {"url": rspamd.url, "subject_prefix": "[SPAM {score}]"}
    d = await deploy({"plugins": {PLUGIN: options}}, senders={"default": 1})
    sink = sinks["127.0.0.2"]

    code, text = await asyncio.to_thread(submit, d.smtp_port, message("buy now", GTUBE))
    assert (code, text) == (550, "5.7.1 Message rejected as spam")
    code, text = await asyncio.to_thread(submit, d.smtp_port, message("please soft reject"))
    assert (code, text) == (451, "4.7.1 Try again later")
    assert await stored_messages(d) == 0

    clean = await asyncio.to_thread(submit, d.smtp_port, message("hello"))
    marked = await asyncio.to_thread(submit, d.smtp_port, message("offer", GTUBE_ADD_HEADER))
    rewritten = await asyncio.to_thread(submit, d.smtp_port, message("deal", GTUBE_REWRITE_SUBJECT))
    assert [clean[0], marked[0], rewritten[0]] == [250, 250, 250]
    await eventually(lambda: len(sink.messages) == 3, what="the three accepted messages")
    heads = {head_of(m.data).get("subject"): head_of(m.data) for m in sink.messages}
    assert set(heads) == {"hello", "offer", "[SPAM 8.00] deal"}
    assert heads["hello"].get("x-zone-spam-status") == "no action score=0.00/15.00 []"
    assert heads["hello"].get("x-zone-spam-resolution") == "no action"
    assert not heads["hello"].has("x-spam")
    assert heads["offer"].get("x-zone-spam-status") == "add header score=6.00/15.00 [GTUBE=0.00]"
    assert heads["offer"].get("x-spam") == "Yes"
    assert heads["[SPAM 8.00] deal"].get("x-zone-spam-resolution") == "rewrite subject"
    assert heads["[SPAM 8.00] deal"].get("x-spam") == "Yes"

    # rspamd was told the envelope: its log line for the clean message names them.
    queue_id = re.search(r"queued as ([0-9a-f]+)", clean[1])
    assert queue_id, clean
    logged = [line for line in rspamd.log_path.read_text().splitlines() if f"qid: <{queue_id.group(1)}>" in line]
    assert logged, rspamd.tail_log()
    assert "ip: 127.0.0.1" in logged[0] and "from: <s@b.test>" in logged[0] and "rcpts: <x@a.test>" in logged[0]


async def test_an_unreachable_rspamd_never_blocks_mail_by_default(deploy: DeploymentFactory, sinks: dict) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    d = await deploy({"plugins": {PLUGIN: {"url": url, "timeout": 2}}}, senders={"default": 1})
    code, _ = await asyncio.to_thread(submit, d.smtp_port, message("still flows", GTUBE))
    assert code == 250
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="the unscanned message")
    assert not head_of(sink.messages[0].data).has("x-zone-spam-status")


async def test_on_error_defer_answers_451_and_large_messages_are_not_scanned(
    deploy: DeploymentFactory, sinks: dict
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    options = {"url": url, "timeout": 2, "on_error": "defer", "max_size": 2000}
    d = await deploy({"plugins": {PLUGIN: options}}, senders={"default": 1})
    code, text = await asyncio.to_thread(submit, d.smtp_port, message("deferred"))
    assert (code, text) == (451, "4.7.1 Spam check unavailable, try again later")
    assert await stored_messages(d) == 0
    # Over max_size rspamd is not asked at all, so its absence does not matter.
    code, _ = await asyncio.to_thread(submit, d.smtp_port, message("big", b"\r\n".join([b"x" * 70] * 40)))
    assert code == 250
    await eventually(lambda: sinks["127.0.0.2"].messages, what="the large message")


# The handler itself, without a deployment: the options that change what it does.


class Body:
    def __init__(self, data: bytes, queue_id: str = "") -> None:
        self.data = data
        self.size = len(data)
        self.queue_id = queue_id

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 7):  # many small pieces: the request is streamed
            yield self.data[i : i + 7]


async def scan(options: dict[str, Any], body: bytes, subject: str = "hi") -> HeaderBlock:
    plugin = Plugin.model_validate({"on_error": "defer", **options})  # no failure unseen
    hooks = load(Config(plugins={PLUGIN: plugin}), "ingest")
    headers = HeaderBlock.parse(f"From: s@b.test\r\nSubject: {subject}\r\nX-Zone-Spam-Status: forged\r\n".encode())
    envelope = Envelope(
        "s@b.test", ["x@a.test", "δοκιμή@уайлддак.орг"], "feeder", "ESMTP", origin="192.0.2.1", user="bob"
    )
    await hooks.run("message:store", envelope, headers, Body(body + b"\r\n", "abc123"))
    return headers


async def test_reject_spam_off_only_marks_and_rspamd_subject_is_used(rspamd: RspamdServer) -> None:
    headers = await scan({"url": rspamd.url, "reject_spam": False}, GTUBE)
    assert headers.get("x-spam") == "Yes"
    assert headers.get_all("x-zone-spam-status") == ["reject score=15.00/15.00 [GTUBE=0.00]"]
    # Without subject_prefix, the subject rspamd proposes (its default "*** SPAM *** %s").
    headers = await scan({"url": rspamd.url}, GTUBE_REWRITE_SUBJECT, subject="hi there")
    assert headers.get("subject") == "*** SPAM *** hi there"
    with pytest.raises(Reject) as refused:
        await scan({"url": rspamd.url}, GTUBE)
    assert refused.value.reply == "550 5.7.1 Message rejected as spam"


def test_the_plugin_stays_out_of_services_that_store_nothing(rspamd: RspamdServer) -> None:
    config = Config(plugins={PLUGIN: Plugin.model_validate({"url": rspamd.url})})
    for service in ("queue", "sender", "bounce"):
        assert not load(config, service).has("message:store")
    assert load(config, "api").has("message:store")
