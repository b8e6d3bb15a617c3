"""DKIM body hash (RFC 6376 section 3.4.3/3.4.4), fed chunk by chunk.

Why hand-written: dkimpy canonicalises and hashes the whole body in one bytes
object; a message streams through intake and may be far larger than memory, so
the hash is built while the chunks pass (the signature is made at send time from
this hash). Tests compare the result with dkimpy's on the same bodies.
"""

from __future__ import annotations

import base64
import hashlib
import re

# The runs of whitespace that relaxed canonicalisation changes: any with a tab, and two or
# more spaces (a single space stays as it is, so ordinary text has nothing to match).
_WSP_TO_SQUEEZE = re.compile(rb" [ \t]+|\t[ \t]*")


def _needs_relaxing(data: bytes, start: int, stop: int) -> bool:
    """Whether relaxed canonicalisation changes ``data[start:stop]``: bounded finds in C,
    so that ordinary text is neither copied nor run through the regular expression."""
    return (
        data.find(b"\t", start, stop) >= 0 or data.find(b" \r", start, stop) >= 0 or data.find(b"  ", start, stop) >= 0
    )


def _relaxed(block: bytes) -> bytes:
    """Whitespace runs squeezed to one space, whitespace at line ends removed."""
    return _WSP_TO_SQUEEZE.sub(b" ", block).replace(b" \r\n", b"\r\n")


class BodyHasher:
    """Incremental body hash for ``relaxed`` or ``simple`` body canonicalisation.

    Input must use CRLF line ends (the intake normalises them before hashing).
    """

    def __init__(self, canonicalization: str = "relaxed", algorithm: str = "sha256") -> None:
        if canonicalization not in ("relaxed", "simple"):
            raise ValueError(f"unknown body canonicalization {canonicalization!r}")
        self.canonicalization = canonicalization
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self._carry = b""  # an incomplete last line, waiting for its CRLF
        self._empty_lines = 0  # empty lines held back: they count only if text follows
        self._seen_text = False

    def update(self, data: bytes) -> None:
        end = data.rfind(b"\r\n") + 2
        if end < 2:
            self._carry += data
            return
        start = 0
        if self._carry:
            # The carried line is finished by this piece's first line; only that line is
            # copied, the rest of the piece is taken where it lies.
            start = data.find(b"\r\n") + 2
            self._lines(self._carry + data[:start], 0, None)
        self._lines(data, start, end)
        self._carry = data[end:]

    def _lines(self, data: bytes, start: int, stop: int | None) -> None:
        """Take the whole lines ``data[start:stop]`` (which ends with CRLF)."""
        stop = len(data) if stop is None else stop
        if stop <= start:
            return
        if self.canonicalization == "relaxed" and _needs_relaxing(data, start, stop):
            data, start = _relaxed(data[start:stop]), 0
            stop = len(data)
        text_end = stop - 2
        while text_end - 2 >= start and data.startswith(b"\r\n", text_end - 2):
            text_end -= 2  # empty lines at the end count only if text follows them
        if text_end == start:
            self._empty_lines += (stop - start) // 2
            return
        if self._empty_lines:
            self._hash.update(b"\r\n" * self._empty_lines)
        with memoryview(data) as view:
            self._hash.update(view[start:stop] if text_end == stop - 2 else view[start : text_end + 2])
        self._seen_text = True
        self._empty_lines = (stop - text_end) // 2 - 1

    def digest(self) -> bytes:
        if self._carry:
            # A body that does not end in CRLF is canonicalised as if it did.
            carry, self._carry = self._carry, b""
            self._lines(carry + b"\r\n", 0, None)
        if not self._seen_text and self.canonicalization == "simple":
            return hashlib.new(self.algorithm, b"\r\n").digest()
        return self._hash.digest()

    def b64digest(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")
