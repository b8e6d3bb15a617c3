"""A plugin that writes what a client (or a careless plugin) might: line breaks where a
header we write takes its value. Loaded by tests/e2e/test_injection.py to show that no bare
CR or LF reaches the next hop whatever the source."""

from __future__ import annotations

from typing import Any

from zmta_common.headers import HeaderBlock, HeaderField
from zmta_common.hooks import PluginApp

POISON = "probe.example\rX-Injected: yes\r.\r"


def init(app: PluginApp) -> None:
    def message_headers(envelope: Any, headers: HeaderBlock) -> None:
        envelope.transhost = POISON  # becomes the "from" of our Received header
        headers.add("X-Added", "one\rX-Injected: two")

    def sender_headers(delivery: Any, headers: HeaderBlock) -> None:
        # Past every helper: a raw field with bare line ends and a lone dot.
        headers.fields.append(HeaderField("x-raw", b"X-Raw: a\rX-Injected: three\n.\nend\r\n"))

    app.hook("message:headers", message_headers)
    app.hook("sender:headers", sender_headers)
