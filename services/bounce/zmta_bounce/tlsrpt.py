"""SMTP TLS reporting (RFC 8460): the daily reports of the TLS sessions the senders counted.

The senders count, per policy domain and UTC day, the sessions under the domain's MTA-STS
policy or DANE records (:mod:`zmta_common.tlsrpt`, with ``tls_reporting.enabled``). Once a
day, from ``tls_reporting.hour`` (UTC) on, :class:`TlsReporter` reports the previous day
(and the day before, should that have been missed) of each such domain:

1. a Redis marker (``SET NX``, :func:`zmta_common.redis_keys.tlsrpt_sent`) makes one replica
   of the bounce service the one that reports the domain's day; the others skip it;
2. the TXT record ``_smtp._tls.<domain>`` (RFC 8460 section 3: exactly one record starting
   ``v=TLSRPTv1``, with ``rua=`` URIs) says where to; a domain without one, or with a bad one,
   is skipped and the reason logged;
3. the report (section 4.4) is JSON, gzipped, named as section 5.1 says
   (``<submitter>!<domain>!<begin>!<end>.json.gz``), and sent to each ``rua``: a ``mailto:``
   URI gets a mail (section 5.3: ``multipart/report; report-type="tlsrpt"``, a text part and
   the ``application/tlsrpt+gzip`` attachment, ``TLS-Report-Domain``, ``TLS-Report-Submitter``
   and the subject ``Report Domain: ... Submitter: ... Report-ID: <...>``) queued through the
   zone of DSNs, an ``https:`` URI a POST of ``application/tlsrpt+gzip`` (2xx: taken).

A domain whose report reached none of its URIs (the store down, every receiver failing, DNS
failing) gives its marker back and is tried again a minute later, a few times. A mail queued
is taken: the sender delivers it as any other, retries included.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import dns.exception
import dns.resolver
import httpx
from redis.asyncio import Redis

from zmta_common import queueing, redis_keys, service
from zmta_common import tlsrpt as counts
from zmta_common.bus import Bus
from zmta_common.config import Config
from zmta_common.domains import canonical_domain
from zmta_common.hooks import Hooks
from zmta_common.intake import Envelope, MessageIntake
from zmta_common.mx import make_resolver
from zmta_common.store import Store

log = logging.getLogger(__name__)

VERSION = "v=TLSRPTv1"
MEDIA_TYPE = "application/tlsrpt+gzip"
CHECK_INTERVAL = 60.0  # seconds between looks at whether a day is due
MAX_TRIES = 10  # rounds a day's domains that reached no receiver are tried again
CONCURRENCY = 8  # domains reported at once


class RecordError(ValueError):
    """A domain's TLSRPT TXT records say nowhere to report (RFC 8460 section 3); the message says why."""


@dataclass(frozen=True, slots=True)
class Record:
    """Where a domain wants its reports: the ``rua`` URIs we can use, and those we cannot."""

    rua: list[str]
    ignored: list[str] = field(default_factory=list)


def parse_record(texts: list[str]) -> Record:
    """The TLSRPT policy among a domain's ``_smtp._tls`` TXT records (each one's strings joined).

    Records that do not start with ``v=TLSRPTv1`` are not ours; there must be exactly one that
    does. Its fields are ``key=value`` separated by ``;``, unknown ones ignored; ``rua`` is a
    comma-separated list of ``mailto:`` and ``https:`` URIs (others are ignored)."""
    candidates = [text for text in texts if text.split(";", 1)[0].strip() == VERSION]
    if not candidates:
        raise RecordError("no v=TLSRPTv1 record")
    if len(candidates) > 1:
        raise RecordError(f"{len(candidates)} v=TLSRPTv1 records, not one")
    fields: dict[str, str] = {}
    for part in candidates[0].split(";")[1:]:
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise RecordError(f"{part.strip()!r} is not key=value")
        fields.setdefault(key.strip(), value.strip())
    uris = [uri.strip() for uri in fields.get("rua", "").split(",") if uri.strip()]
    if not uris:
        raise RecordError("no rua")
    usable = [uri for uri in uris if _usable(uri)]
    ignored = [uri for uri in uris if uri not in usable]
    if not usable:
        raise RecordError(f"no usable mailto: or https: URI in rua: {', '.join(ignored)}")
    return Record(usable, ignored)


def _usable(uri: str) -> bool:
    scheme = uri.partition(":")[0]
    if scheme.lower() == "mailto":
        return bool(mailto_addresses(uri))
    return scheme.lower() == "https" and bool(urlsplit(uri).hostname)


def mailto_addresses(uri: str) -> list[str]:
    """The addresses of a ``mailto:`` URI (RFC 6068; its header fields ignored)."""
    path = uri.partition(":")[2].split("?", 1)[0]
    return [address.strip() for address in unquote(path).split(",") if "@" in address.strip()]


def due_days(now: datetime, hour: int) -> list[date]:
    """The days to report at ``now`` (UTC): yesterday once ``hour`` has come, and the day before,
    in case no replica ran at its time (a domain reported already is only looked at)."""
    today = now.astimezone(UTC).date()
    return [today - timedelta(days=2)] + ([today - timedelta(days=1)] if now.astimezone(UTC).hour >= hour else [])


def day_range(day: date) -> tuple[datetime, datetime]:
    """The first and the last second of a UTC day."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(seconds=86399)


def report(
    organization: str, contact: str, report_id: str, day: date, policies: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON report of RFC 8460 section 4.4 of one policy domain and UTC day."""
    start, end = day_range(day)
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def report_id(day: date, domain: str, submitter: str) -> str:
    """The same for the same domain, day and submitter: a receiver can tell a report sent again."""
    return f"{day.isoformat()}.{domain}@{submitter}"


def filename(submitter: str, domain: str, day: date) -> str:
    """RFC 8460 section 5.1: ``sender!policy-domain!begin-timestamp!end-timestamp.json.gz``."""
    start, end = day_range(day)
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


def compress(document: dict[str, Any]) -> bytes:
    """The report as sent: JSON, gzipped (no time stamp in the gzip header: the same report, the same bytes)."""
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), mtime=0)


@dataclass(frozen=True, slots=True)
class Mail:
    """What the mail of one report needs besides the report."""

    domain: str
    submitter: str
    report_id: str
    filename: str
    from_address: str
    to: list[str]
    zone: str
    day: date


def build_mail(body: bytes, mail: Mail) -> bytes:
    """The report mail of RFC 8460 section 5.3."""
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {mail.submitter} for {mail.domain},\n"
        f"of the UTC day {mail.day.isoformat()}. The report is the attached gzipped JSON file.\n"
    )
    attachment = MIMEApplication(body, "tlsrpt+gzip", name=mail.filename)
    attachment.add_header("Content-Disposition", "attachment", filename=mail.filename)
    message = MIMEMultipart("report", report_type="tlsrpt", _subparts=[MIMEText(text, "plain", "us-ascii"), attachment])
    message["From"] = mail.from_address
    message["To"] = ", ".join(mail.to)
    message["Subject"] = f"Report Domain: {mail.domain} Submitter: {mail.submitter} Report-ID: <{mail.report_id}>"
    message["TLS-Report-Domain"] = mail.domain
    message["TLS-Report-Submitter"] = mail.submitter
    message["Auto-Submitted"] = "auto-generated"
    message["X-Sending-Zone"] = mail.zone
    message["Message-ID"] = make_msgid(domain=mail.submitter)
    message["Date"] = format_datetime(datetime.now(UTC))
    return message.as_bytes(policy=SMTP)


class TlsReporter:
    """Sends the daily TLS reports of one bounce service replica."""

    def __init__(self, config: Config, store: Store, bus: Bus, redis: Redis, hooks: Hooks | None = None) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.redis = redis
        self.hooks = hooks or Hooks()
        settings = config.tls_reporting
        self.hour = settings.hour
        self.marker_ttl = settings.retention_days * 86400
        self.submitter = settings.submitter or config.hostname
        self.organization = settings.organization_name or self.submitter
        self.from_address = settings.from_address or f"noreply-tlsrpt@{self.submitter}"
        self.contact = settings.contact_info or self.from_address
        self.resolver = make_resolver(config.dns)
        self.sent = 0
        self._done: set[date] = set()
        self._tries: Counter[date] = Counter()
        self._http: httpx.AsyncClient | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Report each day when it is due, until ``stop``."""
        async with self.client():
            await service.every(CHECK_INTERVAL, self.tick, stop, "tls reporting")

    @asynccontextmanager
    async def client(self) -> AsyncIterator[None]:
        """The HTTPS client of the ``https:`` reports, for as long as the block runs."""
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.config.tls.ca_file:
            tls.load_verify_locations(cafile=self.config.tls.ca_file)
        # No keep-alive: a connection verified for one host name must not serve another on the same IP.
        async with httpx.AsyncClient(
            verify=tls,
            follow_redirects=False,
            timeout=self.config.tls_reporting.post_timeout,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as self._http:
            yield
        self._http = None

    async def tick(self, now: datetime | None = None) -> None:
        """Report the days that are due (:func:`due_days`) and not done yet by this process."""
        now = now or datetime.now(UTC)
        today = now.date()
        for day in due_days(now, self.hour):
            if day in self._done:
                continue
            outcomes = await self.report_day(day)
            self._tries[day] += 1
            if "failed" not in outcomes.values() or self._tries[day] >= MAX_TRIES:
                self._done.add(day)
        oldest = today - timedelta(days=3)
        self._done = {day for day in self._done if day >= oldest}
        self._tries = Counter({day: n for day, n in self._tries.items() if day >= oldest})

    async def report_day(self, day: date) -> dict[str, str]:
        """Report every domain with counts on ``day``; its outcome by domain: ``sent``, ``taken``
        (another replica's, or done before), ``skipped`` (nowhere to report), ``empty``, ``failed``."""
        members = await self.redis.smembers(redis_keys.tlsrpt_domains(day.isoformat()))
        domains = sorted(_text(member) for member in members)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(domain: str) -> str:
            async with limit:
                try:
                    return await self.report_domain(day, domain)
                except Exception as exc:
                    log.warning("tls report failed", extra={"domain": domain, "day": str(day), "error": repr(exc)})
                    await self.redis.delete(redis_keys.tlsrpt_sent(day.isoformat(), domain))
                    return "failed"

        outcomes = await asyncio.gather(*(one(domain) for domain in domains))
        result = dict(zip(domains, outcomes, strict=True))
        if result:
            log.info("tls reports", extra={"day": str(day), "outcomes": dict(Counter(result.values()))})
        return result

    async def report_domain(self, day: date, domain: str) -> str:
        """Report one domain's day, unless another replica does (or did)."""
        domain = canonical_domain(domain)
        marker = redis_keys.tlsrpt_sent(day.isoformat(), domain)
        if not await self.redis.set(marker, self.submitter, nx=True, ex=self.marker_ttl):
            return "taken"
        extra = {"domain": domain, "day": str(day)}
        try:
            record = parse_record(await self._txt(domain))
        except RecordError as exc:
            log.info("tls report skipped", extra={**extra, "reason": str(exc)})
            return "skipped"
        if record.ignored:
            log.info("tls report uris ignored", extra={**extra, "rua": record.ignored})
        fields = await self.redis.hgetall(redis_keys.tlsrpt(day.isoformat(), domain))
        policies = counts.policies({_text(k): _text(v) for k, v in fields.items()})
        if not policies:
            return "empty"
        rid = report_id(day, domain, self.submitter)
        body = compress(report(self.organization, self.contact, rid, day, policies))
        name = filename(self.submitter, domain, day)
        errors = [await self._send(uri, body, day, domain, rid, name) for uri in record.rua]
        failed = [error for error in errors if error is not None]
        if len(failed) == len(errors):
            log.warning("tls report not delivered", extra={**extra, "errors": failed})
            await self.redis.delete(marker)  # to be tried again
            return "failed"
        self.sent += 1
        log.info("tls report sent", extra={**extra, "report_id": rid, "rua": record.rua, "errors": failed})
        return "sent"

    async def _txt(self, domain: str) -> list[str]:
        """The strings of each TXT record at ``_smtp._tls.<domain>``; RecordError for none."""
        try:
            answer = await self.resolver.resolve(f"_smtp._tls.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise RecordError("no TXT record at _smtp._tls") from None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def _send(self, uri: str, body: bytes, day: date, domain: str, rid: str, name: str) -> str | None:
        """Send the report to one ``rua`` URI; None when it was taken, else why not."""
        try:
            if uri.lower().startswith("mailto:"):
                to = mailto_addresses(uri)
                mail = Mail(
                    domain=domain,
                    submitter=self.submitter,
                    report_id=rid,
                    filename=name,
                    from_address=self.from_address,
                    to=to,
                    zone=self.config.dsn_zone,
                    day=day,
                )
                await self._queue(build_mail(body, mail), to)
                return None
            return await self._post(uri, body)
        except Exception as exc:  # the store, the bus or the receiver: this URI missed it
            return f"{uri}: {exc!r}"

    async def _queue(self, raw: bytes, to: list[str]) -> None:
        envelope = Envelope(
            mail_from=self.from_address, recipients=to, interface="tlsrpt", transtype="HTTP", allow_routing_headers=True
        )
        intake = MessageIntake(self.store, self.config, envelope, len(raw) + 1, self.hooks)
        intake.feed(raw)
        queued = await queueing.queue(intake, self.bus)
        log.info("tls report queued", extra={"id": queued.id, "to": to})

    async def _post(self, uri: str, body: bytes) -> str | None:
        """POST to an ``https:`` URI, at the addresses our resolver gives for its host, with the
        certificate checked for that host name (system CAs plus ``tls.ca_file``); no redirects."""
        assert self._http is not None, "TlsReporter.client() is not open"
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port or 443
        headers = {"Content-Type": MEDIA_TYPE, "Host": host if port == 443 else f"{host}:{port}"}
        errors = []
        for ip, sni in await self._addresses(host):
            netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            url = urlunsplit(("https", netloc, parts.path or "/", parts.query, ""))
            extensions = {"sni_hostname": sni} if sni else {}
            try:
                response = await self._http.post(url, content=body, headers=headers, extensions=extensions)
            except httpx.HTTPError as exc:
                errors.append(f"{ip}: {exc!r}")
                continue
            if 200 <= response.status_code < 300:
                return None
            return f"{uri}: HTTP {response.status_code}"
        return f"{uri}: " + ("; ".join(errors) or "no address")

    async def _addresses(self, host: str) -> list[tuple[str, str]]:
        """(address, SNI name) to connect to for ``host``: itself if an IP literal, else its A, else AAAA records."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [(host, "")]
        for rdtype in ("A", "AAAA"):
            try:
                return [(r.to_text(), host) for r in await self.resolver.resolve(host, rdtype)]
            except dns.exception.DNSException:
                continue
        return []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
