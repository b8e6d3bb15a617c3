"""International mail: SMTPUTF8 addresses and IDN domains, in and out."""

from __future__ import annotations

import asyncio
import smtplib

from tests.support import DeploymentFactory, eventually

SENDER = "отправитель@b.test"
RECIPIENT = "андрис@уайлддак.орг"
MESSAGE = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: Привет\r\n\r\nТекст письма\r\n".encode()


def submit(port: int, rcpt: str, utf8: bool = True) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        client.command_encoding = "utf-8"  # smtplib switches only when SMTPUTF8 is asked for
        code, text = client.mail(SENDER, ["SMTPUTF8", "BODY=8BITMIME"] if utf8 else [])
        if code != 250:
            return code, text
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(MESSAGE)


async def test_unicode_addresses_reach_an_smtputf8_server(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy(senders={"default": 1})
    code, _ = await asyncio.to_thread(submit, d.smtp_port, RECIPIENT)
    assert code == 250
    sink = sinks["127.0.0.2"]  # the MX of xn--80aalaxjd5d.xn--c1avg
    await eventually(lambda: sink.messages, what="the delivery to the IDN domain")
    (message,) = sink.messages
    assert message.mail_from == SENDER
    assert message.rcpt_tos == [RECIPIENT]
    assert "Текст письма".encode() in message.data


async def test_unicode_address_without_smtputf8_is_refused_at_intake(deploy: DeploymentFactory) -> None:
    d = await deploy(senders={})
    code, text = await asyncio.to_thread(submit, d.smtp_port, RECIPIENT, False)
    assert code == 553 and b"SMTPUTF8" in text


async def test_a_server_without_smtputf8_gets_a_clear_bounce(deploy: DeploymentFactory, sinks: dict) -> None:
    d = await deploy({"bounce": {"dsn": False}}, senders={"default": 1})
    sinks["127.0.0.5"].use_smtputf8(False)
    code, _ = await asyncio.to_thread(submit, d.smtp_port, "ivan@почта.испытание")
    assert code == 250
    log = d.log_dir / "queue.log"
    await eventually(lambda: '"event": "rejected"' in log.read_text(), what="the rejection")
    assert "does not support SMTPUTF8" in log.read_text()
    assert sinks["127.0.0.5"].messages == []
