"""Which sending zone each recipient of a message goes through.

Precedence, as the original documents it: the ``X-Sending-Zone`` header (only on
interfaces that allow routing headers), then a zone's ``routing_headers``, then
its ``sender_domains`` (envelope sender's domain), then ``recipient_domains`` (per
recipient, so one message can fan out to several zones), else the default zone.
A zone that is named but does not exist is an error, never a silent default.
"""

from __future__ import annotations

from .config import Config
from .domains import domain_of
from .headers import HeaderBlock

ZONE_HEADER = "x-sending-zone"


class UnknownZoneError(ValueError):
    def __init__(self, zone: str) -> None:
        super().__init__(f"sending zone {zone!r} does not exist")
        self.zone = zone


def message_zone(config: Config, headers: HeaderBlock, mail_from: str, allow_header: bool) -> str | None:
    """The zone chosen for the whole message, or None when it is up to each recipient."""
    if allow_header:
        named = headers.get(ZONE_HEADER)
        if named:
            zone = named.strip().lower()
            if zone not in config.zones:
                raise UnknownZoneError(zone)
            return zone
    for name, zone_cfg in config.zones.items():
        for key, wanted in zone_cfg.routing_headers.items():
            # The bottom-most field of that name decides, as in the original.
            values = headers.get_all(key)
            if values and values[-1].strip().lower() == wanted.lower():
                return name
    sender_domain = domain_of(mail_from) if mail_from else ""
    if sender_domain:
        for name, zone_cfg in config.zones.items():
            if sender_domain in zone_cfg.sender_domains:
                return name
    return None


def recipient_zone(config: Config, recipient: str) -> str:
    domain = domain_of(recipient)
    for name, zone_cfg in config.zones.items():
        if domain in zone_cfg.recipient_domains:
            return name
    return config.queue.default_zone


def route(config: Config, headers: HeaderBlock, mail_from: str, recipients: list[str], allow_header: bool) -> list[str]:
    """The zone of each recipient, in the order given."""
    zone = message_zone(config, headers, mail_from, allow_header)
    if zone is not None:
        return [zone] * len(recipients)
    return [recipient_zone(config, r) for r in recipients]
