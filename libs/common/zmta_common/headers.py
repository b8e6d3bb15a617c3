"""The top-level header block of a message, kept byte for byte.

Why not ``email.message``: parsing and re-serialising through the ``email`` package
re-folds and re-encodes header lines, and a relay must pass them on exactly as
received (a DKIM signature made upstream breaks on any change). So the block is
split into raw fields here, which is all the editing we need (drop a field, add
one); values are decoded with ``email.headerregistry``/``email.utils`` where we read
them.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass

_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# What may never stand in a header value we write: C0 controls but TAB (CR and LF among
# them), DEL, C1 controls (U+0085 among them) and the Unicode line and paragraph
# separators, which some software takes for a line end.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# In a value we are given whole: a CRLF that folds the field (followed by a space or a
# tab) is kept, any other unsafe character is not.
_UNSAFE_OR_FOLD = re.compile(r"\r\n(?=[ \t])|[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A CR or LF that is not part of a CRLF pair.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# The longest value copied from a client into a header of ours (an EHLO name, a user name).
CLIENT_VALUE_LIMIT = 255


@dataclass(slots=True)
class HeaderField:
    """One header field: its lower-cased name and its raw lines (CRLF included)."""

    key: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value as text (undecodable bytes kept as surrogates)."""
        _, _, value = self.raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n([ \t])", r"\1", text).strip()

    @property
    def line(self) -> str:
        """The whole field unfolded into one line, as the original's ``/message`` shows it."""
        text = self.raw.decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n([ \t])", r"\1", text).rstrip("\r\n")


def unsafe_character(value: str) -> str | None:
    """The first character of ``value`` that may not stand in a header value, if any."""
    match = _UNSAFE.search(value)
    return match.group(0) if match else None


def header_safe(value: str, limit: int = CLIENT_VALUE_LIMIT) -> str:
    """``value`` fit to copy into a header we write: every unsafe character (line ends and
    other controls) replaced by ``?``, as Postfix does, and cut to ``limit`` characters."""
    return _UNSAFE.sub("?", value[:limit])


def without_bare_line_ends(block: bytes) -> bytes:
    """A header block in which every CR and LF belongs to a CRLF pair: a bare one becomes a
    space. The last guard before a block goes on the wire: a bare line end could start a
    field, or put a lone dot on a line, for a receiver that reads it as a line end."""
    if block.count(b"\r") == block.count(b"\n") == block.count(b"\r\n"):
        return block  # the common case: nothing to do
    return _BARE_LINE_END.sub(b" ", block)


def _field(name: str, value: str) -> bytes:
    """One header field that we write, with a name that is one and a value without line
    breaks or control characters (a CRLF that folds it is kept)."""
    if not _FIELD_NAME.match(name.encode("utf-8", "surrogateescape") + b":"):
        raise ValueError(f"{name!r} is not a header field name")
    clean = _UNSAFE_OR_FOLD.sub(lambda m: m.group(0) if m.group(0) == "\r\n" else " ", value)
    return f"{name}: {clean}\r\n".encode("utf-8", "surrogateescape")


def is_field_start(line: bytes) -> bool:
    return bool(_FIELD_NAME.match(line))


def is_continuation(line: bytes) -> bool:
    return line[:1] in (b" ", b"\t")


class HeaderBlock:
    """An ordered list of raw header fields that can be edited and serialised again."""

    def __init__(self, fields: Iterable[HeaderField] = ()) -> None:
        self.fields: list[HeaderField] = list(fields)

    @classmethod
    def parse(cls, block: bytes) -> HeaderBlock:
        """Split a CRLF header block (without the blank line that ends it) into fields."""
        fields: list[HeaderField] = []
        for line in block.splitlines(keepends=True):
            if fields and is_continuation(line):
                fields[-1].raw += line
                continue
            match = _FIELD_NAME.match(line)
            if match is None:
                continue  # not a header line; the intake never puts one here
            fields.append(HeaderField(match.group(1).decode("ascii").lower(), line))
        return cls(fields)

    def get(self, key: str) -> str | None:
        """The value of the first field named ``key``."""
        key = key.lower()
        for f in self.fields:
            if f.key == key:
                return f.value
        return None

    def get_all(self, key: str) -> list[str]:
        key = key.lower()
        return [f.value for f in self.fields if f.key == key]

    def has(self, key: str) -> bool:
        key = key.lower()
        return any(f.key == key for f in self.fields)

    def remove(self, key: str) -> int:
        key = key.lower()
        before = len(self.fields)
        self.fields = [f for f in self.fields if f.key != key]
        return before - len(self.fields)

    def add(self, name: str, value: str, top: bool = False) -> None:
        field = HeaderField(name.lower(), _field(name, value))
        if top:
            self.fields.insert(0, field)
        else:
            self.fields.append(field)

    def set(self, name: str, value: str) -> None:
        """Replace the first field named ``name`` where it stands (dropping any others), or add it."""
        key = name.lower()
        field = HeaderField(key, _field(name, value))
        at = next((i for i, f in enumerate(self.fields) if f.key == key), None)
        if at is None:
            self.fields.append(field)
            return
        self.fields = [f for i, f in enumerate(self.fields) if f.key != key or i == at]
        self.fields[at] = field

    def to_bytes(self) -> bytes:
        return b"".join(f.raw for f in self.fields)

    def addresses(self, key: str) -> list[str]:
        """Bare addresses named in every field ``key`` (To, Cc, Bcc, From...)."""
        values = self.get_all(key)
        return [addr for _, addr in email.utils.getaddresses(values) if addr]

    def as_list(self) -> list[dict[str, str]]:
        """``[{key, line}]`` as the original's ``/message/{id}`` shows the headers."""
        return [{"key": f.key, "line": f.line} for f in self.fields]
