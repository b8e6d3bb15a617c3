"""MTA-STS (RFC 8461): a recipient domain's demand for verified TLS to the MX hosts it names.

For each recipient domain (never for smarthost zones) the sender looks up TXT
``_mta-sts.<domain>``. Exactly one valid record (``v=STSv1; id=<id>``) means the
domain has a policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. It is
fetched from the address our resolver gives for ``mta-sts.<domain>``, with the
certificate verified for that name (system CAs plus ``tls.ca_file``), no redirects, at
most 64 KiB, within ``tls.mta_sts_timeout``.

Policies are cached in Redis for all sender pods: key ``zmta:sts:<domain>``, JSON with
the policy and its id, for the policy's ``max_age`` (at least 60 s, at most a week). A
TXT id other than the cached one makes the sender fetch the policy again. When a fetch
fails, or the TXT record is gone, a cached policy holds until it expires; without one
mail goes as if the domain had none (RFC 8461 §5). A failed fetch is not retried by the
same process for a few minutes.

:func:`apply` turns a policy into what a delivery must do: in ``enforce`` mode only the
MX hosts that match the policy are tried, with TLS and a verified certificate required
(else the delivery is deferred, category "tls"); in ``testing`` mode mismatches are only
logged; ``none`` changes nothing. With TLS reporting on (:mod:`.tlsrpt`), the sessions of a
delivery under an ``enforce`` or ``testing`` policy are counted for the domain's report, and
so is a policy that cannot be had (fetch error, invalid policy, policy host's certificate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from dataclasses import dataclass, replace

import dns.exception
import dns.resolver
import httpx
from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common.config import Dns, Tls
from zmta_common.domains import canonical_domain
from zmta_common.mx import make_resolver
from zmta_common.tlsrpt import STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID

from . import tlsrpt
from .errors import DeliveryError
from .mx import Target
from .tls import REQUIRED, TlsPolicy, verifying_context

log = logging.getLogger(__name__)

MODES = ("enforce", "testing", "none")
MAX_POLICY_SIZE = 64 * 1024
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2
CACHE_TTL_MIN = 60
CACHE_TTL_MAX = 7 * 86400
FAILURE_BACKOFF = 300.0  # seconds before a process fetches a policy again that it failed to get
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_HOST = re.compile(r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")


class PolicyError(ValueError):
    """A policy that is not valid per RFC 8461 §3.2, or could not be fetched; ``result``: the
    RFC 8460 result type (``sts-policy-invalid``, ``sts-policy-fetch-error``, ``sts-webpki-invalid``)."""

    def __init__(self, message: str, result: str = STS_POLICY_INVALID) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str
    max_age: int
    mx: tuple[str, ...]
    id: str = ""

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def to_json(self) -> str:
        policy = {"version": "STSv1", "mode": self.mode, "mx": list(self.mx), "max_age": self.max_age}
        return json.dumps({"id": self.id, "policy": policy})

    @classmethod
    def from_json(cls, raw: str | bytes) -> StsPolicy:
        data = json.loads(raw)
        policy = data["policy"]
        return cls(str(policy["mode"]), int(policy["max_age"]), tuple(policy["mx"]), str(data["id"]))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, case-insensitive; ``*.`` stands for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return host == pattern


def record_id(records: list[str]) -> str | None:
    """The id of the one ``v=STSv1`` TXT record (RFC 8461 §3.1); None if there is not exactly one valid one."""
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields = dict(_field(part) for part in candidates[0].split(";") if part.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def _field(part: str) -> tuple[str, str]:
    key, _, value = part.strip().partition("=")
    return key.strip(), value.strip()


def parse_policy(text: str, policy_id: str = "") -> StsPolicy:
    """Parse a policy file (RFC 8461 §3.2); raise PolicyError with the reason when it is not valid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in re.split(r"\r?\n", text):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {line[:80]!r} is not 'key: value'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)  # the first of repeated fields counts
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    max_age = fields.get("max_age", "")
    if not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
        raise PolicyError(f"max_age {max_age!r} is not a number of seconds")
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without mx patterns")
    return StsPolicy(mode, min(int(max_age), MAX_AGE_LIMIT), tuple(mx), policy_id)


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    if not _HOST.fullmatch(pattern):
        raise PolicyError(f"mx {value!r} is not a host name or *.host pattern")
    return pattern


def apply(
    policy: StsPolicy | None, domain: str, tls: TlsPolicy, targets: list[Target]
) -> tuple[TlsPolicy, list[Target]]:
    """The TLS policy and MX targets of a delivery to ``domain`` under its MTA-STS ``policy``
    (:func:`apply_policy`); an ``enforce`` policy that allows none of them is counted for TLS reporting."""
    try:
        return apply_policy(policy, domain, tls, targets)
    except DeliveryError:
        if policy is not None:
            tlsrpt.mx_mismatch(tls, domain, policy, targets)
        raise


def apply_policy(
    policy: StsPolicy | None, domain: str, tls: TlsPolicy, targets: list[Target]
) -> tuple[TlsPolicy, list[Target]]:
    """The TLS policy and MX targets of a delivery to ``domain`` under its MTA-STS ``policy``."""
    if policy is None or policy.mode == "none":
        return tls, targets
    matching = [t for t in targets if policy.matches(t.host)]
    others = sorted({t.host for t in targets if t not in matching})
    if policy.mode == "testing":
        if others:
            log.warning("mta-sts testing: mx not in policy", extra={"domain": domain, "mx": others, "id": policy.id})
        return (replace(tls, sts=policy) if tls.contexts.reporter is not None else tls), targets
    if not matching:
        hosts = ", ".join(others)
        raise DeliveryError(f"MTA-STS policy of {domain} (enforce) allows none of its MX hosts: {hosts}", "tls")
    if others:
        log.info("mta-sts: mx not in policy skipped", extra={"domain": domain, "mx": others})
    return TlsPolicy(REQUIRED, tls.contexts, f"MTA-STS policy of {domain}", sts=policy), matching


class MtaSts:
    """Finds the MTA-STS policy of a recipient domain: DNS, Redis cache, HTTPS."""

    def __init__(
        self, dns_config: Dns, redis: Redis | None, config: Tls, reporter: tlsrpt.Recorder | None = None
    ) -> None:
        self.resolver = make_resolver(dns_config)
        self.resolver.cache = dns.resolver.LRUCache()  # TXT answers for their TTL, in this process
        self.redis = redis
        self.timeout = config.mta_sts_timeout
        # No keep-alive: a connection verified for one mta-sts host must not serve another on the same IP.
        self.http = httpx.AsyncClient(
            verify=verifying_context(config.ca_file),
            follow_redirects=False,
            timeout=self.timeout,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._fetches: dict[str, asyncio.Task[StsPolicy | None]] = {}
        self._failed: dict[tuple[str, str], tuple[float, str, str]] = {}  # -> until, result type, reason
        self.reporter = reporter  # TLS reporting: policies that cannot be had

    async def policy(self, domain: str) -> StsPolicy | None:
        """The domain's policy in force, or None."""
        domain = canonical_domain(domain)
        current_id = await self._txt_id(domain)
        cached = await self._cached(domain)
        if current_id is None or (cached is not None and cached.id == current_id):
            return cached
        fetched = await self._fetch_once(domain, current_id)
        if fetched is None and cached is None and self.reporter is not None:
            _, result, reason = self._failed.get((domain, current_id), (0.0, STS_POLICY_FETCH_ERROR, ""))
            tlsrpt.sts_unavailable(self.reporter, domain, result, reason)
        return fetched if fetched is not None else cached

    async def close(self) -> None:
        await self.http.aclose()

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT")
        except dns.exception.DNSException:  # no record, or DNS trouble: a cached policy still holds
            return None
        return record_id([b"".join(r.strings).decode("ascii", "replace") for r in answer])

    async def _fetch_once(self, domain: str, policy_id: str) -> StsPolicy | None:
        """Fetch and cache the policy; concurrent deliveries to the domain share one fetch."""
        failed = self._failed.get((domain, policy_id))
        if failed is not None and failed[0] > time.monotonic():
            return None
        task = self._fetches.get(domain)
        if task is None:
            task = asyncio.create_task(self._refresh(domain, policy_id), name=f"mta-sts:{domain}")
            self._fetches[domain] = task
            task.add_done_callback(lambda _: self._fetches.pop(domain, None))
        return await asyncio.shield(task)

    async def _refresh(self, domain: str, policy_id: str) -> StsPolicy | None:
        try:
            async with asyncio.timeout(self.timeout):
                policy = parse_policy(await self._fetch(domain), policy_id)
        except (PolicyError, TimeoutError) as exc:
            log.warning("mta-sts policy unavailable", extra={"domain": domain, "id": policy_id, "error": repr(exc)})
            if len(self._failed) > 10000:
                self._failed.clear()
            result = exc.result if isinstance(exc, PolicyError) else STS_POLICY_FETCH_ERROR
            reason = str(exc) or f"no policy in {self.timeout:g}s"
            self._failed[(domain, policy_id)] = (time.monotonic() + FAILURE_BACKOFF, result, reason)
            return None
        log.info("mta-sts policy fetched", extra={"domain": domain, "id": policy_id, "mode": policy.mode})
        await self._store(domain, policy)
        return policy

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        errors = []
        result = STS_POLICY_FETCH_ERROR
        for ip in await self._addresses(host):
            try:
                return await self._get(host, ip)
            except (httpx.HTTPError, OSError) as exc:
                errors.append(f"{ip}: {exc!r}")
                if _certificate_failed(exc):
                    result = STS_WEBPKI_INVALID
        raise PolicyError(f"https://{host}/: " + ("; ".join(errors) or "no address"), result)

    async def _addresses(self, host: str) -> list[str]:
        for rdtype in ("A", "AAAA"):
            try:
                return [r.to_text() for r in await self.resolver.resolve(host, rdtype)]
            except dns.exception.DNSException:
                continue
        return []

    async def _get(self, host: str, ip: str) -> str:
        """GET the policy from ``ip``, as ``host`` (Host header, SNI and certificate name)."""
        url = f"https://{f'[{ip}]' if ':' in ip else ip}/.well-known/mta-sts.txt"
        request = self.http.build_request("GET", url, headers={"Host": host}, extensions={"sni_hostname": host})
        response = await self.http.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise PolicyError(
                    f"https://{host}/.well-known/mta-sts.txt answered HTTP {response.status_code}",
                    STS_POLICY_FETCH_ERROR,
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_POLICY_SIZE:
                    raise PolicyError(f"https://{host}/.well-known/mta-sts.txt is larger than 64 KiB")
        finally:
            await response.aclose()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"https://{host}/.well-known/mta-sts.txt is not UTF-8 text") from None

    async def _cached(self, domain: str) -> StsPolicy | None:
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(redis_keys.sts(domain))
        except Exception as exc:  # Redis down: go without the cache
            log.warning("mta-sts cache unavailable", extra={"error": repr(exc)})
            return None
        if not raw:
            return None
        try:
            return StsPolicy.from_json(raw)
        except (ValueError, KeyError, TypeError):
            return None

    async def _store(self, domain: str, policy: StsPolicy) -> None:
        if self.redis is None:
            return
        ttl = max(CACHE_TTL_MIN, min(policy.max_age, CACHE_TTL_MAX))
        try:
            await self.redis.set(redis_keys.sts(domain), policy.to_json(), ex=ttl)
        except Exception as exc:
            log.warning("mta-sts cache unavailable", extra={"error": repr(exc)})


def _certificate_failed(exc: BaseException) -> bool:
    """Whether the policy host's certificate failed its check (somewhere in the exception's chain)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
