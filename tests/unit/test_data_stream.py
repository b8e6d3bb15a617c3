"""DATA taken in blocks: the end mark and dot-unstuffing across every block edge."""

from __future__ import annotations

import random

import pytest

from zmta_ingest.data_stream import DataBody


def unstuff_in_blocks(body: bytes, cuts: list[int], after: bytes = b"QUIT\r\n") -> bytes:
    """Feed ``body``, the end mark and ``after`` cut at ``cuts``; check what follows the
    end mark is given back whole; return the content."""
    wire = body + b".\r\n" + after
    stream = DataBody()
    out = b""
    start = 0
    bounds = [*sorted(cuts), len(wire)]
    for i, cut in enumerate(bounds):
        content, rest = stream.feed(wire[start:cut])
        out += content
        start = cut
        if rest is not None:
            assert rest + wire[start:] == reference_rest(wire), (rest, bounds[i:])
            return out
    raise AssertionError("the end mark was not found")


def reference_rest(wire: bytes) -> bytes:
    return (b"\r\n" + wire).split(b"\r\n.\r\n", 1)[1]


def reference(body: bytes) -> bytes:
    """Line by line, as RFC 5321 says it: DATA ends at the first line that is a lone dot,
    lines end at CRLF, a leading dot goes."""
    data = b"\r\n" + body + b".\r\n"
    body = data[2 : data.find(b"\r\n.\r\n") + 2]
    lines = body.split(b"\r\n")
    out = [line[1:] if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out)


CASES = [
    b"",
    b".\r\n",
    b"..\r\n",
    b"...\r\n",
    b".hidden\r\nvisible\r\n..two\r\n",
    b"a\r\n.\nb\r\n",  # a dot after a bare LF is content
    b"a\n.\r\nb\r\n",
    b"a\r.\r\nb\r\n",
    b"x\r\n.\r\r\n..\r\n",
    b"line\r\n" * 50 + b".." * 10 + b"\r\n",
    b"x" * 998 + b"\r\n" + b".y" * 499 + b"\r\n",  # exactly 1000 octets each
    b"x" * 999 + b"\r\n",  # 1001 octets
    b"a" * 600 + b"\r" + b"b" * 600 + b"\r\n",  # a bare CR does not end a line
    b"end\r\n.\r\nRSET\r\n",  # DATA ends at the first lone dot; the rest is commands
    b"a\n.\r\n\r.\r\n..\r\n",  # only a dot between CRLFs ends DATA
]


@pytest.mark.parametrize("body", CASES)
def test_every_single_cut(body: bytes) -> None:
    expected = reference(body)
    assert unstuff_in_blocks(body, []) == expected
    for cut in range(1, len(body)):
        assert unstuff_in_blocks(body, [cut]) == expected, cut


def test_random_blocks_of_random_bodies() -> None:
    rng = random.Random(20261204)
    pieces = [b"\r\n", b".", b"..", b"\n", b"\r", b"x", b"text ", b"\r\n.", b"y" * 400]
    for _ in range(400):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) + b"\r\n"
        cuts = [rng.randint(0, len(body)) for _ in range(rng.randint(0, 6))]
        assert unstuff_in_blocks(body, cuts) == reference(body), (body, cuts)
