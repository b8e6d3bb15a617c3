"""The body of a DATA command, taken in blocks: dot-unstuffing and line lengths with bytes
operations over each block, never a Python step per line.

The reader (``smtp_server``) cuts the stream into blocks at places where the end mark
``<CRLF>.<CRLF>`` cannot start, so a block never splits it; this module sees every block
but the end mark and carries across block edges only what can straddle one: the last
two octets (for a stuffed dot after a CRLF that ends the previous block) and the length of
the line in progress.

The rules kept (RFC 5321 4.5.2 and 4.5.3.1.6):

* A dot at the start of a line, after a CRLF (or at the start of DATA), is removed. A dot
  after a bare LF or CR is content: only CRLF ends a line here, as only
  ``<CRLF>.<CRLF>`` ends DATA.
* A line may hold 1000 octets with its CRLF. Lines are measured between LFs, so a bare LF,
  which the intake turns into a line end, also ends a line for this count.
"""

from __future__ import annotations

MAX_LINE = 1000  # octets, CRLF included


class DataUnstuffer:
    """Feed the blocks of one DATA body in order; :attr:`too_long` tells whether a line was
    over :data:`MAX_LINE` octets."""

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the last two octets seen: DATA starts at a line start
        self._line = 0  # octets of the line in progress, before its LF
        self.too_long = False

    def feed(self, block: bytes) -> bytes:
        """The block as content: its stuffed dots removed."""
        if not block:
            return block
        self._measure(block)
        tail = self._tail
        self._tail = (tail + block[-2:])[-2:]
        # A stuffed dot whose CRLF ended the previous block.
        if tail == b"\r\n" and block[:1] == b".":
            block = block[1:]
        elif tail[-1:] == b"\r" and block[:2] == b"\n.":
            block = b"\n" + block[2:]
        return block.replace(b"\r\n.", b"\r\n")

    def _measure(self, block: bytes) -> None:
        """Track the longest line. Lines are found by looking back from ``MAX_LINE`` octets
        ahead of a line start for the last LF (``rfind`` in C): none means that line is too
        long, else the next line starts after it. About one step per ``MAX_LINE`` octets."""
        if self.too_long:
            return
        first = block.find(b"\n")
        if first < 0:
            self._line += len(block)
            self.too_long = self._line >= MAX_LINE
            return
        # A line of n octets before its LF is n + 1 octets long.
        if self._line + first >= MAX_LINE:
            self.too_long = True
            return
        start, size = first + 1, len(block)
        while size - start >= MAX_LINE:
            last = block.rfind(b"\n", start, start + MAX_LINE)
            if last < 0:
                self.too_long = True
                return
            start = last + 1
        last = block.rfind(b"\n", start)
        self._line = size - (last + 1 if last >= 0 else start)
