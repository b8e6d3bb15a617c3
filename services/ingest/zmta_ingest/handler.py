"""What an ingest interface decides about a transaction: senders, recipients, storing."""

from __future__ import annotations

import logging

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from zmta_common import metrics
from zmta_common.addresses import address_error
from zmta_common.bus import Bus, announce_queued
from zmta_common.config import Config, SmtpInterface
from zmta_common.intake import Envelope, IntakeError, MessageIntake
from zmta_common.store import Store

log = logging.getLogger(__name__)


class IngestHandler:
    def __init__(self, config: Config, name: str, store: Store, bus: Bus) -> None:
        self.config = config
        self.name = name
        self.interface: SmtpInterface = config.smtp_interfaces[name]
        self.store = store
        self.bus = bus

    async def handle_EHLO(
        self, server: object, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order but does not say so.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    def check_sender(self, address: str) -> str | None:
        if address and (reason := address_error(address)):
            return f"553 5.1.7 <{address}> is not a valid RFC 5321 address: {reason}"
        return None

    def check_recipient(self, accepted: list[str], address: str) -> str | None:
        if len(accepted) >= self.interface.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.interface.max_recipients})"
        if not address:
            return "501 5.1.3 Empty recipient address"
        if reason := address_error(address):
            return f"553 5.1.3 <{address}> is not a valid RFC 5321 address: {reason}"
        return None

    def open_intake(self, session: Session, envelope: SmtpEnvelope, max_size: int | None) -> MessageIntake:
        peer = session.peer
        origin = peer[0] if isinstance(peer, tuple) else str(peer or "")
        return MessageIntake(
            self.store,
            self.config,
            Envelope(
                mail_from=envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                interface=self.name,
                transtype="ESMTP" if session.extended_smtp else "SMTP",
                origin=origin,
                originhost=f"[{origin}]",
                transhost=session.host_name or "",
                allow_routing_headers=self.interface.allow_routing_headers,
            ),
            max_size or self.interface.max_size,
        )

    async def finish(self, intake: MessageIntake) -> str:
        try:
            queued = await intake.finish()
        except IntakeError as exc:
            metrics.message_drop.inc()
            log.info("rejected", extra={"id": intake.id, "reply": exc.reply})
            return exc.reply
        except Exception as exc:  # the store is down or failed: the client must retry
            return self.store_failure(intake, exc)
        if queued.dropped:
            metrics.message_drop.inc()
            log.info("dropped", extra={"id": queued.id, "suppressed": queued.suppressed, "interface": self.name})
            return f"250 2.0.0 Message queued as {queued.id}"  # suppressed: dropped without a word
        metrics.message_push.inc(result="success")
        log.info(
            "queued",
            extra={
                "id": queued.id,
                "zones": queued.zones,
                "size": queued.size,
                "interface": self.name,
                "suppressed": queued.suppressed,
            },
        )
        await announce_queued(self.bus, queued.id, queued.zones)
        return f"250 2.0.0 Message queued as {queued.id}"

    def store_failure(self, intake: MessageIntake, exc: BaseException) -> str:
        metrics.message_push.inc(result="fail")
        metrics.message_drop.inc()
        log.warning("store failed", extra={"id": intake.id, "error": repr(exc)})
        return "451 4.3.0 Temporary failure while storing the message, try again later"
