"""The example plugin, loaded by import path from the config, in every service."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys

from tests.support import DeploymentFactory, eventually

PLUGIN = {
    "zmta_common.plugins.example": {
        "subject_prefix": "[ext]",
        "header": "X-Processed-By: example",
        "reject": {"closed@a.test": "551 5.7.1 This recipient is closed, write to open@a.test"},
    }
}


def submit(port: int) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("s@b.test")
        refused = client.rcpt("closed@a.test")
        accepted = client.rcpt("open@a.test")
        client.data(b"From: s@b.test\r\nSubject: hello\r\n\r\nbody\r\n")
        return refused, accepted


async def test_example_plugin_rewrites_headers_and_refuses_a_recipient(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"plugins": PLUGIN}, senders={"default": 1})
    refused, accepted = await asyncio.to_thread(submit, d.smtp_port)
    assert refused == (551, b"5.7.1 This recipient is closed, write to open@a.test")
    assert accepted[0] == 250
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="the delivery to the open recipient")
    (message,) = sink.messages
    assert message.rcpt_tos == ["open@a.test"]
    head = message.data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nSubject: [ext] hello" in head  # message:headers, at intake
    assert head.endswith(b"\r\nX-Processed-By: example")  # sender:headers, at send time
    stored_log = (d.log_dir / "ingest.log").read_text()
    assert '"event": "refused by a plugin"' in stored_log


async def test_a_plugin_that_cannot_be_imported_stops_the_service(deploy: DeploymentFactory) -> None:
    d = await deploy({"plugins": {"no_such.plugin": {}}}, start=False)
    process = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "zmta_queue", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert "plugin 'no_such.plugin' cannot be imported" in process.stderr
