"""The body of a DATA command, taken in blocks: the end mark and dot-unstuffing with bytes
operations over each block, never a Python step per line. (Line lengths are the intake's
rule: :class:`zmta_common.intake.LineLimit`, the same for SMTP and HTTP.)

One search for ``<CRLF>.`` over a block finds both what ends DATA (``<CRLF>.<CRLF>``) and
every stuffed dot; in ordinary text it finds nothing and the block passes as it is.
Across block edges only what can straddle one is carried: a tail that could begin a
``<CRLF>.`` (a CR, a CRLF, or a found ``<CRLF>.`` too close to the end to tell which it
is). Most blocks end in the middle of a line, carry nothing and pass through uncopied.

The rules kept (RFC 5321 4.5.2 and 4.5.3.1.6):

* Only ``<CRLF>.<CRLF>`` ends DATA; DATA starts at a line start, so a first line that is
  a lone dot ends it at once.
* A dot at the start of a line, after a CRLF (or at the start of DATA), is removed. A dot
  after a bare LF or CR is content: only CRLF ends a line here, as only
  ``<CRLF>.<CRLF>`` ends DATA.
"""

from __future__ import annotations

_LINE_START_DOT = b"\r\n."


class DataBody:
    """Feed what the client sends after ``354`` in pieces of any size; :meth:`feed`
    returns the content (dots unstuffed) and, once the end mark is seen, what followed it."""

    def __init__(self) -> None:
        self._carry = b"\r\n"  # octets not handled yet; DATA starts at a line start
        self._skip = 2  # octets at the start of the carry that are not content (that CRLF)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """``(content, rest)``: ``rest`` is ``None`` until the end mark, then the octets
        after it (a pipelining client's next commands)."""
        block = self._carry + data if self._carry else data
        start = self._skip
        pieces: list[bytes] = []
        mark = block.find(_LINE_START_DOT)
        while mark >= 0 and len(block) - mark >= 5:  # else too close to the end to tell
            pieces.append(_slice(block, start, mark + 2))
            if block.startswith(b"\r\n", mark + 3):  # the end mark
                self._carry, self._skip = b"", 0
                return b"".join(pieces), block[mark + 5 :]
            start = mark + 3
            mark = block.find(_LINE_START_DOT, start)
        # The carry may begin with octets already handled (DATA's leading CRLF, a removed
        # dot): they are kept for the search, and skipped as content.
        cut = mark if mark >= 0 else len(block) - _held_back(block)
        pieces.append(_slice(block, start, cut))
        self._carry, self._skip = block[cut:], max(0, start - cut)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces), None


def _held_back(block: bytes) -> int:
    """Octets at the end of ``block`` that could begin a ``<CRLF>.`` (a CR or a CRLF)."""
    if block.endswith(b"\r"):
        return 1
    return 2 if block.endswith(b"\r\n") else 0


def _slice(block: bytes, start: int, stop: int) -> bytes:
    if stop <= start:
        return b""
    return block if start == 0 and stop == len(block) else block[start:stop]
