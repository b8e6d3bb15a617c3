"""No bare CR or LF from a client, a plugin or the queue reaches the next hop."""

from __future__ import annotations

import asyncio
import re

from tests.smtpwire import SmtpWire
from tests.support import DeploymentFactory, eventually

BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def submit_after_a_poisoned_ehlo(port: int) -> tuple[int, int]:
    with SmtpWire(port) as wire:
        refused = wire.command("EHLO probe.example\rX-Injected: yes\r.\r")[0]
        assert wire.command("EHLO probe.example")[0] == 250
        assert wire.command("MAIL FROM:<s@origin.test>")[0] == 250
        assert wire.command("RCPT TO:<r@a.test>")[0] == 250
        assert wire.command("DATA")[0] == 354
        accepted = wire.command("Subject: hi\r\n\r\nbody\r\n.")[0]
    return refused, accepted


async def test_ehlo_with_a_bare_cr_never_reaches_the_next_hop(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy(senders={"default": 1})
    refused, accepted = await asyncio.to_thread(submit_after_a_poisoned_ehlo, d.smtp_port)
    assert (refused, accepted) == (501, 250)
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="the delivery")
    (message,) = sink.messages
    assert BARE_LINE_END.search(message.data) is None
    assert b"X-Injected" not in message.data
    assert message.data.startswith(b"Received: from probe.example ([127.0.0.1])\r\n")


async def test_poisoned_values_from_plugins_are_neutralised_on_the_wire(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"plugins": {"tests.poison_plugin": {}}}, senders={"default": 1})
    await asyncio.to_thread(d.smtp_send, "s@origin.test", ["r@a.test"], b"Subject: hi\r\n\r\nbody\r\n")
    sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="the delivery")
    (message,) = sink.messages
    head = message.data.split(b"\r\n\r\n", 1)[0]
    assert BARE_LINE_END.search(message.data) is None, head
    assert not re.search(rb"(^|\r\n)X-Injected", head), head  # never a field of its own
    assert not re.search(rb"\r\n\.\r\n", head)  # and no lone dot on a line
    assert head.startswith(b"Received: from probe.example?X-Injected: yes?.? ([127.0.0.1])\r\n")
    assert b"\r\nX-Added: one X-Injected: two\r\n" in head
    assert head.endswith(b"\r\nX-Raw: a X-Injected: three . end")
