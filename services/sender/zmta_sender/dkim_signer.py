"""DKIM signatures made at send time from a body hash computed at intake (RFC 6376, RFC 8463).

Why the signature is built here instead of with ``dkim.sign``: dkimpy canonicalises
and hashes the whole body, held in memory, on every call, and its RSA is pure Python
(about 150 RSA-2048 signatures/s). Here the body hash comes from the intake
(``zmta_common.dkim_hash.BodyHasher``), only the header block is canonicalised, and
``cryptography`` (OpenSSL) does the RSA PKCS#1 v1.5 / Ed25519 operation. One
signature costs about 0.3 ms of CPU for RSA-2048 (1.6 ms for RSA-4096, 0.05 ms for
Ed25519), so :func:`sign` is synchronous and pure (no I/O, no clock) and may be
called from the event loop. The tests check its output with dkimpy and with Perl's
Mail::DKIM; ``python -m zmta_devtools.bench_dkim`` measures it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from zmta_common.domains import canonical_domain
from zmta_common.headers import HeaderBlock

RSA_MIN_BITS = 1024
RSA_MAX_BITS = 4096

# Signed by default when present (RFC 6376 section 5.4.1), in this order.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "feedback-id",
)
# Listed once more than they occur (RFC 6376 section 8.15): a copy added later, above
# or below, then takes part in the hash and breaks the signature.
OVERSIGNED_HEADERS: frozenset[str] = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "to",
        "cc",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

_DNS_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_WSP_RUN = re.compile(rb"[ \t]+")
_CANON = ("relaxed", "simple")
_WIDTH = 78  # fold the DKIM-Signature field at this many columns (a tab counts 8)
_B64_LINE = 66


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A private key ready to sign for ``selector._domainkey.domain``."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)


def load_key(domain: str, selector: str, pem: bytes) -> DkimKey:
    """Load an RSA (1024 to 4096 bits) or Ed25519 key, PEM in PKCS#1 or PKCS#8.

    An Ed25519 key may also be the base64 32-byte seed that dkimpy's ``dknewkey`` writes.
    Raises ``ValueError`` saying what is wrong with the key.
    """
    domain = _dns_name(domain, "domain")
    selector = _dns_name(selector, "selector")
    where = f"DKIM key for {selector}._domainkey.{domain}"
    text = pem.strip()
    private: object
    if text.startswith(b"-----BEGIN"):
        try:
            private = serialization.load_pem_private_key(text, password=None)
        except TypeError as e:
            raise ValueError(f"{where} is encrypted; give it without a passphrase") from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"{where} is not a readable PEM private key ({e})") from e
    else:
        try:
            seed = base64.b64decode(text, validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{where} is neither a PEM private key nor a base64 32-byte Ed25519 seed")
        private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(private, rsa.RSAPrivateKey):
        bits = private.key_size
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise ValueError(f"{where} is RSA of {bits} bits; DKIM RSA keys must have {RSA_MIN_BITS} to {RSA_MAX_BITS}")
        return DkimKey(domain, selector, "rsa-sha256", private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, "ed25519-sha256", private)
    kind = type(private).__name__.removesuffix("PrivateKey")
    raise ValueError(f"{where} is a {kind} key; DKIM signs with RSA or Ed25519 keys only")


def public_txt(key: DkimKey) -> str:
    """The TXT record value to publish at ``selector._domainkey.domain``."""
    public = key.private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        kind, raw = "ed25519", public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        kind, raw = "rsa", der
    return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


def sign(
    headers: bytes,
    body_hash: str,
    key: DkimKey,
    *,
    canonicalization: str = "relaxed/relaxed",
    signed_headers: Sequence[str] | None = None,
    timestamp: int | None = None,
    expire: int | None = None,
) -> bytes:
    """Return the ``DKIM-Signature: ...\\r\\n`` field to put on top of the message.

    ``headers`` is the final header block (CRLF line ends, without the empty line that
    ends it); ``body_hash`` the base64 SHA-256 body hash. ``canonicalization`` is
    ``header/body``; the caller must have computed ``body_hash`` with that body
    canonicalisation (``BodyHasher("relaxed")`` for ``*/relaxed``), else verifiers fail
    the signature. ``signed_headers`` replaces the default list and is used as given
    (repeat a name to sign more instances or to over-sign); it must name From.
    ``timestamp``/``expire`` (Unix seconds) add the ``t=``/``x=`` tags.
    """
    header_c, body_c = _canonicalization(canonicalization)
    try:
        digest_len = len(base64.b64decode(body_hash, validate=True))
    except ValueError:  # binascii.Error, or not ASCII
        digest_len = -1
    if digest_len != hashlib.sha256().digest_size:
        raise ValueError(f"body_hash {body_hash!r} is not a base64 SHA-256 digest")
    if timestamp is not None and timestamp < 0:
        raise ValueError("timestamp must not be negative")
    if expire is not None and (expire < 0 or (timestamp is not None and expire <= timestamp)):
        raise ValueError("expire must be later than timestamp")

    fields = [(f.key, f.raw if f.raw.endswith(b"\r\n") else f.raw + b"\r\n") for f in HeaderBlock.parse(headers).fields]
    names = _signed_names(fields, signed_headers)

    tags = ["v=1;", f"a={key.algorithm};", f"c={header_c}/{body_c};", f"d={key.domain};", f"s={key.selector};"]
    if timestamp is not None:
        tags.append(f"t={timestamp};")
    if expire is not None:
        tags.append(f"x={expire};")
    last = len(names) - 1
    atoms = [(" ", tag) for tag in tags]
    atoms += [("" if i else " ", ("" if i else "h=") + n + (";" if i == last else ":")) for i, n in enumerate(names)]
    atoms.append((" ", f"bh={body_hash};"))
    # b= starts its own line, so the part hashed (with b= empty) is the final text.
    head = (_fold(atoms) + "\r\n\tb=").encode("ascii")

    data = [_canon_header(raw, header_c) for raw in _select(fields, names)]
    data.append(_canon_header(head, header_c).removesuffix(b"\r\n"))
    digest = hashlib.sha256(b"".join(data)).digest()
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        signature = key.private_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        signature = key.private_key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 digest
    b64 = base64.b64encode(signature)
    return head + b"\r\n\t".join(b64[i : i + _B64_LINE] for i in range(0, len(b64), _B64_LINE)) + b"\r\n"


def _fold(atoms: list[tuple[str, str]]) -> str:
    """Join ``(separator, text)`` pieces, breaking the line (CRLF TAB) instead of a separator."""
    out = "DKIM-Signature:"
    column = len(out)
    for sep, atom in atoms:
        if column + len(sep) + len(atom) > _WIDTH:
            out += "\r\n\t"
            column = 8
        else:
            out += sep
            column += len(sep)
        out += atom
        column += len(atom)
    return out


def _canonicalization(value: str) -> tuple[str, str]:
    header_c, _, body_c = value.partition("/")
    if header_c not in _CANON or body_c not in _CANON:
        raise ValueError(f"canonicalization must be header/body, each relaxed or simple, not {value!r}")
    return header_c, body_c


def _dns_name(value: str, what: str) -> str:
    if what == "domain":
        name = canonical_domain(value)
    else:
        name = value.strip().rstrip(".")
        if not name.isascii():
            name = name.encode("idna").decode("ascii")
    if not _DNS_NAME.match(name):
        raise ValueError(f"DKIM {what} {value!r} is not a valid DNS name")
    return name


def _signed_names(fields: list[tuple[str, bytes]], signed_headers: Sequence[str] | None) -> list[str]:
    if signed_headers is not None:
        names = [name.strip() for name in signed_headers]
        bad = [name for name in names if not _FIELD_NAME.match(name)]
        if bad:
            raise ValueError(f"not header field names: {bad!r}")
        if "from" not in (name.lower() for name in names):
            raise ValueError("signed_headers must include From (RFC 6376 section 5.4)")
        return names
    counts = Counter(name for name, _ in fields)
    names = []
    for name in DEFAULT_SIGNED_HEADERS:
        present = counts.get(name, 0)
        if present or name == "from":
            names += [name] * (present + (name in OVERSIGNED_HEADERS))
    return names


def _select(fields: list[tuple[str, bytes]], names: list[str]) -> list[bytes]:
    """The fields ``names`` sign: for a repeated name, the last unused instance first (section 5.4.2)."""
    stacks: dict[str, list[bytes]] = {}
    for name, raw in fields:
        stacks.setdefault(name, []).append(raw)
    chosen = []
    for name in names:
        stack = stacks.get(name.lower())
        if stack:
            chosen.append(stack.pop())
    return chosen


def _canon_header(raw: bytes, canonicalization: str) -> bytes:
    """One field canonicalised (RFC 6376 section 3.4.1 simple, 3.4.2 relaxed), CRLF included."""
    if canonicalization == "simple":
        return raw
    name, _, value = raw.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"
