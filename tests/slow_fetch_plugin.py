"""A plugin that holds a delivery for a few seconds at ``sender:fetch`` (recipients whose
local part starts with "slow"), after the sender has confirmed its lease and before it
touches Redis: the window tests/e2e/test_outcomes.py needs to take Redis away."""

from __future__ import annotations

import asyncio
from typing import Any

from zmta_common.hooks import PluginApp


def init(app: PluginApp) -> None:
    seconds = float(app.options.get("seconds", 3.0))

    async def sender_fetch(delivery: Any) -> None:
        if delivery.recipient.startswith("slow"):
            app.log.warning("fetch held", extra={"id": delivery.id})
            await asyncio.sleep(seconds)

    app.hook("sender:fetch", sender_fetch)
