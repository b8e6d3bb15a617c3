"""What ``sender:*`` plugin hooks see of a delivery, and may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class DeliveryContext:
    id: str
    seq: str
    zone: str
    recipient: str
    domain: str
    mail_from: str
    meta: dict[str, Any] = field(default_factory=dict)
    # Set (by a plugin or the domain's ``http_url``) to POST the message there instead of SMTP.
    http_url: str | None = None
