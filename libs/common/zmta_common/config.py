"""The one configuration every service reads.

Sources, weakest first: defaults in this module, the YAML file (``--config`` or
``ZMTA_CONFIG_FILE``), then environment variables ``ZMTA_<SECTION>__<KEY>``
(for example ``ZMTA_DBS__POSTGRES``). Unknown keys anywhere are errors, and every
error names the key and the bad value (:class:`ConfigError`).

Defaults follow the original ZoneMTA: SMTP feeder on 127.0.0.1:2525, HTTP API on
127.0.0.1:12080, zones ``default`` and ``bounces``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
from contextvars import ContextVar
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .domains import canonical_domain

CONFIG_FILE_ENV = "ZMTA_CONFIG_FILE"
_yaml_path: ContextVar[Path | None] = ContextVar("_yaml_path", default=None)

MIB = 1024 * 1024
# The original's retry schedule in minutes (5, 7, 8, 25, 75, 120, then 240 x 11).
DEFAULT_DEFER_TIMES: list[float] = [60.0 * m for m in (5, 7, 8, 25, 75, 120, *[240] * 11)]


def _http_url(value: str) -> str:
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


# A URL kept as the text the operator wrote, checked to be http(s) with a host.
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad key and value."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Databases(Section):
    postgres: str = "postgresql://postgres@127.0.0.1:5432/zonemta"
    redis: str = "redis://127.0.0.1:6379/3"
    nats: str = "nats://127.0.0.1:4222"
    postgres_pool_size: int = Field(default=20, ge=1, le=500)
    # Seconds the ingest keeps asking PostgreSQL, after a commit failed in a way that may have
    # gone through, whether the message was stored, before it answers 451.
    commit_check_time: float = Field(default=10.0, gt=0, le=300)


class SmtpInterface(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    hostname: str | None = None
    max_size: int = Field(default=30 * MIB, ge=1024)
    max_recipients: int = Field(default=1000, ge=1)
    # X-Sending-Zone is honoured only where this is true (the original: api and bounce only).
    allow_routing_headers: bool = False
    # Seconds a client may stay idle (in DATA: between two stored chunks of the body).
    socket_timeout: float = Field(default=600.0, gt=0)
    # In DATA, a client must send at least min_data_rate bytes per second, measured over
    # every data_rate_window seconds, or it gets 421 and is disconnected (0: no minimum).
    # A slow client holds no database connection, but this frees its socket and buffer.
    min_data_rate: int = Field(default=500, ge=0)
    data_rate_window: float = Field(default=30.0, gt=0)
    # One client address (as Postfix's anvil): at most this many connections open at once
    # and this many new ones per minute (0: no limit), else 421 before the greeting.
    # Counted per ingest process. Clients in client_limit_exceptions are not limited.
    max_connections_per_client: int = Field(default=50, ge=0)
    max_connection_rate_per_client: int = Field(default=0, ge=0)
    client_limit_exceptions: list[str] = Field(default_factory=list)
    # Error replies (4xx/5xx) one connection may get before it is closed with 421
    # (Postfix's smtpd_hard_error_limit).
    max_errors_per_connection: int = Field(default=20, ge=1)
    # TLS: PEM files of the certificate (chain) and its key (tls_key: none if the key is in
    # the cert file). With them the interface offers STARTTLS; with implicit_tls it speaks
    # TLS from the first byte instead (port 465). The files are read when ingest starts.
    tls_cert: str | None = None
    tls_key: str | None = None
    implicit_tls: bool = False
    # Clients from these networks may send without AUTH; any other client must authenticate
    # (where the interface has AUTH) or is refused at MAIL FROM.
    relay_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # AUTH PLAIN and LOGIN (an MSA), checked against users ({name: argon2 hash, from
    # `python -m zmta_ingest hash-password`}) or an HTTP endpoint (auth_url). Offered only
    # over TLS unless auth_without_tls (loopback tests, legacy clients).
    auth: bool = False
    auth_without_tls: bool = False
    users: dict[str, str] = Field(default_factory=dict)
    auth_url: HttpUrl | None = None
    auth_timeout: float = Field(default=10.0, gt=0)
    # A client address with auth_max_failures refused AUTH attempts within
    # auth_failure_window seconds is refused AUTH (454) until the window ends; counted
    # in Redis, so across every ingest process.
    auth_max_failures: int = Field(default=10, ge=1)
    auth_failure_window: float = Field(default=600.0, gt=0)
    # Password checks (argon2, 64 MiB each) run at once; as many more may wait, and past
    # that AUTH is answered 454 at once instead of queueing without bound.
    auth_concurrency: int = Field(default=2, ge=1)

    @field_validator("relay_networks", "client_limit_exceptions")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ip_network(network.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network in CIDR notation, as 10.0.0.0/8") from None
        return [network.strip() for network in value]

    @field_validator("users")
    @classmethod
    def _argon2_hashes(cls, value: dict[str, str]) -> dict[str, str]:
        for user, hashed in value.items():
            if not user:
                raise ValueError("a user name is empty")
            if not hashed.startswith(("$argon2id$", "$argon2i$", "$argon2d$")):
                raise ValueError(
                    f"the password of {user!r} is not an argon2 hash"
                    " (make one with `python -m zmta_ingest hash-password`)"
                )
        return value

    @model_validator(mode="after")
    def _tls_and_auth(self) -> SmtpInterface:
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key is set but tls_cert is not")
        if self.implicit_tls and self.tls_cert is None:
            raise ValueError("implicit_tls needs tls_cert (and tls_key)")
        if (self.users or self.auth_url) and not self.auth:
            raise ValueError("users and auth_url are only used with auth: true")
        if self.auth:
            if bool(self.users) == bool(self.auth_url):
                raise ValueError("auth: true needs either users or auth_url (not both)")
            if self.tls_cert is None and not self.auth_without_tls:
                raise ValueError("auth is offered only over TLS: set tls_cert (and tls_key), or auth_without_tls: true")
        return self


class PoolAddress(Section):
    name: str = Field(min_length=1)
    address: str
    ratio: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("address")
    @classmethod
    def _is_ip(cls, value: str) -> str:
        ip_address(value)
        return value


_RATE_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/min"`` -> (100, 60.0): that many messages per that many seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:messages?\s*)?/\s*([a-z]+)\s*", text.lower())
    if match is None or match.group(2) not in _RATE_UNITS or int(match.group(1)) < 1:
        raise ValueError("must be N/unit with unit sec, min, hour or day, as 100/min")
    return int(match.group(1)), float(_RATE_UNITS[match.group(2)])


class Limit(Section):
    """Limits that hold for a whole zone, across all its sender pods."""

    # Open SMTP connections at once (idle ones kept for reuse count too).
    connections: int | None = Field(default=None, ge=1)
    # Messages per period, as "100/min" or "10000/hour".
    rate: str | None = None

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value


# Outbound STARTTLS: "opportunistic" (when offered, unverified certificate accepted, plain
# text if the handshake fails), "required" (offered and verified, else deferred), "none".
TlsMode = Literal["opportunistic", "required", "none"]


class DomainPolicy(Limit):
    # Local addresses never used for this recipient domain.
    disabled_addresses: list[str] = Field(default_factory=list)
    # Overrides the zone's ``tls`` for this recipient domain.
    tls: TlsMode | None = None
    # Deliver this domain's mail by POSTing it to this URL instead of SMTP.
    http_url: HttpUrl | None = None


DEFAULT_DOMAIN_CONNECTIONS = 5


def _merge_policies(*layers: DomainPolicy | None) -> DomainPolicy:
    """The built-in default, then each layer's explicitly set fields over it."""
    fields: dict[str, Any] = {"connections": DEFAULT_DOMAIN_CONNECTIONS}
    for layer in layers:
        if layer is not None:
            fields.update({name: getattr(layer, name) for name in layer.model_fields_set})
    return DomainPolicy.model_validate(fields)


class Zone(Section):
    # Parallel deliveries of one sender process for this zone.
    connections: int = Field(default=10, ge=1, le=10000)
    pool: list[PoolAddress] = Field(default_factory=list)
    # "host:port" that replaces MX lookup for every recipient (Postfix's relayhost).
    smarthost: str | None = None
    mx_port: int = Field(default=25, ge=1, le=65535)
    tls: TlsMode = "opportunistic"
    ignore_ipv6: bool = True
    routing_headers: dict[str, str] = Field(default_factory=dict)
    sender_domains: list[str] = Field(default_factory=list)
    recipient_domains: list[str] = Field(default_factory=list)
    # Retry delays in seconds, indexed by the number of earlier deferrals.
    defer_times: list[float] = Field(default_factory=lambda: list(DEFAULT_DEFER_TIMES))
    # A delivery whose next attempt would come later than this after it was queued bounces instead.
    max_age: float = Field(default=48 * 3600.0, gt=0)
    connect_timeout: float = Field(default=60.0, gt=0)
    command_timeout: float = Field(default=300.0, gt=0)
    # Per connection: at most this many messages per period over one connection ("10/min").
    throttling: str | None = None
    # Per recipient domain; "*" is the default for every domain without its own entry.
    domains: dict[str, DomainPolicy] = Field(default_factory=dict)
    # DKIM: messages whose From domain has no key are signed for this domain instead,
    # and every message is signed for dkim_platform_domain as well (the sending platform's).
    dkim_fallback_domain: str | None = None
    dkim_platform_domain: str | None = None
    # Per MX host name pattern ("*.mail.protection.outlook.com"): one limit for all the
    # recipient domains whose best MX host matches, counted together.
    mx_hosts: dict[str, Limit] = Field(default_factory=dict)
    # domain_policy's merged entries, made on first use ("": every other domain).
    _merged_policies: dict[str, DomainPolicy] = PrivateAttr(default_factory=dict)

    def domain_policy(self, domain: str) -> DomainPolicy:
        """The policy for ``domain``, field by field: what its own entry sets, else what the
        ``"*"`` entry sets, else the built-in default (:data:`DEFAULT_DOMAIN_CONNECTIONS`
        connections, nothing else). The one place where the entries are merged."""
        merged = self._merged_policies
        if not merged:
            merged[""] = _merge_policies(self.domains.get("*"))  # every domain without an entry
            for key, policy in self.domains.items():
                if key != "*":
                    merged[key] = _merge_policies(self.domains.get("*"), policy)
        return merged.get(domain) or merged[""]

    def tls_mode(self, domain: str) -> TlsMode:
        """The TLS mode for ``domain``: its policy's (see :meth:`domain_policy`), else the zone's."""
        return self.domain_policy(domain).tls or self.tls

    def mx_group(self, mx_host: str) -> str | None:
        """The ``mx_hosts`` pattern that ``mx_host`` falls under, if any."""
        host = mx_host.lower().rstrip(".")
        return next((pattern for pattern in self.mx_hosts if fnmatch.fnmatchcase(host, pattern)), None)

    @field_validator("domains")
    @classmethod
    def _canonical_domains(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {canonical_domain(k): v for k, v in value.items()}

    @field_validator("mx_hosts")
    @classmethod
    def _lower_patterns(cls, value: dict[str, Any]) -> dict[str, Any]:
        # MX host names come from DNS, so they are A-labels already.
        return {k.strip().lower(): v for k, v in value.items()}

    @field_validator("dkim_fallback_domain", "dkim_platform_domain")
    @classmethod
    def _canonical_domain(cls, value: str | None) -> str | None:
        return canonical_domain(value) if value else value

    @field_validator("throttling")
    @classmethod
    def _throttling(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @field_validator("smarthost")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @field_validator("sender_domains", "recipient_domains")
    @classmethod
    def _canonical_list(cls, value: list[str]) -> list[str]:
        return [canonical_domain(d) for d in value]

    @field_validator("routing_headers")
    @classmethod
    def _lower_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.strip().lower(): v.strip() for k, v in value.items()}

    @field_validator("defer_times")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations in seconds")
        return value


class Dns(Section):
    # Empty: the system resolver's nameservers (/etc/resolv.conf).
    nameservers: list[str] = Field(default_factory=list)
    port: int = Field(default=53, ge=1, le=65535)
    timeout: float = Field(default=5.0, gt=0)


class Tls(Section):
    """Outbound TLS of the senders: certificate checks and MTA-STS (RFC 8461)."""

    # A PEM bundle of CA certificates trusted besides the system's, for MX certificates and
    # MTA-STS policy hosts; None: the system's CAs only.
    ca_file: str | None = None
    # Apply the MTA-STS policies of recipient domains (never for smarthost zones).
    mta_sts: bool = True
    # Seconds a policy fetch (https://mta-sts.<domain>/.well-known/mta-sts.txt) may take.
    mta_sts_timeout: float = Field(default=10.0, gt=0)


class Queue(Section):
    default_zone: str = "default"
    # How long a sender owns leased deliveries; an expired lease makes them ready again.
    lease_time: float = Field(default=300.0, gt=0)
    max_batch: int = Field(default=100, ge=1, le=1000)
    # Deliveries are leased for this long when handed out (at most lease_time); the sender
    # that gets them extends the lease at once.
    claim_time: float = Field(default=15.0, gt=0)
    # Seconds each queue replica caches the pauses (0: read for every work request).
    pauses_ttl: float = Field(default=2.0, ge=0)
    # A Date header up to this far in the future (and more than 5 minutes ahead) holds the
    # message until then; 0 turns delayed delivery off (the original's futureDate: false).
    max_future_date: float = Field(default=0.0, ge=0)
    # A slice of a zone's pool whose sender pod has not asked for work for this long has
    # its deliveries handed to the zone's other pods.
    sender_timeout: float = Field(default=30.0, gt=0)
    housekeeping_interval: float = Field(default=10.0, gt=0)
    # Garbage collection: how often, and how old a message without deliveries must be
    # before its body is removed (a younger one may still be on its way in).
    gc_interval: float = Field(default=60.0, gt=0)
    orphan_age: float = Field(default=600.0, gt=0)


API_SCOPES = ("send", "admin")


class ApiKey(Section):
    name: str = Field(min_length=1)
    # "sha256:<hex>" of the key (python -m zmta_api new-key prints a key and its hash).
    hash: str
    scopes: list[str] = Field(default_factory=lambda: ["send"])
    # Whether X-Authenticated-User and X-Originating-IP from this key are believed.
    may_set_user: bool = False

    @field_validator("hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        algorithm, _, digest = value.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("must be sha256:<64 hex digits> (see python -m zmta_api new-key)")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(API_SCOPES))
        if unknown or not value:
            raise ValueError(f"scopes must be some of {', '.join(API_SCOPES)} (got {', '.join(unknown) or 'none'})")
        return value


class Api(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=12080, ge=0, le=65535)
    maildrop: bool = True
    max_body: int = Field(default=30 * MIB, ge=1024)
    keys: list[ApiKey] = Field(default_factory=list)
    # More keys from a file (YAML list of the same entries): a mounted Kubernetes Secret.
    keys_file: str | None = None
    # The original's API: no key needed. Only for an API that listens on loopback.
    open_access: bool = False
    # /openapi.json, /docs and /redoc without a key (by default they need one, any scope).
    public_docs: bool = False
    # Recipients of one message submitted through /send or /send-raw (400 above it), as
    # smtp_interfaces.<name>.max_recipients is for SMTP.
    max_recipients: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Api:
        if self.open_access and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"open_access needs the API on loopback, not on {self.host}")
        return self


class Bounce(Section):
    # How long a sender waits for the classifier before it just defers.
    classify_timeout: float = Field(default=2.0, gt=0)
    # How long a local address stays unused for a recipient domain that said it is listed.
    blacklist_ttl: float = Field(default=3600.0, gt=0)
    # Send a delivery status notification to the sender of a message that bounced.
    dsn: bool = True
    # The zone that carries DSNs; by default "bounces" if there is one, else the default zone.
    zone: str | None = None
    # The operator's bounce rule files (YAML, as the built-in rules.yaml), checked in
    # order before the built-in rules.
    rules_files: list[str] = Field(default_factory=list)
    # A "delayed" DSN once a delivery has been failing this long after it was queued
    # (Postfix's delay_warning_time); off unless delay_warning is on.
    delay_warning: bool = False
    delay_warning_after: float = Field(default=3 * 3600.0, gt=0)
    # Add a recipient to the suppression list when a server refused it for good as unknown.
    suppress_unknown_recipients: bool = False
    # HTTP bounce notifications: every bounce is POSTed to each URL (form fields of the
    # original's http-bounce plugin), retried until the receiver answers 2xx.
    notify_urls: list[HttpUrl] = Field(default_factory=list)
    # Retry delays in seconds, indexed by the number of failed tries; the last repeats.
    notify_backoff: list[float] = Field(default_factory=lambda: [1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 60.0, 300.0])
    # A notification still refused this long after the bounce is given up (logged).
    notify_max_age: float = Field(default=48 * 3600.0, gt=0)
    notify_timeout: float = Field(default=10.0, gt=0)

    @field_validator("notify_backoff")
    @classmethod
    def _backoff(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations in seconds")
        return value


CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")


class DkimKey(Section):
    domain: str = Field(min_length=1)
    selector: str = Field(min_length=1)
    # A PEM private key (RSA 1024-4096 bits or Ed25519), or the path of a file holding one.
    private_key: str = Field(min_length=1)

    @field_validator("domain")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_domain(value)


class Dkim(Section):
    """DKIM signing at send time, from the body hash computed at intake."""

    enabled: bool = True
    # A directory of keys named <domain>.<selector>.pem (a Kubernetes Secret mounted as files).
    key_dir: str | None = None
    keys: list[DkimKey] = Field(default_factory=list)
    # header/body canonicalization of every signature.
    canonicalization: str = "relaxed/relaxed"
    # Header fields to sign (those present); empty: the usual set, From over-signed.
    sign_headers: list[str] = Field(default_factory=list)
    # Signatures expire (x=) this many seconds after signing; 0: no expiry.
    expire: float = Field(default=0.0, ge=0)

    @field_validator("canonicalization")
    @classmethod
    def _canon(cls, value: str) -> str:
        if value not in CANONICALIZATIONS:
            raise ValueError(f"must be one of {', '.join(CANONICALIZATIONS)}")
        return value

    @property
    def body_canonicalization(self) -> str:
        return self.canonicalization.split("/")[1]


class Plugin(BaseModel):
    """One plugin: ``enabled`` and whatever options the plugin itself takes."""

    model_config = ConfigDict(extra="allow")
    enabled: bool = True

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Metrics(Section):
    """Where each service serves /metrics and /health (the api serves them on its own port)."""

    host: str = "127.0.0.1"
    ingest_port: int = Field(default=12091, ge=0, le=65535)
    queue_port: int = Field(default=12092, ge=0, le=65535)
    sender_port: int = Field(default=12093, ge=0, le=65535)
    bounce_port: int = Field(default=12094, ge=0, le=65535)


def _default_zones() -> dict[str, Zone]:
    return {"default": Zone(), "bounces": Zone(connections=1)}


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ZMTA_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    # Used in the Received header: "by <hostname> (<name>)".
    name: str = "ZoneMTA"
    hostname: str = Field(default_factory=socket.getfqdn)
    log_level: str = "INFO"
    dbs: Databases = Field(default_factory=Databases)
    smtp_interfaces: dict[str, SmtpInterface] = Field(default_factory=lambda: {"feeder": SmtpInterface()})
    api: Api = Field(default_factory=Api)
    queue: Queue = Field(default_factory=Queue)
    zones: dict[str, Zone] = Field(default_factory=_default_zones)
    dns: Dns = Field(default_factory=Dns)
    tls: Tls = Field(default_factory=Tls)
    bounce: Bounce = Field(default_factory=Bounce)
    dkim: Dkim = Field(default_factory=Dkim)
    # Python plugins by import path, in the order they run: {"my_pkg.plugin": {enabled, ...options}}.
    plugins: dict[str, Plugin] = Field(default_factory=dict)
    metrics: Metrics = Field(default_factory=Metrics)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @model_validator(mode="after")
    def _named_zones_exist(self) -> Config:
        for key, zone in (("queue.default_zone", self.queue.default_zone), ("bounce.zone", self.bounce.zone)):
            if zone is not None and zone not in self.zones:
                raise ValueError(f"{key} {zone!r} is not one of the zones ({', '.join(sorted(self.zones))})")
        return self

    @property
    def dsn_zone(self) -> str:
        if self.bounce.zone is not None:
            return self.bounce.zone
        return "bounces" if "bounces" in self.zones else self.queue.default_zone

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{key}: {item['msg']} (got {shown})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Load and validate the configuration; raise ConfigError that names every bad key."""
    if path is None:
        path = os.environ.get(CONFIG_FILE_ENV) or None
    yaml_path = Path(path) if path else None
    if yaml_path is not None and not yaml_path.is_file():
        raise ConfigError(f"config file {yaml_path} does not exist")
    token = _yaml_path.set(yaml_path)
    try:
        return Config(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _yaml_path.reset(token)
