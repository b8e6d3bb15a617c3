"""An example plugin: the smallest useful one, and the one docs/configuration.md walks through.

Enable it with::

    plugins:
      zmta_common.plugins.example:
        enabled: true
        subject_prefix: "[ext]"          # rewrite Subject at intake
        header: "X-Processed-By: example"  # add a header at send time
        reject:                          # refuse these recipients at RCPT TO
          blocked@example.com: "550 5.7.1 This recipient is closed"
"""

from __future__ import annotations

from typing import Any

from zmta_common.headers import HeaderBlock
from zmta_common.hooks import PluginApp, Reject


def init(app: PluginApp) -> None:
    prefix = str(app.options.get("subject_prefix", ""))
    header = str(app.options.get("header", ""))
    refused = {str(k).lower(): str(v) for k, v in dict(app.options.get("reject", {})).items()}

    def rcpt_to(envelope: Any, address: str) -> None:
        reply = refused.get(address.lower())
        if reply:
            code, _, text = reply.partition(" ")
            raise Reject(int(code), text)

    def message_headers(envelope: Any, headers: HeaderBlock) -> None:
        subject = headers.get("subject")
        if prefix and subject is not None and not subject.strip().startswith(prefix):
            headers.set("Subject", f"{prefix} {subject.strip()}")

    def sender_headers(delivery: Any, headers: HeaderBlock) -> None:
        name, _, value = header.partition(":")
        headers.add(name.strip(), value.strip())

    if refused:
        app.hook("smtp:rcpt_to", rcpt_to)
    if prefix:
        app.hook("message:headers", message_headers)
    if header:
        app.hook("sender:headers", sender_headers)
