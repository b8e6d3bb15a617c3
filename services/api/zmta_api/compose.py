"""A message in Nodemailer's JSON form becomes an RFC 5322 message (email.message)."""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, getaddresses

from zmta_common.addresses import address_error

from .models import AddressField, AddressObject, SendRequest


class ComposeError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_addresses(value: AddressField | None, field: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of one address field, each address checked."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    pairs: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, AddressObject):
            pairs.append((item.name, item.address.strip()))
        else:
            pairs.extend((name, addr.strip()) for name, addr in getaddresses([item]) if name or addr)
    for _, address in pairs:
        if reason := address_error(address):
            raise ComposeError(field, f"{address!r} is not a valid address: {reason}")
    return pairs


def compose(request: SendRequest) -> tuple[bytes, str, list[str]]:
    """The message bytes, the envelope sender and the envelope recipients."""
    senders = parse_addresses(request.from_, "from")
    if len(senders) != 1:
        raise ComposeError("from", "exactly one sender address is needed")
    to = parse_addresses(request.to, "to")
    cc = parse_addresses(request.cc, "cc")
    bcc = parse_addresses(request.bcc, "bcc")
    recipients = list(dict.fromkeys(addr for _, addr in to + cc + bcc))
    if not recipients:
        raise ComposeError("to", "at least one recipient in to, cc or bcc is needed")

    msg = EmailMessage(policy=SMTP)
    msg["From"] = _header_list(senders)
    if to:
        msg["To"] = _header_list(to)
    if cc:
        msg["Cc"] = _header_list(cc)
    msg["Subject"] = request.subject
    for name, value in request.headers.items():
        if name.lower() in {"from", "to", "cc", "bcc", "subject"}:
            raise ComposeError("headers", f"{name} must be given as its own field")
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ComposeError("headers", f"{name!r} has a line break or colon where none may be")
        msg[name] = value
    if request.html is not None and request.text is not None:
        msg.set_content(request.text)
        msg.add_alternative(request.html, subtype="html")
    elif request.html is not None:
        msg.set_content(request.html, subtype="html")
    else:
        msg.set_content(request.text or "")
    return msg.as_bytes(), senders[0][1], recipients


def _header_list(pairs: list[tuple[str, str]]) -> str:
    out = []
    for name, address in pairs:
        if address.isascii():
            out.append(formataddr((name, address)) if name else address)
        else:  # internationalised address: keep it as UTF-8 (SMTPUTF8)
            local, _, domain = address.rpartition("@")
            out.append(str(Address(display_name=name, username=local, domain=domain)))
    return ", ".join(out)
