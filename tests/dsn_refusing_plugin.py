"""A plugin that refuses every DSN for good at ``message:headers`` (the hooks of intake run
for DSNs too). Loaded by tests/e2e/test_bounces.py: such an event must end, not loop."""

from __future__ import annotations

from typing import Any

from zmta_common.headers import HeaderBlock
from zmta_common.hooks import PluginApp, Reject


def init(app: PluginApp) -> None:
    def message_headers(envelope: Any, headers: HeaderBlock) -> None:
        if envelope.interface == "bounce":
            raise Reject(550, "5.7.1 No delivery status notifications here")

    app.hook("message:headers", message_headers)
