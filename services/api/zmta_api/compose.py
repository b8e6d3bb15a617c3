"""A message in Nodemailer's JSON form becomes an RFC 5322 message (email.message).

The MIME tree is Nodemailer's: text and html as multipart/alternative, images with a
``cid`` in a multipart/related around the html, other attachments in multipart/mixed
around all of it. Contents come inline only (text, base64, hex... or a data: URI);
file paths and URLs are refused, as the original's API does.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, formataddr, getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from zmta_common.addresses import address_error
from zmta_common.headers import unsafe_character

from .models import AddressField, AddressObject, Attachment, SendRequest

# Headers with a field of their own, and the MIME structure: never taken from "headers".
OWN_FIELDS = {"from", "sender", "to", "cc", "bcc", "reply-to", "subject"}
STRUCTURE = {"content-type", "content-transfer-encoding", "mime-version", "content-disposition", "content-id"}
# Headers that "headers" may give unless their field is given too.
FIELD_OF_HEADER = {"message-id": "messageId", "date": "date", "in-reply-to": "inReplyTo", "references": "references"}

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable US-ASCII except ":" (RFC 5322 ftext)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 2045 token
# Values that become body content, not header text: line breaks are fine in them.
_CONTENT_PATHS = re.compile(r"^(text|html|attachments\.\d+\.(content|path))$")


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
            continue
        text = item.strip().strip(",").strip()  # a trailing comma is no address
        found = getaddresses([text]) if text else []
        # getaddresses() gives ('', '') for what it cannot read: never drop that silently.
        if ("", "") in found:
            raise ComposeError(field, f"{item!r} cannot be read as a list of addresses")
        pairs.extend((name, addr.strip()) for name, addr in found)
    for _, address in pairs:
        if reason := address_error(address):
            raise ComposeError(field, f"{address!r} is not a valid address: {reason}")
    return pairs


def compose(request: SendRequest, max_recipients: int = 1000) -> tuple[bytes, str, list[str]]:
    """The message bytes, the envelope sender and the envelope recipients (at most
    ``max_recipients``, counted before any work is done for each)."""
    _check_recipient_count(request, max_recipients)
    _check_strings(request.model_dump(by_alias=True, exclude_none=True))
    senders = parse_addresses(request.from_, "from")
    if len(senders) != 1:
        raise ComposeError("from", "exactly one sender address is needed")
    sender = parse_addresses(request.sender, "sender")
    to = parse_addresses(request.to, "to")
    cc = parse_addresses(request.cc, "cc")
    bcc = parse_addresses(request.bcc, "bcc")
    reply_to = parse_addresses(request.replyTo, "replyTo")
    mail_from, recipients = _envelope(request, senders[0][1], sender, to + cc + bcc)
    # An address that is not ASCII is written as UTF-8 (RFC 6532): encoded words are not
    # allowed in an address. Such mail goes out with SMTPUTF8 anyway.
    international = not all(address.isascii() for _, address in senders + sender + to + cc + reply_to)
    try:
        msg = _message(request, senders, sender, to, cc, reply_to)
        return msg.as_bytes(policy=SMTPUTF8 if international else SMTP), mail_from, recipients
    except ComposeError:
        raise
    except (ValueError, TypeError, IndexError, LookupError, MessageError) as exc:
        # Whatever the checks above missed that the email package cannot build: still the
        # client's input, so a 400 that says so, never a 500.
        raise ComposeError("body", f"the message cannot be built: {exc}") from None


def _message(
    request: SendRequest,
    senders: list[tuple[str, str]],
    sender: list[tuple[str, str]],
    to: list[tuple[str, str]],
    cc: list[tuple[str, str]],
    reply_to: list[tuple[str, str]],
) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _header_list(senders)
    if sender:
        msg["Sender"] = _header_list(sender)
    if to:
        msg["To"] = _header_list(to)
    if cc:
        msg["Cc"] = _header_list(cc)
    if reply_to:
        msg["Reply-To"] = _header_list(reply_to)
    msg["Subject"] = request.subject
    if request.messageId is not None:
        msg["Message-ID"] = _msg_id(request.messageId, "messageId")
    if request.date is not None:
        msg["Date"] = _date(request.date)
    if request.inReplyTo is not None:
        msg["In-Reply-To"] = _msg_id(request.inReplyTo, "inReplyTo")
    if request.references is not None:
        refs = request.references.split() if isinstance(request.references, str) else request.references
        if refs:
            msg["References"] = " ".join(_msg_id(ref, "references") for ref in refs)
    if request.priority in ("high", "low"):
        high = request.priority == "high"
        msg["X-Priority"] = "1 (Highest)" if high else "5 (Lowest)"
        msg["X-MSMail-Priority"] = "High" if high else "Low"
        msg["Importance"] = "High" if high else "Low"
    for name, value in _custom_headers(request):
        try:
            msg[name] = value
        except (ValueError, TypeError, IndexError, MessageError) as exc:
            raise ComposeError("headers", f"{name}: {exc}") from None
    _set_body(msg, request)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # the email package puts one on every part it makes; the top one does
    return msg


def _check_recipient_count(request: SendRequest, limit: int) -> None:
    """Refuse more than ``limit`` recipients before any other work is done for each of them
    (parsing stops at the first field that goes over)."""
    env = request.envelope
    fields: list[tuple[str, AddressField | None]] = [("to", request.to), ("cc", request.cc), ("bcc", request.bcc)]
    if env is not None and (env.to is not None or env.cc is not None or env.bcc is not None):
        fields = [("envelope.to", env.to), ("envelope.cc", env.cc), ("envelope.bcc", env.bcc)]
    count = 0
    for name, value in fields:
        for item in value if isinstance(value, list) else [value] if value is not None else []:
            count += sum(1 for _, addr in getaddresses([item]) if addr) if isinstance(item, str) else 1
            if count > limit:
                raise ComposeError(name, f"too many recipients: at most {limit} per message")


def _envelope(
    request: SendRequest, from_address: str, sender: list[tuple[str, str]], header_rcpts: list[tuple[str, str]]
) -> tuple[str, list[str]]:
    """MAIL FROM (envelope.from, else sender, else from) and RCPT TO (envelope.to/cc/bcc, else to/cc/bcc)."""
    mail_from = sender[0][1] if sender else from_address
    rcpts = header_rcpts
    env = request.envelope
    if env is not None:
        if env.from_ == "":
            mail_from = ""  # the null reverse-path, as a bounce has
        elif env.from_ is not None:
            given = parse_addresses(env.from_, "envelope.from")
            if len(given) != 1:
                raise ComposeError("envelope.from", "exactly one address is needed")
            mail_from = given[0][1]
        if env.to is not None or env.cc is not None or env.bcc is not None:
            rcpts = [
                *parse_addresses(env.to, "envelope.to"),
                *parse_addresses(env.cc, "envelope.cc"),
                *parse_addresses(env.bcc, "envelope.bcc"),
            ]
    recipients = list(dict.fromkeys(addr for _, addr in rcpts))
    if not recipients:
        where = "envelope.to" if env is not None and env.to is not None else "to"
        raise ComposeError(where, "at least one recipient in to, cc or bcc is needed")
    return mail_from, recipients


def _custom_headers(request: SendRequest) -> list[tuple[str, str]]:
    if isinstance(request.headers, dict):
        pairs = [
            (name, item)
            for name, value in request.headers.items()
            for item in (value if isinstance(value, list) else [value])
        ]
    else:
        pairs = [(line.key, line.value) for line in request.headers]
    given = {field for field in FIELD_OF_HEADER.values() if getattr(request, field) is not None}
    for name, _ in pairs:
        key = name.strip().lower()
        if not _HEADER_NAME.match(name):
            raise ComposeError("headers", f"{name!r} is not a header name")
        if key in OWN_FIELDS:
            raise ComposeError("headers", f"{name} must be given as its own field")
        if key in STRUCTURE:
            raise ComposeError("headers", f"{name} is set from the body and the attachments")
        if FIELD_OF_HEADER.get(key) in given:
            raise ComposeError("headers", f"{name} is given as {FIELD_OF_HEADER[key]} already")
    return pairs


def _set_body(msg: EmailMessage, request: SendRequest) -> None:
    html_part: EmailMessage | None = None
    if request.html is not None and request.text is not None:
        msg.set_content(request.text)
        msg.add_alternative(request.html, subtype="html")
        html_part = msg.get_payload()[1]  # type: ignore[index,assignment]
    elif request.html is not None:
        msg.set_content(request.html, subtype="html")
        html_part = msg
    else:
        msg.set_content(request.text or "")
    parts = [_attachment(att, f"attachments.{i}") for i, att in enumerate(request.attachments)]
    # Inline images go next to the html they belong to, the rest into multipart/mixed.
    for related, data, kwargs in parts:
        if related and html_part is not None:
            html_part.add_related(data, **kwargs)
    for related, data, kwargs in parts:
        if not (related and html_part is not None):
            msg.add_attachment(data, **kwargs)


def _attachment(att: Attachment, field: str) -> tuple[bool, bytes, dict[str, Any]]:
    """(goes with the html, content, keyword arguments of add_related/add_attachment)."""
    data, media_type = _attachment_content(att, field)
    content_type = att.contentType or media_type
    if content_type is None:
        guessed = mimetypes.guess_type(att.filename or "")[0]
        content_type = guessed or "application/octet-stream"
    maintype, subtype, params = _content_type(content_type, f"{field}.contentType")
    if att.content is not None and att.encoding is None and maintype == "text":
        params.setdefault("charset", "utf-8")
    kwargs: dict[str, Any] = {"maintype": maintype, "subtype": subtype}
    if params:
        kwargs["params"] = params
    if att.filename:
        kwargs["filename"] = att.filename
    if att.cid is not None:
        cid = att.cid.strip().strip("<>")
        if not cid or any(c in cid for c in " <>\t"):
            raise ComposeError(f"{field}.cid", f"{att.cid!r} is not a content id")
        kwargs["cid"] = f"<{cid}>"
    kwargs["disposition"] = att.contentDisposition or ("inline" if att.cid is not None else "attachment")
    return att.cid is not None, data, kwargs


def _attachment_content(att: Attachment, field: str) -> tuple[bytes, str | None]:
    """The attachment's bytes and, for a data: URI, the media type it names."""
    if att.href is not None:
        raise ComposeError(f"{field}.href", "URLs are not fetched: give the content inline (base64)")
    if att.path is not None:
        if not att.path.startswith("data:"):
            raise ComposeError(f"{field}.path", "file paths are not read: give the content inline (base64)")
        if att.content is not None:
            raise ComposeError(f"{field}.path", "give either content or a data: URI as path, not both")
        return _data_uri(att.path, f"{field}.path")
    if att.content is None:
        raise ComposeError(f"{field}.content", "the content is missing")
    content, encoding = att.content, (att.encoding or "utf-8").lower()
    try:
        if encoding in ("base64", "base64url"):
            compact = re.sub(r"\s+", "", content)
            compact += "=" * (-len(compact) % 4)
            if encoding == "base64url":
                return base64.urlsafe_b64decode(compact.encode("ascii")), None
            return base64.b64decode(compact.encode("ascii"), validate=True), None
        if encoding == "hex":
            return bytes.fromhex(content), None
        if encoding in ("binary", "latin1"):
            return content.encode("latin-1"), None
        if encoding == "ascii":
            return content.encode("ascii"), None
        return content.encode("utf-8"), None
    except (ValueError, binascii.Error, UnicodeError):
        raise ComposeError(f"{field}.content", f"the content is not valid {encoding}") from None


def _data_uri(uri: str, field: str) -> tuple[bytes, str | None]:
    head, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise ComposeError(field, "a data: URI needs a comma before its data")
    pieces = [p.strip() for p in head.split(";")]
    is_base64 = pieces[-1].lower() == "base64"
    if is_base64:
        pieces.pop()
    media_type = pieces[0] if pieces and pieces[0] else None
    if media_type is not None and len(pieces) > 1:
        media_type = "; ".join(pieces)
    try:
        if is_base64:
            compact = re.sub(r"\s+", "", payload)
            compact += "=" * (-len(compact) % 4)
            return base64.b64decode(unquote_to_bytes(compact), validate=True), media_type
        return unquote_to_bytes(payload), media_type
    except (ValueError, binascii.Error):
        raise ComposeError(field, "the data: URI does not hold valid base64") from None


def _content_type(value: str, field: str) -> tuple[str, str, dict[str, str]]:
    main, *rest = value.split(";")
    maintype, slash, subtype = main.strip().lower().partition("/")
    if not slash or not _TOKEN.match(maintype) or not _TOKEN.match(subtype):
        raise ComposeError(field, f"{value!r} is not a content type")
    if maintype == "multipart":
        raise ComposeError(field, "an attachment cannot be multipart")
    params: dict[str, str] = {}
    for piece in rest:
        key, eq, val = piece.partition("=")
        if not eq or not _TOKEN.match(key.strip()):
            raise ComposeError(field, f"{piece.strip()!r} is not a parameter")
        params[key.strip().lower()] = val.strip().strip('"')
    return maintype, subtype, params


def _msg_id(value: str, field: str) -> str:
    ident = value.strip()
    if ident.startswith("<") and ident.endswith(">"):
        ident = ident[1:-1]
    if not ident or any(c.isspace() or c in "<>" for c in ident):
        raise ComposeError(field, f"{value!r} is not a message id")
    return f"<{ident}>"


def _date(value: str) -> str:
    moment: datetime | None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        moment = None
    if moment is None:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ComposeError("date", f"{value!r} is not a date (RFC 5322 or ISO 8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_datetime(moment)


def _check_strings(value: object, path: str = "") -> None:
    """Every string is valid Unicode, and none that goes into a header has a line break."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path or "headers")  # keys: header names
            _check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}.{index}" if path else str(index))
    elif isinstance(value, str):
        field = "headers" if path.startswith("headers") else path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ComposeError(field, "the value is not valid Unicode (it holds a lone surrogate)") from None
        if not _CONTENT_PATHS.match(path) and unsafe_character(value) is not None:
            shown = value if len(value) <= 60 else value[:57] + "..."
            raise ComposeError(field, f"{shown!r} has a line break or control character where none may be")


def _header_list(pairs: list[tuple[str, str]]) -> str:
    out = []
    for name, address in pairs:
        if address.isascii():
            out.append(formataddr((name, address)) if name else address)
        else:  # internationalised address: keep it as UTF-8 (SMTPUTF8)
            local, _, domain = address.rpartition("@")
            out.append(str(Address(display_name=name, username=local, domain=domain)))
    return ", ".join(out)
