"""``python -m zmta_devtools.bench_dkim``: DKIM signatures per second on one core.

Signs the same message N times with ``zmta_sender.dkim_signer`` (body hash computed
once, as the intake does) and N/20 times with dkimpy's ``dkim.sign``, for RSA-2048
and Ed25519; prints the median of 5 runs in signatures per CPU second (one process,
one thread, so one core) and the ratio.
"""

from __future__ import annotations

import base64
import functools
import statistics
import time
from collections.abc import Callable
from typing import Annotated

import dkim
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from zmta_common.dkim_hash import BodyHasher
from zmta_sender.dkim_signer import load_key, sign

cli = typer.Typer(add_completion=False)

HEADERS = (
    b'From: "Alice" <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Monthly report\r\n'
    b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\nMessage-ID: <1.2@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nList-Unsubscribe: <https://example.com/u/1>\r\n"
)
BODY = b"A line of text in the body of the message.\r\n" * 200  # about 9 kB


def _rate(fn: Callable[[], object], count: int, runs: int = 5) -> float:
    rates = []
    for _ in range(runs):
        start = time.process_time()
        for _ in range(count):
            fn()
        rates.append(count / (time.process_time() - start))
    return statistics.median(rates)


@cli.command()
def main(messages: Annotated[int, typer.Option(help="signatures per run (dkimpy: 1/20 of it)")] = 2000) -> None:
    hasher = BodyHasher("relaxed")
    hasher.update(BODY)
    body_hash = hasher.b64digest()
    message = HEADERS + b"\r\n" + BODY
    pkcs8 = serialization.PrivateFormat.PKCS8
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()
    )
    ed_seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    cases = {"rsa-sha256 (2048)": rsa_pem, "ed25519-sha256": base64.b64encode(ed_seed)}
    print(f"{'algorithm':<20}{'ours sig/s':>12}{'dkimpy sig/s':>14}{'ratio':>8}")
    for label, private in cases.items():
        key = load_key("example.com", "bench", private)
        alg = key.algorithm.encode()
        ours = _rate(functools.partial(sign, HEADERS, body_hash, key), messages)
        dkimpy_sign = functools.partial(dkim.sign, message, b"bench", b"example.com", private, signature_algorithm=alg)
        try:
            theirs = _rate(dkimpy_sign, max(1, messages // 20))
        except dkim.NaClNotFoundError:  # dkimpy signs Ed25519 only with PyNaCl installed
            print(f"{label:<20}{ours:>12.0f}{'n/a':>14}{'':>8}")
            continue
        print(f"{label:<20}{ours:>12.0f}{theirs:>14.0f}{ours / theirs:>7.1f}x")


if __name__ == "__main__":
    cli()
