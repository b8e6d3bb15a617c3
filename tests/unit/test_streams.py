"""Line-end normalisation, DKIM body hash and dot-stuffing over chunk edges."""

import base64
import hashlib
import random

import dkim
import pytest

from zmta_common.dkim_hash import BodyHasher
from zmta_common.intake import MAX_LINE, LineEndNormaliser, LineLimit
from zmta_sender.outgoing import DotStuffer

BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"hello\r\n",
    b"hello",
    b"  lead  and   inner\t\tspace  \r\n\r\n\r\nafter blanks \t\r\n\r\n\r\n",
    b"line\r\n \r\n\t\r\n",
    b".dot at start\r\n..two\r\n.\r\nend\r\n",
    bytes(range(32, 127)) * 50 + b"\r\n" + b"x" * 3000 + b"\r\n",
]


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, 7)
        pieces.append(data[i : i + n])
        i += n
    return pieces


def dkimpy_body_hash(body: bytes, canon: bytes) -> bytes:
    """The body hash from dkimpy's own canonicalisation of the whole body."""
    policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/" + canon)
    return base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())


@pytest.mark.parametrize("canon", ["relaxed", "simple"])
@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_body_hash_matches_dkimpy_in_any_pieces(body: bytes, canon: str) -> None:
    expected = dkimpy_body_hash(body, canon.encode()).decode()
    whole = BodyHasher(canon)
    whole.update(body)
    assert whole.b64digest() == expected
    pieces = BodyHasher(canon)
    for piece in split_randomly(body, random.Random(len(body))):
        pieces.update(piece)
    assert pieces.b64digest() == expected


def test_body_hash_matches_dkimpy_on_random_whitespace() -> None:
    rng = random.Random(6376)
    pieces = [b" ", b"\t", b"  ", b" \t ", b"x", b"word", b"\r\n", b"\r\n\r\n", b"a b"]
    for _ in range(300):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) + b"\r\n"
        for canon in ("relaxed", "simple"):
            hasher = BodyHasher(canon)
            for piece in split_randomly(body, rng):
                hasher.update(piece)
            assert hasher.b64digest() == dkimpy_body_hash(body, canon.encode()).decode(), (body, canon)


@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_hash_of_a_big_body_in_big_and_tiny_pieces_matches_dkimpy(canon: str) -> None:
    """Whitespace to relax and blank lines falling on the edges of pieces of every size."""
    rng = random.Random(2026)
    lines = [b"plain text line", b"two  spaces\tand tab ", b"", b"", b" lead", b"x" * 900]
    body = b"\r\n".join(rng.choice(lines) for _ in range(9000)) + b"\r\n\r\n"
    hasher = BodyHasher(canon)
    i = 0
    while i < len(body):
        n = rng.choice([1, 2, 700, 65536, 300000])
        hasher.update(body[i : i + n])
        i += n
    assert hasher.b64digest() == dkimpy_body_hash(body, canon.encode()).decode()


def test_empty_relaxed_body_hash_is_the_known_value() -> None:
    assert BodyHasher("relaxed").b64digest() == "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
    ],
)
def test_bare_line_ends_become_crlf_across_pieces(raw: bytes, expected: bytes) -> None:
    for step in (1, 2, 3, len(raw)):
        n = LineEndNormaliser()
        out = b"".join(n.feed(raw[i : i + step]) for i in range(0, len(raw), step)) + n.close()
        assert out == expected, step


def unstuff(wire: bytes) -> bytes:
    """What a receiving server makes of dot-stuffed DATA (up to the end mark)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")[:-2]
    for i, line in enumerate(lines):
        assert line != b".", "an end-of-data mark inside the data"
        if line.startswith(b"."):
            lines[i] = line[1:]
    return b"\r\n".join(lines) + (b"\r\n" if lines else b"")


@pytest.mark.parametrize(
    "body",
    [
        b".\r\n",
        b"..\r\n",
        b"a\r\n.\r\nb\r\n",
        b".start\r\nmid.dle\r\n.\r\n.end\r\n",
        b"x\r\n" * 5 + b"." * 10 + b"\r\n",
    ],
)
def test_dot_stuffing_survives_every_chunk_edge(body: bytes) -> None:
    for cut in range(1, len(body) + 1):
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(body[i : i + cut]) for i in range(0, len(body), cut)) + stuffer.end()
        assert unstuff(wire) == body, cut


def test_missing_final_crlf_is_added_before_the_end_mark() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b"no newline") + stuffer.end() == b"no newline\r\n.\r\n"


def line_too_long(text: bytes) -> bool:
    """As RFC 5321 4.5.3.1.6 says it: a line, its CRLF included, holds at most 1000 octets."""
    lines = text.split(b"\n")
    return any(len(line) + 1 > MAX_LINE for line in lines[:-1]) or len(lines[-1]) >= MAX_LINE


def test_line_limit_in_pieces_of_any_size() -> None:
    rng = random.Random(4)
    for _ in range(300):
        lengths = [rng.choice([0, 1, 500, 997, 998, 999, 1000, 2500]) for _ in range(rng.randint(1, 12))]
        text = b"".join(b"z" * n + b"\r\n" for n in lengths)
        if rng.random() < 0.3:
            text += b"z" * rng.choice([10, 999, 1000])  # a last line without its line end
        limit = LineLimit()
        i = 0
        while i < len(text):
            n = rng.choice([1, 3, 999, 1000, 4096, 100000])
            limit.feed(text[i : i + n])
            i += n
        assert limit.exceeded == line_too_long(text), (lengths, len(text))
