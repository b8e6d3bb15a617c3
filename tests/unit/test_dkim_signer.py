"""zmta_sender.dkim_signer: signatures checked by dkimpy and by Perl's Mail::DKIM."""

from __future__ import annotations

import base64
import importlib.util
import random
import re
import shutil
import subprocess

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from zmta_common.dkim_hash import BodyHasher
from zmta_sender.dkim_signer import DkimKey, load_key, public_txt, sign

DOMAIN = "example.com"
SELECTOR = "s2024"
CANONICALIZATIONS = ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"]
KEY_KINDS = ["rsa1024", "rsa2048", "rsa4096", "ed25519"]

HEADERS = (
    b"Received: from client.example.net (client.example.net [192.0.2.10])\r\n"
    b"\tby mx.example.com with ESMTPS id 4Zq1; Mon, 3 Jun 2024 10:00:01 +0000\r\n"
    b"Received: from localhost by client.example.net; Mon, 3 Jun 2024 10:00:00 +0000\r\n"
    b'From: "Alice Example" <alice@example.com>\r\n'
    b"To: Bob <bob@example.org>,\r\n"
    b"    Carol <carol@example.org>\r\n"
    b"Cc: dave@example.org\r\n"
    b"Subject:   Quarterly   report\t ready  \r\n"
    b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n"
    b"Message-ID: <20240603100000.1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain;\r\n"
    b'\tcharset="utf-8"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://example.com/u/1234>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: test  mailer\r\n"
)
BODY = (
    b"Hello Bob,\r\n"
    b"\r\n"
    b"The  report   is ready.\t \r\n"
    b"  Indented line with trailing space \r\n"
    + b"A longer line of text to make the body span several chunks. "
    * 40
    + b"\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
    b"\r\n"
    b"   \r\n"
    b"\r\n"
    b"\r\n"
)

WEAK_RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA7inX6PV2qRmoHMyB
iVj9mzuYTCh2QUJTfHCmkqkPwMMlbku7nQO1Arp6NK5u1+uysFh16XXmJGZGBMLc
57VofwIDAQABAkEAs19CZQsSbrOLIP2JhjdG8jZFMv66adYZaLyzR/waiDM9p20W
IoeCpJ08y5f7+ZtUQYc+XduSBMm8x3Na9N2LYQIhAPvURw/MbAv9LUSgUg7TrTdO
hmrOgaeCx6lX0oYGApSvAiEA8huf86em8FHZxnxb4SBCidu8mlxfIjkaST/2+y2a
/TECIHgqCt6XBNeTr44XkhBRIU5KwgklEOkFlpBPv70EEScxAiAvHqdD0aZQ8W00
DzIGn7OzhvuvAzlUvM5b4UIdYqPekQIgYyparOw7QCunatvjR0+jTySctlIuICf2
SYJBkzqf/B0=
-----END PRIVATE KEY-----
"""

HAVE_NACL = importlib.util.find_spec("nacl") is not None
needs_nacl = pytest.mark.skipif(
    not HAVE_NACL, reason="dkimpy verifies ed25519-sha256 only with PyNaCl (package pynacl), which is not installed"
)


def _perl_has(module: str) -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", f"-M{module}", "-e1"], capture_output=True, check=False).returncode == 0


HAVE_MAIL_DKIM = _perl_has("Mail::DKIM::Verifier")
HAVE_MAIL_DKIM_ED25519 = HAVE_MAIL_DKIM and _perl_has("Mail::DKIM::Algorithm::ed25519_sha256")
needs_mail_dkim = pytest.mark.skipif(
    not HAVE_MAIL_DKIM, reason="`perl -MMail::DKIM::Verifier -e1` fails: Perl's Mail::DKIM (libmail-dkim-perl) missing"
)

PEM = serialization.Encoding.PEM
NO_PASSWORD = serialization.NoEncryption()


def _pem(private: object, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    assert isinstance(private, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return private.private_bytes(PEM, fmt, NO_PASSWORD)


@pytest.fixture(scope="module")
def keys() -> dict[str, DkimKey]:
    rsa_pem = {
        bits: _pem(rsa.generate_private_key(public_exponent=65537, key_size=bits)) for bits in (1024, 2048, 4096)
    }
    return {
        **{f"rsa{bits}": load_key(DOMAIN, SELECTOR, pem) for bits, pem in rsa_pem.items()},
        "ed25519": load_key(DOMAIN, SELECTOR, _pem(ed25519.Ed25519PrivateKey.generate())),
    }


def body_hash(body: bytes, canonicalization: str, seed: int = 1) -> str:
    """BodyHasher fed in random-sized pieces, as the intake feeds it."""
    hasher = BodyHasher(canonicalization.split("/")[1])
    rng = random.Random(seed)
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 97)
        hasher.update(body[pos : pos + step])
        pos += step
    return hasher.b64digest()


def signed_message(
    key: DkimKey, canonicalization: str = "relaxed/relaxed", timestamp: int | None = None, expire: int | None = None
) -> bytes:
    bh = body_hash(BODY, canonicalization)
    signature = sign(HEADERS, bh, key, canonicalization=canonicalization, timestamp=timestamp, expire=expire)
    return signature + HEADERS + b"\r\n" + BODY


def dkimpy_verify(message: bytes, key: DkimKey) -> bool:
    record = public_txt(key).encode()
    expected = f"{key.selector}._domainkey.{key.domain}."

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        name = name.decode() if isinstance(name, bytes) else name
        return record if name.rstrip(".") + "." == expected else None

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def _kind_param(kind: str) -> object:
    return pytest.param(kind, marks=needs_nacl) if kind == "ed25519" else kind


# --- dkimpy verifies what we sign ---------------------------------------------------


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("kind", [_kind_param(k) for k in KEY_KINDS])
def test_dkimpy_verifies(keys: dict[str, DkimKey], kind: str, canonicalization: str) -> None:
    message = signed_message(keys[kind], canonicalization, timestamp=1717408800, expire=4102444800)
    assert dkimpy_verify(message, keys[kind]) is True


@pytest.mark.parametrize("kind", [_kind_param(k) for k in ("rsa2048", "ed25519")])
def test_changed_body_fails(keys: dict[str, DkimKey], kind: str) -> None:
    message = signed_message(keys[kind])
    assert dkimpy_verify(message, keys[kind]) is True
    assert dkimpy_verify(message.replace(b"The  report", b"The  rep0rt"), keys[kind]) is False
    assert dkimpy_verify(message + b"P.S. added later\r\n", keys[kind]) is False


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
def test_changed_signed_header_fails(keys: dict[str, DkimKey], canonicalization: str) -> None:
    key = keys["rsa2048"]
    message = signed_message(key, canonicalization)
    assert dkimpy_verify(message.replace(b"Quarterly", b"Yearly"), key) is False
    assert dkimpy_verify(message.replace(b"carol@example.org", b"mallory@example.org"), key) is False
    # Headers outside the signed set may change: the failures above are the signed ones.
    assert dkimpy_verify(message.replace(b"X-Mailer: test", b"X-Mailer: other"), key) is True
    assert dkimpy_verify(message.replace(b"by mx.example.com", b"by mx2.example.com"), key) is True


def _add_header(message: bytes, field: bytes, where: str) -> bytes:
    """``field`` added right under the DKIM-Signature (top) or above X-Mailer (bottom)."""
    if where == "top":
        start = message.index(HEADERS)
        return message[:start] + field + message[start:]
    return message.replace(b"X-Mailer:", field + b"X-Mailer:")


@pytest.mark.parametrize("where", ["top", "bottom"])
@pytest.mark.parametrize("field", [b"From: Mallory <mallory@example.net>\r\n", b"Subject: Urgent: pay now\r\n"])
def test_added_header_fails_because_oversigned(keys: dict[str, DkimKey], field: bytes, where: str) -> None:
    key = keys["rsa2048"]
    assert dkimpy_verify(_add_header(signed_message(key), field, where), key) is False


def test_without_oversigning_an_added_header_on_top_passes(keys: dict[str, DkimKey]) -> None:
    """The control for the test above: what over-signing protects against."""
    key = keys["rsa2048"]
    plain = sign(HEADERS, body_hash(BODY, "relaxed/relaxed"), key, signed_headers=["From", "To", "Subject"])
    message = plain + HEADERS + b"\r\n" + BODY
    assert dkimpy_verify(message, key) is True
    # (dkimpy itself over-signs From when verifying, so the control uses Subject.)
    assert dkimpy_verify(_add_header(message, b"Subject: Urgent: pay now\r\n", "top"), key) is True


def test_repeated_header_signed_bottom_up(keys: dict[str, DkimKey]) -> None:
    key = keys["rsa2048"]
    bh = body_hash(BODY, "simple/simple")
    signature = sign(HEADERS, bh, key, canonicalization="simple/simple", signed_headers=["from", "received"])
    message = signature + HEADERS + b"\r\n" + BODY
    assert dkimpy_verify(message, key) is True
    # One "received" in h= covers the bottom Received only (RFC 6376 section 5.4.2).
    assert dkimpy_verify(message.replace(b"by mx.example.com", b"by mx9.example.com"), key) is True
    assert dkimpy_verify(message.replace(b"from localhost", b"from otherhost"), key) is False


def test_default_header_list_and_folding(keys: dict[str, DkimKey]) -> None:
    signature = sign(HEADERS, body_hash(BODY, "relaxed/relaxed"), keys["rsa4096"], timestamp=1717408800)
    assert signature.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s2024;")
    assert signature.endswith(b"\r\n") and not signature.endswith(b"\r\n\r\n")
    lines = signature[:-2].split(b"\r\n")
    assert all(line[:1] == b"\t" for line in lines[1:])
    assert all(len(line.expandtabs(8)) <= 78 for line in lines)
    unfolded = re.sub(rb"\r\n[ \t]", b" ", signature).decode()
    tags = dict(re.findall(r"(\w+)=([^;]*)", unfolded.split(":", 1)[1]))
    assert tags["t"].strip() == "1717408800" and "x" not in tags
    h = [name.strip() for name in tags["h"].split(":")]
    assert h.count("from") == 2 and h.count("subject") == 2 and h.count("to") == 2 and h.count("cc") == 2
    assert h.count("list-unsubscribe") == 2 and h.count("list-unsubscribe-post") == 2
    assert "received" not in h and "x-mailer" not in h and "reply-to" not in h and "sender" not in h
    assert base64.b64decode("".join(tags["b"].split()), validate=True)
    assert len(base64.b64decode("".join(tags["b"].split()))) == 512


def test_ed25519_seed_format(keys: dict[str, DkimKey]) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, NO_PASSWORD)
    key = load_key(DOMAIN, SELECTOR, base64.b64encode(seed) + b"\n")  # as dknewkey writes it
    assert key.algorithm == "ed25519-sha256"
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_txt(key) == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public).decode()}"
    if HAVE_NACL:
        assert dkimpy_verify(signed_message(key), key) is True


def test_pkcs1_and_pkcs8_rsa() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = _pem(private, serialization.PrivateFormat.TraditionalOpenSSL)
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    pkcs8 = _pem(private)
    assert pkcs8.startswith(b"-----BEGIN PRIVATE KEY-----")
    for pem in (pkcs1, pkcs8):
        key = load_key("Example.COM.", SELECTOR, pem)
        assert (key.domain, key.algorithm) == ("example.com", "rsa-sha256")
        assert public_txt(key).startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
        assert dkimpy_verify(signed_message(key), key) is True


# --- bad keys and arguments ---------------------------------------------------------


def test_small_rsa_key_refused() -> None:
    with pytest.raises(ValueError, match=r"RSA of 512 bits; DKIM RSA keys must have 1024 to 4096"):
        load_key(DOMAIN, SELECTOR, WEAK_RSA_512)


def test_large_rsa_key_refused() -> None:
    pem = _pem(rsa.generate_private_key(public_exponent=65537, key_size=4104))
    with pytest.raises(ValueError, match=r"RSA of 4104 bits"):
        load_key(DOMAIN, SELECTOR, pem)


@pytest.mark.parametrize(
    ("private", "kind"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "EC"),
        (ed448.Ed448PrivateKey.generate(), "Ed448"),
    ],
)
def test_other_key_types_refused(private: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey, kind: str) -> None:
    pem = private.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD)
    with pytest.raises(ValueError, match=rf"is an? {kind}\w* key; DKIM signs with RSA or Ed25519 keys only"):
        load_key(DOMAIN, SELECTOR, pem)


def test_unreadable_keys_refused() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    encrypted = private.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    )
    with pytest.raises(ValueError, match="is encrypted"):
        load_key(DOMAIN, SELECTOR, encrypted)
    public = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not a readable PEM private key"):
        load_key(DOMAIN, SELECTOR, public)
    with pytest.raises(ValueError, match="neither a PEM private key nor a base64 32-byte Ed25519 seed"):
        load_key(DOMAIN, SELECTOR, base64.b64encode(b"x" * 31))
    with pytest.raises(ValueError, match="neither a PEM private key"):
        load_key(DOMAIN, SELECTOR, b"not a key at all")
    with pytest.raises(ValueError, match="selector 'bad selector' is not a valid DNS name"):
        load_key(DOMAIN, "bad selector", _pem(private))


def test_bad_sign_arguments(keys: dict[str, DkimKey]) -> None:
    key = keys["ed25519"]
    bh = body_hash(BODY, "relaxed/relaxed")
    with pytest.raises(ValueError, match="canonicalization must be header/body"):
        sign(HEADERS, bh, key, canonicalization="relaxed")
    with pytest.raises(ValueError, match="canonicalization must be header/body"):
        sign(HEADERS, bh, key, canonicalization="nofws/simple")
    with pytest.raises(ValueError, match="not a base64 SHA-256 digest"):
        sign(HEADERS, bh[:-4], key)
    with pytest.raises(ValueError, match="must include From"):
        sign(HEADERS, bh, key, signed_headers=["To", "Subject"])
    with pytest.raises(ValueError, match="expire must be later than timestamp"):
        sign(HEADERS, bh, key, timestamp=100, expire=100)


# --- an independent verifier: Perl's Mail::DKIM --------------------------------------

# Mail::DKIM fetches keys with Net::DNS; this replaces its one DNS query function with
# one that answers the selector's TXT record from the command line, nothing else.
PERL_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;
my ($name, $record) = @ARGV;
{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($domain, $type) = @_;
        return () unless lc($domain) eq lc($name) && $type eq 'TXT';
        my @strings = unpack('(a255)*', $record);
        return (Net::DNS::RR->new(name => $domain, type => 'TXT', txtdata => \@strings));
    };
}
binmode STDIN;
local $/;
my $message = <STDIN>;
my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE;
my @sigs = $dkim->signatures;
print scalar(@sigs), " ", $dkim->result_detail, "\n";
"""


def perl_verify(message: bytes, key: DkimKey) -> str:
    name = f"{key.selector}._domainkey.{key.domain}"
    done = subprocess.run(
        ["perl", "-e", PERL_VERIFY, name, public_txt(key)], input=message, capture_output=True, check=True, timeout=60
    )
    return done.stdout.decode().strip()


def _perl_kind_param(kind: str) -> object:
    if kind != "ed25519":
        return kind
    reason = (
        "the installed Mail::DKIM cannot verify ed25519-sha256: module Mail::DKIM::Algorithm::ed25519_sha256"
        " does not load (Debian 12's libmail-dkim-perl 1.20230212 does not ship it)"
    )
    return pytest.param(kind, marks=pytest.mark.skipif(not HAVE_MAIL_DKIM_ED25519, reason=reason))


@needs_mail_dkim
@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("kind", [_perl_kind_param(k) for k in KEY_KINDS])
def test_mail_dkim_verifies(keys: dict[str, DkimKey], kind: str, canonicalization: str) -> None:
    message = signed_message(keys[kind], canonicalization, timestamp=1717408800, expire=4102444800)
    assert perl_verify(message, keys[kind]) == "1 pass"


@needs_mail_dkim
def test_mail_dkim_fails_tampering(keys: dict[str, DkimKey]) -> None:
    key = keys["rsa2048"]
    message = signed_message(key, "simple/simple")
    assert perl_verify(message, key) == "1 pass"
    assert perl_verify(message.replace(b"The  report", b"The report"), key) == "1 fail (body has been altered)"
    assert perl_verify(message.replace(b"Quarterly", b"Yearly"), key).startswith("1 fail")
    added_from = b"From: Mallory <mallory@example.net>\r\n"
    assert perl_verify(_add_header(message, added_from, "top"), key).startswith("1 fail")
    # Control: Mail::DKIM does not over-sign From itself, so without over-signing it passes.
    plain = sign(
        HEADERS, body_hash(BODY, "simple/simple"), key, canonicalization="simple/simple", signed_headers=["From"]
    )
    assert perl_verify(_add_header(plain + HEADERS + b"\r\n" + BODY, added_from, "top"), key) == "1 pass"
