"""DANE for outbound SMTP (RFC 7672): TLSA records, published under DNSSEC, that say which
certificate an MX host must present.

**When it applies.** Only with a validating resolver (``dns.dnssec``: its AD flag is trusted)
and DANE on for the recipient domain (``tls.dane``, per domain ``zones.<zone>.domains.<d>.dane``),
never for smarthost zones or ``tls: none``. As Postfix does, the domain's MX lookup must be
secure (AD), else DANE does not apply at all (RFC 7672 section 2.2.1 allows either); then, for
each MX host, its address records must be secure too, and its TLSA records at
``_<port>._tcp.<host>`` are asked for, ``<port>`` being the port the sender connects to
(``zones.<zone>.mx_port``, 25 in practice; Postfix does the same).

**What it does.** For each MX host (:class:`HostDane`):

- secure TLSA records, some usable (usage DANE-TA 2 or DANE-EE 3, selector 0 or 1, matching
  type 0, 1 or 2): STARTTLS is required and the certificate must match one of them; else the
  delivery to that host is deferred (``451 4.7.5 DANE: ...``);
- secure TLSA records, none usable (PKIX usages 0 and 1 are unusable for SMTP, RFC 7672
  section 3.1.3): STARTTLS is required, the certificate is not checked (Postfix's fallback
  to its "encrypt" level: a published TLSA RRset promises TLS);
- no TLSA records, or insecure ones: no DANE; the zone's ``tls`` mode and MTA-STS apply;
- the lookup fails (SERVFAIL from a validating resolver: bogus, or a timeout): the host is
  not tried; with no host left the delivery is deferred. Never sent in the clear instead.

DANE takes precedence over MTA-STS (RFC 8461 section 2) for the hosts it covers:
:func:`with_sts` applies an MTA-STS policy to the other hosts only.

**Matching** (RFC 6698, RFC 7671, RFC 7672 section 3). DANE-EE: the server's own certificate
or its SubjectPublicKeyInfo matches; its names and dates are not checked. DANE-TA: a
certificate of the chain the server presents matches, and issues the server's certificate
(directly or through CA certificates of that chain, each signature checked), which must be
valid now and name the MX host (or the recipient domain, the next-hop domain; a wildcard
stands for one whole leftmost label; the subject CN only without DNS names).

**Why by hand.** Python's ``ssl`` module has no DANE (OpenSSL's ``SSL_dane_*`` functions are
not exposed), and the PKIX verification it does have cannot take a trust anchor from DNS.
So the handshake runs without verification (an unverified context) and the chain the server
presented is checked here, parsed and its signatures verified with ``cryptography``. The
presented chain comes from ``SSLObject.get_unverified_chain()`` on Python 3.13 and later;
before, the same method of the underlying ``_ssl`` object (there since 3.10); without either,
the peer's own certificate, which is enough for DANE-EE.

Answers are cached in Redis for all sender pods, for their DNS TTL (10 minutes at most):
``zmta:dane:<domain>`` ("secure" or "insecure", the MX lookup) and
``zmta:tlsa:<host>:<port>`` (JSON, the host's secure TLSA records, empty for none).
Failed lookups are not cached. With TLS reporting on (:mod:`.tlsrpt`), a failed lookup is
counted for the domain's report (``dnssec-invalid``), and so is each session to a host DANE
covers (by the caller, :mod:`.smtp_client`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common.config import Dns, Tls, Zone
from zmta_common.mx import CACHE_TTL_CAP, make_resolver
from zmta_common.tlsrpt import CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, VALIDATION_FAILURE

from . import tlsrpt
from .errors import DeliveryError
from .mta_sts import StsPolicy, apply_policy
from .mta_sts import apply as apply_sts
from .mx import Target
from .tls import TlsPolicy

log = logging.getLogger(__name__)

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3  # certificate usages (RFC 7218 names)
CERT, SPKI = 0, 1  # selectors
FULL, SHA256, SHA512 = 0, 1, 2  # matching types
NEGATIVE_TTL = 60  # seconds a "no such record" answer is cached when it carries no SOA
DANE_DEFERRAL = "451 4.7.5 DANE:"
_ENCODING_DER = 2  # _ssl.ENCODING_DER: the format argument of the private chain's public_bytes()


class DaneLookupError(Exception):
    """A DNS answer DANE needs could not be had: SERVFAIL (bogus, for a validating resolver) or timeout."""


class DaneMismatch(Exception):
    """The server's certificate chain does not satisfy its TLSA records; the message says how,
    ``result`` its RFC 8460 result type."""

    def __init__(self, message: str, result: str = VALIDATION_FAILURE) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, certificate association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 section 3.1): DANE-TA or DANE-EE, with a selector and matching type we know."""
        return (
            self.usage in (DANE_TA, DANE_EE) and self.selector in (CERT, SPKI) and self.mtype in (FULL, SHA256, SHA512)
        )

    def matches(self, cert: x509.Certificate) -> bool:
        selected = cert.public_bytes(Encoding.DER) if self.selector == CERT else spki(cert)
        if self.mtype == SHA256:
            selected = hashlib.sha256(selected).digest()
        elif self.mtype == SHA512:
            selected = hashlib.sha512(selected).digest()
        return selected == self.data

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def spki(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER (what selector 1 selects)."""
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class HostDane:
    """An MX host's secure TLSA records (none: DANE does not apply to it)."""

    host: str
    port: int
    records: tuple[Tlsa, ...] = ()

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)

    def to_json(self) -> str:
        return json.dumps({"records": [[r.usage, r.selector, r.mtype, r.data.hex()] for r in self.records]})

    @classmethod
    def from_json(cls, host: str, port: int, raw: str | bytes) -> HostDane:
        records = json.loads(raw)["records"]
        return cls(host, port, tuple(Tlsa(int(u), int(s), int(m), bytes.fromhex(d)) for u, s, m, d in records))

    def authenticate(self, chain: Sequence[bytes], names: Sequence[str], now: datetime | None = None) -> str:
        """How the presented ``chain`` (DER, the server's certificate first) satisfies the usable
        records: "DANE-EE" or "DANE-TA"; :class:`DaneMismatch` when it does not."""
        return authenticate(self.usable, chain, names, now or datetime.now(UTC))


def authenticate(records: Sequence[Tlsa], chain: Sequence[bytes], names: Sequence[str], now: datetime) -> str:
    """See :meth:`HostDane.authenticate`; ``names``: the reference identifiers for DANE-TA."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        raise DaneMismatch(f"cannot be parsed: {exc}") from None
    if not certs:
        raise DaneMismatch("was not presented")
    leaf = certs[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return "DANE-EE"  # name and dates do not matter (RFC 7672 section 3.1.1)
    anchors = [r for r in records if r.usage == DANE_TA]
    for anchor in certs[1:]:
        if any(r.matches(anchor) for r in anchors) and _chains_to(leaf, anchor, certs[1:], now):
            _check_leaf(leaf, names, now)
            return "DANE-TA"
    raise DaneMismatch(f"matches none of its {len(records)} TLSA records")


def _chains_to(leaf: x509.Certificate, anchor: x509.Certificate, pool: list[x509.Certificate], now: datetime) -> bool:
    """``leaf`` is issued by ``anchor``, directly or through CA certificates of ``pool`` valid ``now``."""
    current = leaf
    for _ in range(len(pool) + 1):  # a path no longer than the pool: no loops
        if _issued_by(current, anchor):
            return True
        step = next((c for c in pool if c is not current and _is_ca(c, now) and _issued_by(current, c)), None)
        if step is None:
            return False
        current = step
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate, now: datetime) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca and _valid(cert, now)


def _valid(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _check_leaf(leaf: x509.Certificate, names: Sequence[str], now: datetime) -> None:
    """DANE-TA: the server's certificate must be valid now and name one of ``names`` (RFC 7672 section 3.2)."""
    if not _valid(leaf, now):
        raise DaneMismatch(
            f"chains to its DANE-TA trust anchor but is not valid now (until {leaf.not_valid_after_utc})",
            CERTIFICATE_EXPIRED,
        )
    if not any(_name_matches(pattern, name) for pattern in certificate_names(leaf) for name in names):
        raise DaneMismatch(
            f"chains to its DANE-TA trust anchor but does not name {' or '.join(names)}", CERTIFICATE_HOST_MISMATCH
        )


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of the subjectAltName, else the subject's common names."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = alt.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if names:
        return names
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]


def _name_matches(pattern: str, name: str) -> bool:
    """A certificate name against a reference identifier; ``*.`` stands for one whole leftmost label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label and dot) and rest == pattern[2:] and "." in rest
    return pattern == name


def presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server presented (DER, its own first), unverified."""
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13 and later
    if public is not None:
        return [bytes(der) for der in public() or []]
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)  # 3.10 to 3.12
    if private is not None:
        return [cert.public_bytes(_ENCODING_DER) for cert in private() or []]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class Dane:
    """Looks up what DANE demands of a delivery's MX hosts: DNS with the AD flag, Redis cache."""

    def __init__(self, dns_config: Dns, tls_config: Tls, redis: Redis | None) -> None:
        self.resolver = make_resolver(dns_config)
        # AD in the query asks for the AD flag in the answer (RFC 6840 section 5.7); DO, for
        # resolvers that set it only then.
        self.resolver.flags = dns.flags.RD | dns.flags.AD
        self.resolver.use_edns(0, dns.flags.DO, 1232)
        self.redis = redis
        self.default = tls_config.dane if tls_config.dane is not None else dns_config.dnssec

    def wanted(self, zone: Zone, domain: str) -> bool:
        """DANE for ``domain`` in ``zone``: its own ``dane`` (or the zone's ``"*"``), else ``tls.dane``."""
        own = zone.domain_policy(domain).dane
        return self.default if own is None else own

    async def apply(self, domain: str, tls: TlsPolicy, targets: list[Target]) -> tuple[TlsPolicy, list[Target]]:
        """``tls`` with the TLSA records of the hosts DANE covers, and the targets left to try
        (without the hosts whose lookups failed); DeliveryError when none is left."""
        try:
            if not await self.mx_secure(domain):
                return tls, targets
        except DaneLookupError as exc:
            tlsrpt.dnssec_failure(tls, domain, "", "", str(exc))
            raise DeliveryError(f"{DANE_DEFERRAL} {exc}", "dns") from None
        hosts = list(dict.fromkeys((t.host, t.port) for t in targets))
        found = await asyncio.gather(*(self._host_or_error(host, port) for host, port in hosts))
        failed = {host: str(f) for (host, _), f in zip(hosts, found, strict=True) if isinstance(f, DaneLookupError)}
        covered = {f.host: f for f in found if isinstance(f, HostDane) and f.records}
        left = [t for t in targets if t.host not in failed]
        if failed:
            log.warning("dane: mx hosts skipped", extra={"domain": domain, "error": list(failed.values())})
            for host, error in failed.items():
                tlsrpt.dnssec_failure(tls, domain, host, next(t.ip for t in targets if t.host == host), error)
        if not left:
            raise DeliveryError(f"{DANE_DEFERRAL} {'; '.join(failed.values())}", "tls")
        return (replace(tls, dane=covered) if covered else tls), left

    async def mx_secure(self, domain: str) -> bool:
        """Whether the domain's MX answer (records or their absence) was DNSSEC-secure."""
        key = redis_keys.dane(domain)
        cached = await self._cached(key)
        if cached is not None:
            return cached == "secure"
        secure, ttl = await self._lookup_mx(domain)
        await self._store(key, "secure" if secure else "insecure", ttl)
        return secure

    async def host(self, host: str, port: int) -> HostDane:
        """The host's secure TLSA records for ``port`` (none when DANE does not apply to it)."""
        key = redis_keys.tlsa(host, port)
        cached = await self._cached(key)
        if cached is not None:
            try:
                return HostDane.from_json(host, port, cached)
            except (ValueError, KeyError, TypeError):
                pass  # not what this version writes: asked again
        found, ttl = await self._lookup_host(host, port)
        await self._store(key, found.to_json(), ttl)
        return found

    async def _host_or_error(self, host: str, port: int) -> HostDane | DaneLookupError:
        try:
            return await self.host(host, port)
        except DaneLookupError as exc:
            return exc

    async def _lookup_mx(self, domain: str) -> tuple[bool, int]:
        answer = await self._query(domain, "MX", f"MX lookup error for {domain}")
        # No such domain (None): no mail either, whatever DANE would say.
        return answer is not None and _secure(answer), _ttl(answer)

    async def _lookup_host(self, host: str, port: int) -> tuple[HostDane, int]:
        """TLSA records only for a host whose address records are secure (RFC 7672 section 2.2.2)."""
        error = f"TLSA lookup error for {host}:{port}"
        secure, ttl = await self._address_secure(host, error)
        if not secure:
            return HostDane(host, port), ttl
        answer = await self._query(f"_{port}._tcp.{host}", "TLSA", error)
        ttl = min(ttl, _ttl(answer))
        if answer is None or answer.rrset is None or not _secure(answer):
            return HostDane(host, port), ttl
        return HostDane(host, port, tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)), ttl

    async def _address_secure(self, host: str, error: str) -> tuple[bool, int]:
        """Whether the host's address records (A, else AAAA) are secure, and their TTL."""
        for rdtype in ("A", "AAAA"):
            answer = await self._query(host, rdtype, error)
            if answer is not None and answer.rrset is not None:
                return _secure(answer), _ttl(answer)
        return False, NEGATIVE_TTL

    async def _query(self, name: str, rdtype: str, error: str) -> dns.resolver.Answer | None:
        """The answer, also when it is empty; None for NXDOMAIN; DaneLookupError when there is none."""
        try:
            return await self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.NoNameservers:
            raise DaneLookupError(f"{error} (SERVFAIL: DNSSEC validation failed, or the zone is broken)") from None
        except dns.exception.DNSException as exc:
            raise DaneLookupError(f"{error} ({exc})") from None

    async def _cached(self, key: str) -> str | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(key)
        except Exception as exc:  # Redis down: ask DNS
            log.warning("dane cache unavailable", extra={"error": repr(exc)})
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    async def _store(self, key: str, value: str, ttl: int) -> None:
        if self.redis is None or ttl <= 0:
            return
        try:
            await self.redis.set(key, value, ex=min(ttl, CACHE_TTL_CAP))
        except Exception as exc:
            log.warning("dane cache unavailable", extra={"error": repr(exc)})


def _secure(answer: dns.resolver.Answer) -> bool:
    return bool(answer.response.flags & dns.flags.AD)


def _ttl(answer: dns.resolver.Answer | None) -> int:
    """The answer's TTL; for an empty one, its SOA's negative TTL (RFC 2308)."""
    if answer is None:
        return NEGATIVE_TTL
    if answer.rrset is not None:
        return answer.rrset.ttl
    for rrset in answer.response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, int(rrset[0].minimum))
    return NEGATIVE_TTL


def with_sts(
    policy: StsPolicy | None, domain: str, tls: TlsPolicy, targets: list[Target]
) -> tuple[TlsPolicy, list[Target]]:
    """An MTA-STS ``policy`` applied to the hosts DANE does not cover: DANE takes precedence
    (RFC 8461 section 2), so a host with TLSA records stays, whatever the policy's mx list."""
    if not tls.dane:
        return apply_sts(policy, domain, tls, targets)
    others = [t for t in targets if t.host not in tls.dane]
    try:
        sts_tls, allowed = apply_policy(policy, domain, tls, others)
    except DeliveryError:  # enforce, and no other host allowed: the DANE hosts remain
        sts_tls, allowed = tls, []
    return replace(sts_tls, dane=tls.dane), [t for t in targets if t.host in tls.dane or t in allowed]
