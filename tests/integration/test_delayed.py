"""Delayed delivery: a Date header in the future holds the message until then, within a limit."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from tests.support import DeploymentFactory


async def test_a_future_date_holds_the_first_attempt(deploy: DeploymentFactory) -> None:
    d = await deploy({"queue": {"max_future_date": 3600}}, senders={})
    now = datetime.now(UTC).replace(microsecond=0)
    held = {}
    for label, when in (
        ("soon", now + timedelta(minutes=1)),
        ("later", now + timedelta(minutes=30)),
        ("far", now + timedelta(days=3)),
    ):
        data = f"Date: {format_datetime(when)}\r\nSubject: {label}\r\n\r\nx\r\n".encode()
        reply = await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"{label}@a.test"], data)
        message_id = re.search(r"queued as ([0-9a-f]+)", reply).group(1)  # type: ignore[union-attr]
        (row,) = await d.store.deliveries_of(message_id)
        held[label] = row.next_attempt - now
    assert held["soon"] < timedelta(seconds=30)  # within 5 minutes: sent at once
    assert timedelta(minutes=29) < held["later"] <= timedelta(minutes=30)
    assert timedelta(minutes=59) < held["far"] <= timedelta(minutes=61)  # capped at max_future_date


async def test_future_dates_are_ignored_when_delayed_delivery_is_off(deploy: DeploymentFactory) -> None:
    d = await deploy(senders={})
    when = datetime.now(UTC) + timedelta(hours=2)
    reply = await asyncio.to_thread(
        d.smtp_send, "s@origin.test", ["x@a.test"], f"Date: {format_datetime(when)}\r\n\r\nx\r\n".encode()
    )
    message_id = re.search(r"queued as ([0-9a-f]+)", reply).group(1)  # type: ignore[union-attr]
    (row,) = await d.store.deliveries_of(message_id)
    assert row.next_attempt <= datetime.now(UTC)
