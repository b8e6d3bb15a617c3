"""TLS reporting (RFC 8460) in the senders: the SMTP sessions under a recipient domain's
MTA-STS policy or DANE TLSA records, counted per domain and UTC day for the daily reports
the bounce service sends (``tls_reporting``; the counts' layout is :mod:`zmta_common.tlsrpt`).

What is counted, with ``tls_reporting.enabled`` (the process's :class:`Recorder` rides on its
:class:`~.tls.TlsContexts`; without one nothing here runs):

- each new connection to an MX host that DANE covers (policy ``tlsa``: its TLSA records) or
  that the domain's MTA-STS policy in ``enforce`` or ``testing`` mode covers (policy ``sts``):
  successful when it got TLS that passed the policy's checks, else failed with the RFC 8460
  result type (``starttls-not-supported``, ``certificate-*``, ``validation-failure``, and
  ``tlsa-invalid`` for TLSA records of which none is usable). An MX host outside a
  ``testing`` policy's ``mx`` list is a ``validation-failure`` (``mx-not-in-policy``);
- a delivery that an ``enforce`` policy allows no MX host (``validation-failure``), a bogus
  or failed DNSSEC lookup of DANE (``dnssec-invalid``), and a delivery whose domain
  announces an MTA-STS policy that cannot be had (``sts-policy-fetch-error``,
  ``sts-policy-invalid``, ``sts-webpki-invalid``; policy ``no-policy-found``).

A connection reused from the pool is not a new session and is not counted again. Sessions
to domains without such a policy are not counted at all: they cost an attribute test.

Counting is in memory; a background task writes what was counted to Redis in one pipeline
(HSET of new policies, HINCRBY of counts, EXPIRE), at once and again while more comes in, so
no delivery waits on Redis for it. A batch Redis refuses is lost (logged).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common import tlsrpt as counts
from zmta_common.domains import canonical_domain, domain_of
from zmta_common.tlsrpt import Failure

if TYPE_CHECKING:
    from .dane import HostDane
    from .mta_sts import StsPolicy
    from .mx import Target
    from .tls import TlsPolicy

log = logging.getLogger(__name__)

MX_NOT_IN_POLICY = "mx-not-in-policy"

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
_CERTIFICATE_RESULTS = {
    10: counts.CERTIFICATE_EXPIRED,  # CERT_HAS_EXPIRED
    62: counts.CERTIFICATE_HOST_MISMATCH,  # HOSTNAME_MISMATCH
    2: counts.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    18: counts.CERTIFICATE_NOT_TRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: counts.CERTIFICATE_NOT_TRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: counts.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: counts.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: counts.CERTIFICATE_NOT_TRUSTED,  # CERT_UNTRUSTED
    28: counts.CERTIFICATE_NOT_TRUSTED,  # CERT_REJECTED
}


def certificate_result(verify_code: int) -> str:
    """The RFC 8460 result type of a failed certificate check (OpenSSL's verify code)."""
    return _CERTIFICATE_RESULTS.get(verify_code, counts.VALIDATION_FAILURE)


class Recorder:
    """The process's TLS reporting counts: kept in memory, written to Redis in the background."""

    def __init__(self, redis: Redis, retention_days: int) -> None:
        self.redis = redis
        self.ttl = retention_days * 86400
        self._counts: Counter[tuple[str, str, str]] = Counter()  # (day, domain, field) -> sessions
        self._policies: dict[tuple[str, str, str], str] = {}  # (day, domain, policy field) -> its JSON
        self._task: asyncio.Task[None] | None = None

    def record(self, domain: str, policy: str, failure: Failure | None = None) -> None:
        """One session to ``domain`` (canonical) under ``policy`` (its JSON): succeeded, or ``failure``."""
        day = counts.day_of()
        key = counts.policy_key(policy)
        self._policies[(day, domain, counts.POLICY + key)] = policy
        self._counts[(day, domain, failure.field(key) if failure else counts.OK + key)] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="tlsrpt-flush")

    async def close(self) -> None:
        """Write what is left."""
        if self._task is not None:
            await self._task
        await self._flush()

    async def _flush(self) -> None:
        while self._counts:
            batch, policies = self._counts, self._policies
            self._counts, self._policies = Counter(), {}
            try:
                await self._write(batch, policies)
            except Exception as exc:  # Redis down: these counts are lost, mail goes on
                log.warning("tls reporting counts lost", extra={"sessions": batch.total(), "error": repr(exc)})

    async def _write(self, batch: Counter[tuple[str, str, str]], policies: dict[tuple[str, str, str], str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for (day, domain, field), policy in policies.items():
                pipe.hset(redis_keys.tlsrpt(day, domain), field, policy)
            for (day, domain, field), sessions in batch.items():
                pipe.hincrby(redis_keys.tlsrpt(day, domain), field, sessions)
            for day, domain in {(day, domain) for day, domain, _ in batch}:
                pipe.expire(redis_keys.tlsrpt(day, domain), self.ttl)
                pipe.sadd(redis_keys.tlsrpt_domains(day), domain)
                pipe.expire(redis_keys.tlsrpt_domains(day), self.ttl)
            await pipe.execute()


@functools.lru_cache(maxsize=4096)
def sts_policy(domain: str, policy: StsPolicy) -> str:
    """The report's policy object of an MTA-STS policy (the lines of its policy file, as parsed)."""
    lines = ["version: STSv1", f"mode: {policy.mode}", *(f"mx: {mx}" for mx in policy.mx), f"max_age: {policy.max_age}"]
    return counts.policy_json(
        {"policy-type": counts.STS, "policy-string": lines, "policy-domain": domain, "mx-host": list(policy.mx)}
    )


@functools.lru_cache(maxsize=4096)
def tlsa_policy(domain: str, host: HostDane | str) -> str:
    """The report's policy object of an MX host's TLSA records (none known: a failed lookup)."""
    name, records = (host, []) if isinstance(host, str) else (host.host, [str(r) for r in host.records])
    mx = [name] if name else []
    return counts.policy_json(
        {"policy-type": counts.TLSA, "policy-string": records, "policy-domain": domain, "mx-host": mx}
    )


def no_policy(domain: str) -> str:
    return counts.policy_json({"policy-type": counts.NO_POLICY_FOUND, "policy-domain": domain})


def observe(tls: TlsPolicy, recipient: str, target: Target, local_ip: str, result: str = "", reason: str = "") -> None:
    """A new session to ``target`` for ``recipient``: successful (no ``result``) or failed with the
    RFC 8460 ``result`` type; counted when DANE or MTA-STS covers the host."""
    recorder = tls.contexts.reporter
    dane = tls.dane.get(target.host)
    if recorder is None or (dane is None and tls.sts is None):
        return
    domain = canonical_domain(domain_of(recipient))
    if dane is not None:
        policy = tlsa_policy(domain, dane)
    else:
        assert tls.sts is not None
        policy = sts_policy(domain, tls.sts)
        if not result and not tls.sts.matches(target.host):
            result, reason = counts.VALIDATION_FAILURE, MX_NOT_IN_POLICY
    failure = Failure(result, local_ip, target.host, target.ip, reason) if result else None
    recorder.record(domain, policy, failure)


def mx_mismatch(tls: TlsPolicy, domain: str, policy: StsPolicy, targets: list[Target]) -> None:
    """An ``enforce`` policy allowed none of the domain's MX hosts: one failed delivery attempt."""
    recorder = tls.contexts.reporter
    if recorder is None:
        return
    domain = canonical_domain(domain)
    first = targets[0].host if targets else ""
    failure = Failure(counts.VALIDATION_FAILURE, "", first, targets[0].ip if targets else "", MX_NOT_IN_POLICY)
    recorder.record(domain, sts_policy(domain, policy), failure)


def dnssec_failure(tls: TlsPolicy, domain: str, host: str, ip: str, reason: str) -> None:
    """A DANE lookup (the domain's MX records: no ``host``, or a host's TLSA records) failed."""
    recorder = tls.contexts.reporter
    if recorder is None:
        return
    domain = canonical_domain(domain)
    recorder.record(domain, tlsa_policy(domain, host), Failure(counts.DNSSEC_INVALID, "", host, ip, reason))


def sts_unavailable(recorder: Recorder | None, domain: str, result: str, reason: str) -> None:
    """The domain announces an MTA-STS policy that could not be had, and none was cached."""
    if recorder is not None:
        recorder.record(canonical_domain(domain), no_policy(domain), Failure(result, reason=reason))
