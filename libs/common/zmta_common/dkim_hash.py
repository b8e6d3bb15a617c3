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
        data = self._carry + data
        end = data.rfind(b"\r\n")
        if end < 0:
            self._carry = data
            return
        self._carry = data[end + 2 :]
        self._lines(data[: end + 2])

    def _lines(self, block: bytes) -> None:
        if self.canonicalization == "relaxed":
            if b"\t" in block or b"  " in block:  # two finds in C spare the regex for most text
                block = _WSP_TO_SQUEEZE.sub(b" ", block)
            block = block.replace(b" \r\n", b"\r\n")
        text = block.rstrip(b"\r\n")
        if not text:
            self._empty_lines += len(block) // 2
            return
        if self._empty_lines:
            self._hash.update(b"\r\n" * self._empty_lines)
        self._hash.update(text)  # (two updates spare a copy of the block)
        self._hash.update(b"\r\n")
        self._seen_text = True
        self._empty_lines = (len(block) - len(text)) // 2 - 1

    def digest(self) -> bytes:
        if self._carry:
            # A body that does not end in CRLF is canonicalised as if it did.
            carry, self._carry = self._carry, b""
            self._lines(carry + b"\r\n")
        if not self._seen_text and self.canonicalization == "simple":
            return hashlib.new(self.algorithm, b"\r\n").digest()
        return self._hash.digest()

    def b64digest(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")
