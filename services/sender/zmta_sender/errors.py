"""Failures of a delivery attempt that are not an SMTP reply."""

from __future__ import annotations


class DeliveryError(Exception):
    """An attempt failed before or outside an SMTP reply (DNS, network, TLS).

    ``permanent`` failures are rejected (bounced) at once; the others are deferred.
    """

    def __init__(self, message: str, category: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.category = category
        self.permanent = permanent
