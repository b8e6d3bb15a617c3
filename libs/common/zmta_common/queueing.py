"""The one way a message enters the queue, for every intake: SMTP, the HTTP API and DSNs.

:class:`~zmta_common.intake.MessageIntake` stores a message; :func:`queue` completes it
and then does what follows the same way for all of them: the counters
(``zonemta_message_push``, ``zonemta_message_drop``), the log line, and the wake-up of
the senders of each zone it was queued for. A caller only turns the outcome into its
protocol's answer (an SMTP reply, an HTTP status, an acknowledged bounce event).
"""

from __future__ import annotations

import logging

from . import metrics
from .bus import Bus, announce_queued
from .intake import IntakeError, MessageIntake, QueuedMessage

log = logging.getLogger(__name__)


async def queue(intake: MessageIntake, bus: Bus) -> QueuedMessage:
    """Finish ``intake``: the message is stored, counted, logged and announced.

    A refusal raises :class:`IntakeError` and a store failure its exception, both counted
    and logged here (see :func:`refused` and :func:`store_failed`). A message whose every
    recipient is suppressed is counted as dropped and returned: its client still gets the
    answer of a queued message."""
    try:
        queued = await intake.finish()
    except IntakeError as exc:
        refused(intake, exc)
        raise
    except Exception as exc:
        store_failed(intake, exc)
        raise
    interface = intake.envelope.interface
    if queued.dropped:
        metrics.message_drop.inc()
        log.info("dropped", extra={"id": queued.id, "suppressed": queued.suppressed, "interface": interface})
        return queued
    metrics.message_push.inc(result="success")
    log.info(
        "queued",
        extra={
            "id": queued.id,
            "zones": queued.zones,
            "size": queued.size,
            "interface": interface,
            "suppressed": queued.suppressed,
        },
    )
    await announce_queued(bus, queued.id, queued.zones)
    return queued


def refused(intake: MessageIntake, exc: IntakeError) -> None:
    """Count and log a message refused before it was queued (a rule, a plugin, its size)."""
    metrics.message_drop.inc()
    log.info("rejected", extra={"id": intake.id, "reply": exc.reply, "interface": intake.envelope.interface})


def store_failed(intake: MessageIntake, exc: BaseException) -> None:
    """Count and log a message the store could not take (its client is told to try again)."""
    metrics.message_push.inc(result="fail")
    metrics.message_drop.inc()
    log.warning("store failed", extra={"id": intake.id, "error": repr(exc), "interface": intake.envelope.interface})
