"""Answers classify requests from senders over NATS."""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from zmta_common.events import CLASSIFY_SUBJECT, QUEUE_GROUP_BOUNCE, Classification, ClassifyRequest, SchemaError

from .classifier import Classifier

log = logging.getLogger(__name__)


class ClassifyResponder:
    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    async def start(self, nc: NATS) -> None:
        await nc.subscribe(CLASSIFY_SUBJECT, queue=QUEUE_GROUP_BOUNCE, cb=self.on_request)

    async def on_request(self, msg: Msg) -> None:
        try:
            request = ClassifyRequest.decode(msg.data)
        except SchemaError as exc:
            log.warning("bad classify request", extra={"error": str(exc)})
            reply = Classification(action="defer", category="other", message=f"unreadable request: {exc}")
        else:
            verdict = self.classifier.classify(request.code, request.text, request.stage)
            reply = Classification(action=verdict.action, category=verdict.category, message=verdict.message)
        await msg.respond(reply.encode())
