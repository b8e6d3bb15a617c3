"""The one configuration every service reads.

One YAML file for every service (``--config FILE`` or ``ZMTA_CONFIG_FILE``); the defaults
are the models of ``libs/common/zmta_common/config.py``, and each key's description below
is its field's ``description`` there. Sources, weakest first: those defaults, the YAML
file, then environment variables: any key can be overridden from the environment as
``ZMTA_<SECTION>__<KEY>``, for example ``ZMTA_DBS__POSTGRES=postgresql://...``.
Unknown keys anywhere are errors, and every error names the key and the bad value
(``ConfigError``):

```
ingest: invalid configuration:
  zones.default.conections: Extra inputs are not permitted (got 4)
```

Defaults follow the original ZoneMTA: SMTP feeder on 127.0.0.1:2525, HTTP API on
127.0.0.1:12080, zones ``default`` and ``bounces``. Durations are in seconds and sizes in
bytes unless a key says otherwise.
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
from .sites import site_name

CONFIG_FILE_ENV = "ZMTA_CONFIG_FILE"
_yaml_path: ContextVar[Path | None] = ContextVar("_yaml_path", default=None)

MIB = 1024 * 1024
# The original's retry schedule in minutes (5, 7, 8, 25, 75, 120, then 240 x 11).
DEFAULT_DEFER_TIMES: list[float] = [60.0 * m for m in (5, 7, 8, 25, 75, 120, *[240] * 11)]

# json_schema_extra key of a field whose default the documentation shows as this text
# instead of the value (a default computed on the machine that runs the service).
DOC_DEFAULT = "doc_default"


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
    """Where the stores are: PostgreSQL holds the queue, Redis what sender pods share, NATS
    carries the events."""

    postgres: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/zonemta", description="PostgreSQL URL of the queue"
    )
    redis: str = Field(default="redis://127.0.0.1:6379/3", description="Redis URL: shared caches and counters")
    nats: str = Field(default="nats://127.0.0.1:4222", description="NATS URL: events (JetStream must be on)")
    postgres_pool_size: int = Field(
        default=20,
        ge=1,
        le=500,
        description="PostgreSQL connections per process for the queue's work; up to a quarter as many more"
        " (at least 1) are opened, only when used, for the chunks of big messages being received",
    )
    commit_check_time: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds the ingest keeps asking PostgreSQL, after a commit failed in a way that may"
        " have gone through (the connection lost while committing), whether the message was stored,"
        " before it answers 451; so that a client is not told to send again what is queued already",
    )


class SmtpInterface(Section):
    """An SMTP listener of the ingest service; the default interface is ``feeder``.

    ### What one client may take

    Nothing a client sends reaches a header we write unchecked, and one client cannot starve
    the others, with or without credentials:

    - An EHLO/HELO name with a line break, a control character or a space, or over 255
      characters, gets ``501``: it would be copied into our ``Received`` header. Every value we
      write into a header is cleaned where it is written (``?`` for a control character, as
      Postfix does), and the header block a sender puts on the wire never holds a bare CR or
      LF, whatever a plugin did.
    - Connections per client address, at once and per minute, and error replies per
      connection are limited (the table above); the listen backlog takes bursts of 1024.
    - A client in DATA holds no database connection while it sends: a message bigger than one
      1 MiB chunk has each chunk written by a statement of its own, and only the
      end of DATA commits the message with its deliveries. A client slower than
      ``min_data_rate`` is disconnected. So 25 clients trickling a byte a second into DATA and
      300 idle connections from one address leave a legitimate client's message accepted in
      well under a second (``tests/integration/test_ingest_abuse.py``).
    - Refused AUTH attempts are counted per client address across every ingest pod, and
      answered late (1 s); password checks in flight are bounded (``auth_concurrency``).
    - The API checks the key from the request's headers before it reads the body, stops
      reading a body at its limit, caps recipients (``api.max_recipients``), and answers 400,
      never 500, to any text that cannot go into a header (U+2028, U+0085, other controls).

    ### MSA (port 587/465)

    Mail submission for clients elsewhere: STARTTLS on 587 and TLS from the first byte on 465,
    AUTH required from every client outside ``relay_networks`` (only the host itself here). The
    feeder stays on loopback without AUTH.

    ```yaml
    smtp_interfaces:
      feeder: {}                      # 127.0.0.1:2525, loopback clients, no AUTH
      submission:
        host: 0.0.0.0
        port: 587
        tls_cert: /etc/zonemta/tls/fullchain.pem
        tls_key: /etc/zonemta/tls/privkey.pem
        relay_networks: ["127.0.0.1/32"]
        auth: true
        users:                        # echo 'the password' | python -m zmta_ingest hash-password
          alice: "$argon2id$v=19$m=65536,t=3,p=4$..."
      submissions:
        host: 0.0.0.0
        port: 465
        implicit_tls: true
        tls_cert: /etc/zonemta/tls/fullchain.pem
        tls_key: /etc/zonemta/tls/privkey.pem
        relay_networks: ["127.0.0.1/32"]
        auth: true
        auth_url: https://accounts.example.com/smtp-auth   # or users, as above
    ```
    """

    enabled: bool = Field(default=True, description="whether ingest listens on this interface")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=2525, ge=0, le=65535, description="port to listen on")
    hostname: str | None = Field(default=None, description="name in the greeting; unset: the top-level `hostname`")
    max_size: int = Field(
        default=30 * MIB, ge=1024, description="advertised SIZE in bytes (30 MiB); larger messages get 552"
    )
    max_recipients: int = Field(default=1000, ge=1, description="more RCPTs get 452")
    allow_routing_headers: bool = Field(
        default=False,
        description="honour `X-Sending-Zone` (the original honours it on its api and bounce interfaces only)",
    )
    socket_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds of client idleness (in DATA too: between two blocks received)",
    )
    # A slow client holds no database connection, but this frees its socket and buffer.
    min_data_rate: int = Field(
        default=500,
        ge=0,
        description="in DATA, a client that sends fewer than this many bytes per second over any window of"
        " `data_rate_window` seconds gets `421 4.4.2 DATA too slow` and is disconnected; `0`: no minimum"
        " (Postfix's `smtpd_min_data_rate`)",
    )
    data_rate_window: float = Field(default=30.0, gt=0, description="seconds over which `min_data_rate` is measured")
    max_connections_per_client: int = Field(
        default=50,
        ge=0,
        description="connections one client address may have open at once; past that"
        " `421 4.7.0 <host> Error: too many connections from <ip>` before the greeting (Postfix's anvil"
        " default); `0`: no limit. Counted per ingest process",
    )
    max_connection_rate_per_client: int = Field(
        default=0,
        ge=0,
        description="new connections one client address may open per minute, else the same 421; `0`: off",
    )
    client_limit_exceptions: list[str] = Field(
        default_factory=list,
        description="CIDRs whose clients the two limits above do not count (your own application servers,"
        " if they need more)",
    )
    max_errors_per_connection: int = Field(
        default=20,
        ge=1,
        description="error replies (4xx/5xx) one connection may get; then `421 4.7.0 Too many errors` and the"
        " connection is closed (Postfix's `smtpd_hard_error_limit`)",
    )
    tls_cert: str | None = Field(
        default=None,
        description="PEM file of the certificate (chain); with it the interface offers STARTTLS. Read when"
        " ingest starts: a missing or bad file stops it with an error naming the key",
    )
    tls_key: str | None = Field(
        default=None, description="PEM file of the certificate's private key; unset: the key is in `tls_cert`"
    )
    implicit_tls: bool = Field(
        default=False,
        description="TLS from the first byte (port 465 style) instead of STARTTLS; needs `tls_cert`",
    )
    relay_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="CIDRs of trusted clients, which may send without AUTH. Any other client gets"
        " `530 5.7.0 Authentication required` at MAIL FROM where the interface has AUTH, else"
        " `554 5.7.1 Relaying denied`. An interface that listens beyond loopback (a pod, `0.0.0.0`) needs"
        " its clients' networks here",
    )
    auth: bool = Field(
        default=False,
        description="offer AUTH PLAIN and LOGIN (an MSA); needs `users` or `auth_url`. Wrong credentials get"
        " `535 5.7.8`, and every success or failure is logged with user and client address",
    )
    auth_without_tls: bool = Field(
        default=False,
        description="offer AUTH on a connection that is not encrypted (loopback tests, legacy clients; the"
        " original's `allowInsecureAuth`). Otherwise AUTH is advertised and taken only after STARTTLS or on"
        " an `implicit_tls` port, and `auth` needs `tls_cert`",
    )
    users: dict[str, str] = Field(
        default_factory=dict,
        description="`{user: argon2 hash}`; make a hash with `python -m zmta_ingest hash-password` (reads the"
        " password on stdin). The user name is recorded in the message's meta as `user`",
    )
    auth_url: HttpUrl | None = Field(
        default=None,
        description="check AUTH with an HTTP service instead of `users`, as the original's http-auth plugin:"
        " `GET <auth_url>?transport=SMTP` with the credentials as HTTP Basic authorization. 2xx accepts,"
        " 4xx refuses (535), anything else or no answer within `auth_timeout` seconds is a temporary failure"
        " (`454 4.7.0`)",
    )
    auth_timeout: float = Field(default=10.0, gt=0, description="seconds an `auth_url` check may take")
    auth_max_failures: int = Field(
        default=10,
        ge=1,
        description="a client address whose AUTH was refused this many times within `auth_failure_window`"
        " (counted in Redis, so across every ingest pod) gets `454 4.7.0 Too many failed authentications` to"
        " every AUTH, right password or not, until the window ends",
    )
    auth_failure_window: float = Field(default=600.0, gt=0, description="seconds over which `auth_max_failures` counts")
    auth_concurrency: int = Field(
        default=2,
        ge=1,
        description="password checks (argon2, 64 MiB each) run at once per interface; as many more may wait,"
        " past that AUTH gets `454 4.7.0` at once",
    )

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
    """One local address of a zone's pool."""

    name: str = Field(min_length=1, description="the EHLO and `Received` host name of this address")
    address: str = Field(description="the local IPv4 or IPv6 address to send from")
    ratio: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="the address's share of the zone's mail, for warm-up (`0.05`: about 5%; `0`: unused); unset:"
        " an equal share of the deliveries that no address with a ratio claims",
    )

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

    connections: int | None = Field(
        default=None,
        ge=1,
        description="open SMTP connections at once (parked ones kept for reuse included), across all sender"
        " pods; `null` explicitly lifts the limit",
    )
    rate: str | None = Field(default=None, description='messages per period, as `"100/min"` or `"10000/hour"`')

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
    """Zone-wide limits and settings for one recipient domain (``"*"``: every domain without
    an entry of its own). The entries are merged field by field: what the domain's entry
    sets, else what ``"*"`` sets, else the built-in default (5 connections).

    #### Delivery to HTTP

    A recipient domain with ``http_url`` (or a delivery a ``sender:fetch`` plugin gives an
    ``http_url``) is POSTed to that URL instead of being sent over SMTP, as
    ``multipart/form-data`` with the fields ``id`` (``<id>.<seq>``), ``from``, ``to`` and the file
    ``message`` (``<id>.eml``, ``message/rfc822``, streamed from the store). A 2xx answer is a
    delivery, a 5xx a rejection (bounce), anything else (or no answer) a deferral.

    ```yaml
    zones:
      default:
        domains:
          tickets.example.com: {http_url: "https://helpdesk.internal/mail-in"}
    ```
    """

    disabled_addresses: list[str] = Field(
        default_factory=list, description="pool addresses never used for this recipient domain"
    )
    tls: TlsMode | None = Field(
        default=None, description="the zone's `tls` for this recipient domain; unset: the zone's"
    )
    dane: bool | None = Field(
        default=None,
        description='`tls.dane` for this recipient domain (`"*"`: for the zone); unset: `tls.dane`. `true`'
        " needs `dns.dnssec`",
    )
    http_url: HttpUrl | None = Field(
        default=None, description="deliver the domain's mail by POSTing it to this URL instead of over SMTP"
    )


DEFAULT_DOMAIN_CONNECTIONS = 5
DEFAULT_SITE_CONNECTIONS = 20


def _merge_policies(*layers: DomainPolicy | None) -> DomainPolicy:
    """The built-in default, then each layer's explicitly set fields over it."""
    fields: dict[str, Any] = {"connections": DEFAULT_DOMAIN_CONNECTIONS}
    for layer in layers:
        if layer is not None:
            fields.update({name: getattr(layer, name) for name in layer.model_fields_set})
    return DomainPolicy.model_validate(fields)


class Zone(Section):
    """A sending zone: a pool of local addresses with its own pace and limits. An example with
    a warm-up address, limits for one provider and for the Microsoft-hosted domains:

    ```yaml
    zones:
      default:
        connections: 20                 # parallel deliveries per sender process
        throttling: 300/min             # per connection
        pool:
          - {name: mta1.example.com, address: 192.0.2.1}
          - {name: mta2.example.com, address: 192.0.2.2}
          - {name: mta3.example.com, address: 2001:db8::3}
          - {name: warm.example.com, address: 192.0.2.4, ratio: 0.05}   # about 5% of the mail
        ignore_ipv6: false
        domains:
          "*": {connections: 5}
          gmail.com: {connections: 10, rate: 10000/hour}
          example.net: {disabled_addresses: [192.0.2.2]}
        mx_hosts:
          "*.mail.protection.outlook.com": {connections: 20, rate: 300/min}
      bulk:
        recipient_domains: [yahoo.com]
        pool: [{name: bulk1.example.com, address: 198.51.100.1}]
      bounces: {}
    ```

    - **Limits hold for the zone as a whole.** When the queue leases work it admits a
      delivery only if its recipient domain (and the MX host group of that domain) has room:
      deliveries in flight below ``connections``, and the ``rate`` (GCRA in Redis, one Lua script
      per lease, so queue replicas and sender pods cannot race). Domains at a limit go on a
      short skip list, as the original's skipDomains. Each open SMTP connection, busy or
      parked for reuse, holds a slot of its domain and MX group in Redis, so the receiving
      server never sees more connections from the zone than allowed, however many sender pods
      there are; a sender waiting for a slot makes the others close their parked connections.
    - **Sender pods own slices of the pool.** ``python -m zmta_sender --zone default --slice 1/3``
      (or ``ZMTA_SLICE_COUNT=3`` with the StatefulSet ordinal at the end of the pod's host name,
      or ``ZMTA_SLICE_INDEX``) is pod 1 of 3 and sends only from the pool addresses at positions
      1, 4, 7...; with more pods than addresses, pods share. The queue picks each delivery's
      address from the whole pool and hands the delivery to the pod that owns it, so a retry
      leaves from the same address whichever pod is asked (greylisting); if no pod of a slice
      has asked for work for ``queue.sender_timeout`` seconds, the other pods take its mail.
    - **International domains.** A domain is one key wherever state is kept for it: the
      store, Redis, the configuration (``domains``, ``recipient_domains``, ``sender_domains``, DKIM
      keys and key file names, ``dkim_*_domain``). Each is taken in one canonical form, lower
      case, no trailing dot, an international name as its A-label (IDNA 2008, UTS 46), so
      ``Exämple.test``, ``exämple.test.`` and ``xn--exmple-cua.test`` are the same domain everywhere.
      Recipient addresses themselves go to the next hop as they were written. Rows written by
      an earlier version are rewritten to this form by the schema migration.
    - **IPv6** is used when the zone has IPv6 addresses and ``ignore_ipv6: false``; MX hosts are
      tried in preference order, each with the addresses of the delivery's IP version (a
      delivery assigned an IPv4 address switches to one of the pod's IPv6 addresses for an
      IPv6-only MX, and back).
    """

    connections: int = Field(
        default=10, ge=1, le=10000, description="parallel deliveries per sender process (`bounces`: 1)"
    )
    pool: list[PoolAddress] = Field(
        default_factory=list, description="the zone's local addresses; empty: the operating system picks"
    )
    smarthost: str | None = Field(
        default=None, description="`host:port` that replaces MX lookup for every recipient (Postfix's relayhost)"
    )
    mx_port: int = Field(default=25, ge=1, le=65535, description="port of the recipients' MX servers")
    tls: TlsMode = Field(
        default="opportunistic",
        description="outbound STARTTLS. `opportunistic`: when offered; a certificate that does not verify is"
        " accepted, and a failed handshake is retried once in plain text. `required`: STARTTLS must be offered"
        " and the certificate must verify (chain to the system CAs or `tls.ca_file`, name = MX host), else the"
        " delivery is deferred (category `tls`) with the reason, e.g. `TLS required by policy:"
        " mx.a.test[127.0.0.2] certificate verify failed: self-signed certificate`. `none`: never STARTTLS,"
        " and no MTA-STS. Each delivery's report and log line carry its TLS (`version=TLSv1.3 cipher=..."
        " verified=yes` or `no`, or `none`), counted in the sender's"
        " `zonemta_delivery_tls{version,verified,zone}`",
    )
    ignore_ipv6: bool = Field(default=True, description="skip AAAA records and IPv6 pool addresses")
    routing_headers: dict[str, str] = Field(
        default_factory=dict, description="`{header: value}`: messages with such a header are routed to this zone"
    )
    sender_domains: list[str] = Field(default_factory=list, description="envelope sender domains routed here")
    recipient_domains: list[str] = Field(
        default_factory=list, description="recipient domains routed here (per recipient)"
    )
    defer_times: list[float] = Field(
        default_factory=lambda: list(DEFAULT_DEFER_TIMES),
        description="retry delays in seconds, indexed by the number of earlier deferrals and measured from the"
        " failed attempt (5, 7, 8, 25, 75, 120 min, then 240 min 11 times); a soft failure after the last one"
        " bounces (about 48 h)",
    )
    max_age: float = Field(
        default=48 * 3600.0,
        gt=0,
        description="seconds (48 h); a delivery whose next attempt would fall later than this after it was"
        " queued bounces instead",
    )
    connect_timeout: float = Field(default=60.0, gt=0, description="seconds a connection to an MX may take")
    command_timeout: float = Field(default=300.0, gt=0, description="seconds an SMTP command's reply may take")
    throttling: str | None = Field(
        default=None,
        description="per connection: at most so many messages over one connection, as `10/min` (units sec,"
        " min, hour, day)",
    )
    slot_ttl: float = Field(
        default=15.0,
        ge=2,
        description="seconds a connection's slot in Redis lives without renewal (senders renew them twice a"
        " second): how long the connections of a sender pod that died without closing them still count"
        " against their domain's and MX group's `connections` limit",
    )
    domains: dict[str, DomainPolicy] = Field(
        default_factory=dict,
        description='zone-wide limits per recipient domain; `"*"` is the default for every domain without an'
        ' entry of its own; with no entries at all every domain gets `"*": {connections: 5}`',
    )
    dkim_fallback_domain: str | None = Field(
        default=None, description="sign for this domain when the From domain has no key"
    )
    dkim_platform_domain: str | None = Field(
        default=None, description="also sign every message for this domain (the sending platform's signature)"
    )
    sites: Limit = Field(
        default_factory=lambda: Limit(connections=DEFAULT_SITE_CONNECTIONS),
        description="MX rollup: limits per *site*, the set of MX hosts a recipient domain's mail goes to"
        " (`alt1.aspmx.l.google.com,aspmx.l.google.com,...`), so that every domain one provider hosts shares"
        " one budget without configuration; counted across all sender pods like the domain limits. The queue"
        " looks up the MX of a domain no sender has resolved yet before it leases, so the limit holds from the"
        " first delivery of a burst. Default 20 connections (Postfix's `default_destination_concurrency_limit`),"
        " no rate. A domain whose best MX host matches an `mx_hosts` pattern is in that pattern's site instead",
    )
    mx_hosts: dict[str, Limit] = Field(
        default_factory=dict,
        description="sites by pattern, overriding `sites`: the same `connections`/`rate` limits for all"
        ' recipient domains whose best MX host matches the pattern (`"*.mail.protection.outlook.com"`,'
        " whose hosts differ per domain), counted together",
    )
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

    def site_of(self, hosts: list[str]) -> str:
        """The site of a domain whose MX hosts are ``hosts``, best first: the ``mx_hosts``
        pattern of the best one, else the set of them (:func:`zmta_common.sites.site_name`)."""
        return self.mx_group(hosts[0]) or site_name(hosts)

    def site_limit(self, site: str) -> Limit:
        """The limits of a site named by :meth:`site_of`."""
        return self.mx_hosts.get(site) or self.sites

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
    """The resolver of MX lookups."""

    nameservers: list[str] = Field(
        default_factory=list, description="nameserver addresses; empty: the system resolver's (/etc/resolv.conf)"
    )
    port: int = Field(default=53, ge=1, le=65535, description="port of the nameservers")
    timeout: float = Field(default=5.0, gt=0, description="seconds a lookup may take")
    dnssec: bool = Field(
        default=False,
        description="the nameservers validate DNSSEC, and their AD flag (the answer is authenticated) is"
        " trusted: Postfix's `smtp_dns_support_level = dnssec`. Needed for DANE (`tls.dane`), which it turns"
        " on by default. Use a validating resolver on the same host or a network you trust (unbound, BIND,"
        " Knot Resolver): the AD flag itself travels unprotected",
    )


class Tls(Section):
    """Outbound TLS of the senders: certificate checks, MTA-STS (RFC 8461) and DANE (RFC 7672)."""

    ca_file: str | None = Field(
        default=None,
        description="PEM bundle of CA certificates trusted as well, for MX certificates and MTA-STS policy"
        " hosts; unset: the system CAs only",
    )
    mta_sts: bool = Field(
        default=True,
        description="MTA-STS (RFC 8461) for recipient domains, not for smarthost zones: TXT"
        " `_mta-sts.<domain>`, policy from `https://mta-sts.<domain>/.well-known/mta-sts.txt` (verified"
        " certificate, no redirects, 64 KiB at most), cached in Redis `zmta:sts:<domain>` for its `max_age`"
        " (60 s to 7 days) and fetched again when the TXT id changes. `enforce`: only the MX hosts it names"
        " are used, with verified TLS; none left defers the delivery (`MTA-STS policy of a.test (enforce)"
        " allows none of its MX hosts: mx.a.test`). `testing`: mismatches are logged. A policy that cannot"
        " be fetched: the cached one, else none",
    )
    mta_sts_timeout: float = Field(default=10.0, gt=0, description="seconds an MTA-STS policy fetch may take")
    dane: bool | None = Field(
        default=None,
        description="DANE (RFC 7672) for recipient domains, not for smarthost zones: Postfix's"
        " `smtp_tls_security_level = dane`; unset: on when `dns.dnssec` is, and `true` needs `dns.dnssec`."
        " When the domain's MX records are DNSSEC-secure, and an MX host's address and TLSA records"
        " (`_<mx_port>._tcp.<host>`) are too, that host must offer STARTTLS and its certificate must match"
        " one of them: DANE-EE (`3 x x`: the certificate or its public key; name and dates not checked) or"
        " DANE-TA (`2 x x`: a certificate of the chain it presents, which must issue its certificate, with"
        " the MX host name and dates checked). A mismatch, no STARTTLS, or a TLSA lookup that fails (bogus)"
        " defers the delivery to that host (`451 4.7.5 DANE: certificate of mx.a.test[192.0.2.1] matches"
        " none of its 2 TLSA records`). PKIX records only (usages 0 and 1, unusable for SMTP): TLS required,"
        " certificate not checked. No TLSA records, or insecure answers: the `tls` mode and MTA-STS as"
        " without DANE. DANE takes precedence over MTA-STS for the hosts it covers; `tls: none` turns both"
        " off. Answers are cached in Redis (`zmta:dane:<domain>`, `zmta:tlsa:<host>:<port>`) for their TTL,"
        " 10 minutes at most; the report of a delivery says `dane=DANE-EE` (or `DANE-TA`, `unusable`)",
    )


class TlsReporting(Section):
    """SMTP TLS reporting (RFC 8460): what the senders met under the recipient domains' TLS
    policies, reported to those domains once a day.

    With ``enabled``, the senders count each SMTP session to an MX host that a recipient
    domain's MTA-STS policy (``enforce`` or ``testing``) or DANE TLSA records cover: the
    successful ones, and the failed ones by RFC 8460 result type with the sending address, the
    MX host and its address; a policy that cannot be fetched and a bogus TLSA lookup count as
    failures too. The counts are kept in Redis per domain and UTC day for ``retention_days``.
    Domains without such a policy cost nothing and get no report.

    Once a day, from ``hour`` (UTC) on, a bounce service replica reports the previous day to
    each of those domains that publishes a TXT record ``_smtp._tls.<domain>``
    (``v=TLSRPTv1; rua=mailto:...,https://...``): the gzipped JSON report of RFC 8460
    section 4.4, mailed through the zone of DSNs (``bounce.zone``) as a
    ``multipart/report; report-type="tlsrpt"``, or POSTed as ``application/tlsrpt+gzip``.
    One replica reports each domain and day (a Redis marker). ``python -m zmta_bounce
    tls-report --day YYYY-MM-DD`` reports one day at once.
    """

    enabled: bool = Field(
        default=False,
        description="count the TLS sessions under MTA-STS and DANE in the senders, and send the daily reports"
        " from the bounce service",
    )
    organization_name: str | None = Field(
        default=None, description="`organization-name` of the reports; unset: the `submitter`"
    )
    submitter: str | None = Field(
        default=None,
        description="the reporting domain: the reports' `TLS-Report-Submitter` header, the first part of their"
        " file name and the domain of their `report-id`; unset: the top-level `hostname`",
    )
    contact_info: str | None = Field(
        default=None, description="`contact-info` of the reports (an address to ask about them); unset: `from_address`"
    )
    from_address: str | None = Field(
        default=None,
        description="`From` and envelope sender of the mailed reports; unset: `noreply-tlsrpt@<submitter>`. RFC"
        " 8460 wants them DKIM-signed by the reporting domain: give that domain a key (`dkim`)",
    )
    hour: int = Field(default=1, ge=0, le=23, description="the hour (UTC) from which the previous day is reported")
    retention_days: int = Field(
        default=3, ge=2, le=30, description="days the counts of a day stay in Redis (`zmta:tlsrpt:...`)"
    )
    post_timeout: float = Field(default=30.0, gt=0, description="seconds an HTTPS report POST may take")


class Queue(Section):
    """The queue service: leasing, housekeeping and garbage collection."""

    default_zone: str = Field(default="default", description="zone when no routing rule matches")
    lease_time: float = Field(
        default=300.0,
        gt=0,
        description="seconds a sender owns leased deliveries (renewed while it works on them; an expired lease"
        " makes them ready again); a report the queue fetched but never acknowledged comes back after a third"
        " of it (60 s at most), well before its lease runs out",
    )
    max_batch: int = Field(default=100, ge=1, le=1000, description="most deliveries handed out per request")
    claim_time: float = Field(
        default=15.0,
        gt=0,
        description="seconds deliveries are leased for when handed out (at most `lease_time`): the sender that"
        " gets them extends the lease at once; if the answer never reached it, they are ready again this soon",
    )
    pauses_ttl: float = Field(
        default=2.0,
        ge=0,
        description="seconds each queue replica keeps the paused zones and domains before reading them from"
        " PostgreSQL again (so a pause or resume through the API takes effect within this time); `0`: read"
        " them for every work request",
    )
    max_future_date: float = Field(
        default=0.0,
        ge=0,
        description="delayed delivery: a message whose Date header is more than 5 minutes ahead waits until"
        " then, at most this many seconds; `0`: off (the original's `futureDate: false`)",
    )
    sender_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds after which the deliveries of a pool slice whose sender has stopped asking for"
        " work go to the zone's other senders",
    )
    housekeeping_interval: float = Field(
        default=10.0, gt=0, description="seconds between expired-lease sweeps and gauge updates"
    )
    gc_interval: float = Field(
        default=60.0,
        gt=0,
        description="seconds between garbage collections: deliveries older than their zone's `max_age` are"
        " bounced (never dropped silently), messages left without deliveries are removed",
    )
    orphan_age: float = Field(
        default=600.0,
        gt=0,
        description="seconds a message without deliveries is left alone (it may still be on its way in)"
        " before the collector removes it",
    )


API_SCOPES = ("send", "admin")


class ApiKey(Section):
    """One API key; ``python -m zmta_api new-key --name NAME --scopes admin,send`` prints a key
    and this entry with its hash."""

    name: str = Field(min_length=1, description="the key's name: logged, and recorded as the message's user")
    hash: str = Field(description="`sha256:<hex>` of the key")
    scopes: list[str] = Field(
        default_factory=lambda: ["send"],
        description="`send` (`/send`, `/send-raw`) and/or `admin` (every other route)",
    )
    may_set_user: bool = Field(
        default=False, description="whether `X-Authenticated-User` and `X-Originating-IP` from this key are believed"
    )

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
    """The HTTP API (see [the API reference](api.md))."""

    host: str = Field(default="127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(default=12080, ge=0, le=65535, description="port of the HTTP API")
    maildrop: bool = Field(default=True, description="enables `/send` and `/send-raw`")
    max_body: int = Field(
        default=30 * MIB,
        ge=1024,
        description="bytes (30 MiB); larger bodies of `/send` and `/send-raw` get 413, from `Content-Length`"
        " before a byte is read, and when streamed as soon as the limit is passed (other routes: 1 MiB)",
    )
    keys: list[ApiKey] = Field(default_factory=list, description="the API keys")
    keys_file: str | None = Field(
        default=None, description="more keys from a YAML file (a list of the same entries): a mounted Kubernetes Secret"
    )
    open_access: bool = Field(
        default=False, description="no key needed, as in the original; only allowed with the API on loopback"
    )
    public_docs: bool = Field(
        default=False,
        description="serve `/openapi.json`, `/docs` and `/redoc` without a key (by default any valid key opens them)",
    )
    max_recipients: int = Field(
        default=1000,
        ge=1,
        description="recipients of one message through `/send` or `/send-raw`; more get 400 naming the limit,"
        " before any work per recipient (as `smtp_interfaces.<name>.max_recipients` is for SMTP)",
    )

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Api:
        if self.open_access and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"open_access needs the API on loopback, not on {self.host}")
        return self


class DeliveryLog(Section):
    """The delivery log: every event of a message's life, in PostgreSQL, searchable through
    `GET /log` (by message id, recipient, sender, recipient domain, zone, action and time)
    and per message in `GET /message/<id>` (`log`). Actions carry the original's remote-log
    names: `QUEUED` (interface, client, size), `DROP` (a suppressed recipient), `ACCEPTED`,
    `DEFERRED` (with `next_attempt`) and `REJECTED` (each with the reply, its category, the
    MX host, the local address and the TLS of the session), `DELETED` (dropped through the
    API), `HELD` and `RELEASED`. The entries are written in the statements that queue mail
    and apply outcomes, so they cost no round trip of their own."""

    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="days an entry is kept (the queue's garbage collection removes older ones); `0`: no log",
    )
    stream: bool = Field(
        default=False,
        description="also publish each entry on NATS, subject `zmta.log.<action>` (`zmta.log.accepted`...,"
        " msgpack `LogEvent`), for your own analytics; the bounce service reads the log and publishes it,"
        " `stream_lag` seconds behind, at least once",
    )
    webhook_url: HttpUrl | None = Field(
        default=None,
        description="POST the entries to this URL as they are streamed: a JSON array of entries as `GET /log`"
        " shows them, up to 500 a request; a failed POST is tried again (the stream waits for it)",
    )
    stream_lag: float = Field(
        default=5.0,
        ge=1,
        description="seconds an entry is left before it is streamed: entries are numbered when written and"
        " committed a moment later, so the stream reads only those that no transaction still open can precede",
    )


class Shaping(Section):
    """Adaptive traffic shaping: the zones change their own pace when receiving sites push
    back, across every sender pod and queue replica (state in Redis).

    Rules are data: the operator's files, then the shipped `shaping.yaml` (Gmail's 4.7.28
    and rate replies, Microsoft's 4.7.5xx/6xx and S3140-style throttles, Yahoo's TS01-TS04,
    "too many connections", any rate limit seen a few times a minute, a site that keeps
    failing to connect). The first rule a reply matches decides: a regular expression over
    the reply and/or the bounce classifier's category, once or `threshold` times within
    `window` seconds, then an action for `duration` seconds at a scope:

    ```yaml
    - name: provider-busy                 # unique; in logs, the API and metrics
      match: '421 4\\.7\\.0 .*slow down'  # and/or category: rate_limited
      threshold: 3                        # matches within window seconds (default 1, 60)
      window: 60
      scope: site                         # site | site_address | zone
      action: throttle                    # suspend | throttle (scope site)
      connections: 50%                    # of the configured limit, or a number
      rate: 50%                           # of the configured rate (else of what was being sent), or "60/min"
      duration: 600                       # seconds; the same signal again extends it
    ```

    `suspend` at `site` scope leases nothing for the site's domains; at `site_address` scope
    they get other addresses of the pool; at `zone` scope the zone leases nothing. `throttle`
    lowers the site's `connections` and `rate`; pushed back again it is lowered again (at most
    every 5 s), refused again at one connection it becomes a suspension (a dead site), and
    while the site takes mail without push-back it gets one more connection and a quarter
    more pace every 5 s until the configured limits are back. When the duration ends the
    configured values apply again. Overrides in force: `GET /shaping`, lifted by `DELETE
    /shaping/<zone>` (`?site=...&address=...`); each change is logged (`shaping started`,
    `lowered`, `suspended`, `raised`, `recovered`, `ended`, `lifted`); metrics
    `zonemta_shaping_triggered{zone,rule,action}` (senders) and
    `zonemta_shaping_active{zone,scope,action}` (queue).
    """

    enabled: bool = Field(default=True, description="apply the shaping rules; `false`: the configured limits only")
    rules_files: list[str] = Field(
        default_factory=list,
        description="the operator's shaping rule files (YAML, as the shipped `shaping.yaml`), checked in order"
        " before the shipped rules",
    )


class Bounce(Section):
    """The bounce service: it classifies refusals, sends DSNs and HTTP notifications.

    Every refusal a sender meets goes to the bounce service's classifier (NATS
    request/reply; no answer within ``bounce.classify_timeout`` means defer). It turns the
    reply into an **action** and a **category**:

    | action | what happens |
    |---|---|
    | `defer` | retried on the zone's `defer_times` schedule, from the same local address |
    | `blacklist` | retried, from another local address: the refused one rests `bounce.blacklist_ttl` for that domain |
    | `reject` | the delivery ends: DSN, HTTP notification, optional suppression |

    Categories: ``recipient_unknown``, ``mailbox_full``, ``greylisted``, ``rate_limited``,
    ``blacklisted``, ``spam``, ``virus``, ``policy`` (SPF, DKIM, DMARC, PTR, format rules), ``too_large``,
    ``sender``, ``relay``, ``protocol``, ``capacity``, ``tls``, ``dns``, ``network``, ``other``.

    The rules are data: ``services/bounce/zmta_bounce/rules.yaml``, an ordered list of
    ``{pattern, action, category, message}`` where ``pattern`` is a case-insensitive regular
    expression matched against the reply on one line (``550 5.1.1 text...``); the first match
    wins, and a reply no rule matches is deferred (4xx) or rejected (5xx) as ``other``. Add your
    own in files named in ``bounce.rules_files``: they are checked before the built-in ones.
    Whatever a rule says, a 4xx reply (or a 4.x.x status) is never rejected: the server said
    it is temporary, so the delivery is retried until its schedule or ``max_age`` runs out. A
    refusal of MAIL FROM that the rules file as ``recipient_unknown`` or ``other`` is filed as
    ``sender``: it cannot be about the recipient (and must not get the recipient suppressed).
    DNS answers that a domain does not exist or has a null MX bounce at once; connection
    errors and timeouts are deferred.

    **Blacklist back-off.** When the classifier says a refusal means the local address is
    listed, (recipient domain, address) is marked in Redis for ``bounce.blacklist_ttl``; the
    next attempt leaves from another address; when none is left the delivery is deferred, and
    it bounces only at the end of the retry schedule. The gauge ``zonemta_blacklisted`` counts
    the marks.

    A rejected delivery gets, from the bounce service:

    - a DSN (RFC 3464 ``multipart/report; report-type=delivery-status``) from the null sender to
      the envelope sender, through the ``bounces`` zone, unless the sender is null or
      mailer-daemon, or the message is automatic (``Auto-Submitted``, ``Precedence: bulk/list/junk``,
      ``X-Auto-Response-Suppress: All``) or a report itself;
    - one HTTP notification per ``bounce.notify_urls`` entry, retried on ``bounce.notify_backoff``
      until the receiver answers 2xx (kept on JetStream, so restarts lose none);
    - with ``bounce.suppress_unknown_recipients``, a suppression-list entry for a recipient a
      server refused for good as unknown: later mail to it is dropped at intake.
    """

    classify_timeout: float = Field(
        default=2.0, gt=0, description="seconds a sender waits for the classifier before deferring"
    )
    blacklist_ttl: float = Field(
        default=3600.0,
        gt=0,
        description="seconds a local address stays unused for a recipient domain that said it is listed (the"
        " original's real default; its README says 6 h)",
    )
    dsn: bool = Field(
        default=True,
        description="send delivery status notifications (RFC 3464, from the null sender) for rejected"
        " deliveries; never for null senders, automatic mail (`Auto-Submitted`, `Precedence:"
        " bulk/list/junk`) or reports",
    )
    zone: str | None = Field(
        default=None, description="the zone that carries DSNs; unset: `bounces` if it exists, else the default zone"
    )
    rules_files: list[str] = Field(
        default_factory=list,
        description="the operator's bounce rule files (YAML, as the built-in `rules.yaml`), checked in order"
        " before the built-in rules",
    )
    delay_warning: bool = Field(
        default=False,
        description='send one "delayed" DSN (`Action: delayed`, `Will-Retry-Until`) when a delivery is still'
        " failing `delay_warning_after` seconds after it was queued (Postfix's `delay_warning_time`)",
    )
    delay_warning_after: float = Field(
        default=3 * 3600.0, gt=0, description='seconds (3 h) after queueing for the "delayed" DSN'
    )
    suppress_unknown_recipients: bool = Field(
        default=False,
        description="add a recipient to the suppression list when a server refused it for good (5xx) as unknown",
    )
    notify_urls: list[HttpUrl] = Field(
        default_factory=list,
        description="HTTP bounce notifications: each bounce is POSTed to every URL as form fields `id`,"
        " `sessionId`, `to`, `seq`, `returnPath`, `category`, `time` (ms), `response`, `fbl` (the original's"
        " http-bounce plugin)",
    )
    notify_backoff: list[float] = Field(
        default_factory=lambda: [1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 60.0, 300.0],
        description="seconds between tries of a notification the receiver did not answer with 2xx; the last"
        " one repeats. Notifications wait on a JetStream stream, so a restart loses none",
    )
    notify_max_age: float = Field(
        default=48 * 3600.0,
        gt=0,
        description="seconds (48 h); a notification still refused this long after its bounce is given up"
        " (logged as an error)",
    )
    notify_timeout: float = Field(default=10.0, gt=0, description="seconds per notification POST")

    @field_validator("notify_backoff")
    @classmethod
    def _backoff(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations in seconds")
        return value


CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")


class DkimKey(Section):
    """One DKIM private key."""

    domain: str = Field(min_length=1, description="the signing domain (`d=`)")
    selector: str = Field(min_length=1, description="the selector (`s=`)")
    private_key: str = Field(
        min_length=1,
        description="PEM text of the private key (RSA 1024-4096 bits or Ed25519), or the path of a file holding one",
    )

    @field_validator("domain")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_domain(value)


class Dkim(Section):
    """DKIM signing at send time, from the body hash computed at intake.

    The body hash is computed while the message streams in (with the body half of
    ``dkim.canonicalization``) and stored with it; the signature is made at send time over the
    final headers, with the RSA or Ed25519 operation done by ``cryptography`` (dkimpy's RSA is
    pure Python). A message is signed with every key of its From domain (two selectors, say
    RSA and Ed25519, give two signatures), or with the keys of its zone's
    ``dkim_fallback_domain`` when the From domain has none, and also with the keys of the zone's
    ``dkim_platform_domain``. Keys come from ``dkim.keys`` or ``dkim.key_dir``:

    ```yaml
    dkim:
      key_dir: /etc/zonemta/dkim        # example.com.s2026.pem, example.com.ed2026.pem, ...
    zones:
      default:
        dkim_platform_domain: mta.example.net
    ```

    Publish the public key as TXT ``<selector>._domainkey.<domain>``:
    ``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`` (or ``k=ed25519; p=<base64 raw key>``).
    ``python -m zmta_devtools.bench_dkim`` measures the signing rate (about 3,200-3,500 RSA-2048
    signatures per second on one core of the development machine; dkimpy: about 130-150).
    """

    enabled: bool = Field(default=True, description="sign outgoing mail when a key applies")
    key_dir: str | None = Field(
        default=None,
        description="directory of private keys named `<domain>.<selector>.pem` (PEM, RSA 1024-4096 bits or"
        " Ed25519; a Kubernetes Secret mounted as files)",
    )
    keys: list[DkimKey] = Field(default_factory=list, description="keys given in the config")
    canonicalization: str = Field(
        default="relaxed/relaxed",
        description="header/body canonicalization of every signature; the body hash is computed at intake with"
        " the body part",
    )
    sign_headers: list[str] = Field(
        default_factory=list,
        description="header fields to sign (those present); empty: the usual set, From over-signed",
    )
    expire: float = Field(default=0.0, ge=0, description="seconds until the signature expires (`x=`); `0`: no expiry")

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
    """One plugin: ``enabled`` and whatever options the plugin itself takes.

    A plugin is a Python module with an ``init(app)`` function, named by its import path under
    ``plugins`` (the same file configures every service; each service runs the hooks of its own
    events). ``app.options`` holds the plugin's options, ``app.hook(name, handler)`` registers a
    handler (plain or async). A handler changes what it is given, or raises
    ``zmta_common.hooks.Reject(code, text)`` to refuse with that SMTP reply; an exception of
    any other kind is a plugin failure and refuses temporarily (451), so a bug never
    accepts or bounces mail.

    | hook | service | handler gets |
    |---|---|---|
    | `smtp:auth` | ingest | `(auth)`: set `auth.accepted = True` to let the client in |
    | `smtp:mail_from` / `smtp:rcpt_to` | ingest | `(envelope, address)` |
    | `message:headers` | ingest, api, bounce | `(envelope, headers)`: a `HeaderBlock` to edit |
    | `message:store` | ingest, api, bounce | `(envelope, headers, body)`: see below |
    | `queue:route` | ingest, api, bounce | `(envelope, routes)`: `{recipient: zone}` to change |
    | `sender:fetch` | sender | `(delivery)`: a `DeliveryContext`; set `delivery.http_url` for HTTP delivery |
    | `sender:headers` | sender | `(delivery, headers)`: edit the headers before DKIM signing |
    | `sender:connect` / `sender:delivered` | sender | `(delivery, mx host)` / `(delivery, response)` |
    | `queue:bounce` | bounce | `(event)`: raise `Reject` to send no DSN nor notification |
    | `log:entry` | queue | `(entry)`: one dict per delivery outcome |

    In ``message:store``, ``body.chunks()`` streams the stored body before the commit
    (``body.size``, ``body.queue_id``).

    The intake hooks run in the bounce service too, for each DSN it queues (``envelope.interface``
    is ``"bounce"``, ``envelope.mail_from`` empty). A DSN refused with a 5xx there ends its bounce
    event at once (logged as ``dsn refused``); a 4xx, or a store that is down, has the event
    tried again after 5 s, doubling up to 10 minutes, for about six hours before it is given
    up (``bounce given up``). The HTTP notifications of an event go out once however often it
    is tried.

    The example plugin (``libs/common/zmta_common/plugins/example.py``) prefixes the Subject at
    intake, adds a header at send time and refuses chosen recipients with its own reply:

    ```yaml
    plugins:
      zmta_common.plugins.example:
        subject_prefix: "[ext]"
        header: "X-Processed-By: example"
        reject:
          closed@example.com: "550 5.7.1 This recipient is closed"
    ```

    The built-in Rspamd plugin (``zmta_common.plugins.rspamd``) streams each message to
    Rspamd's ``/checkv2`` before it is queued, with the envelope (From, Rcpt, IP, User, Helo,
    Queue-Id). Action ``reject`` refuses with ``550 5.7.1 Message rejected as spam``, ``soft reject``
    with ``451 4.7.1 Try again later``; ``add header`` and ``rewrite subject`` add ``X-Spam: Yes`` (the
    latter also prefixes the Subject); every scanned message gets ``X-Zone-Spam-Resolution`` and
    ``X-Zone-Spam-Status: <action> score=<score>/<required> [SYMBOL=score, ...]``. Messages over
    ``max_size`` are not scanned, and an unreachable Rspamd lets mail through unless
    ``on_error: defer`` (then 451):

    ```yaml
    plugins:
      zmta_common.plugins.rspamd:
        url: http://127.0.0.1:11333
        timeout: 15              # seconds
        max_size: 10485760       # bytes
        reject_spam: true        # false: mark "reject" like "add header"
        subject_prefix: "[SPAM]" # for "rewrite subject" ({score} is replaced); else Rspamd's subject
        on_error: accept         # or defer
    ```
    """

    model_config = ConfigDict(extra="allow")
    enabled: bool = Field(default=True, description="whether the plugin is loaded; every other key is its option")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Metrics(Section):
    """Where each service serves /metrics and /health (the api serves them on its own port)."""

    host: str = Field(
        default="127.0.0.1", description="where ingest, queue, sender and bounce serve `/metrics` and `/health`"
    )
    ingest_port: int = Field(
        default=12091, ge=0, le=65535, description="ingest's port (`zmta_ingest --metrics-port` overrides it)"
    )
    queue_port: int = Field(default=12092, ge=0, le=65535, description="the queue's port")
    sender_port: int = Field(
        default=12093, ge=0, le=65535, description="a sender's port (`zmta_sender --metrics-port` overrides it)"
    )
    bounce_port: int = Field(default=12094, ge=0, le=65535, description="the bounce service's port")


def _default_zones() -> dict[str, Zone]:
    return {"default": Zone(), "bounces": Zone(connections=1)}


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ZMTA_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    name: str = Field(default="ZoneMTA", description="product name in the `Received` header: `by <hostname> (<name>)`")
    hostname: str = Field(
        default_factory=socket.getfqdn,
        description="banner and EHLO name when an interface or a pool address has none",
        json_schema_extra={DOC_DEFAULT: "the machine's FQDN"},
    )
    log_level: str = Field(
        default="INFO", description="`DEBUG`, `INFO`, `WARNING`, `ERROR`; logs are JSON lines on stderr"
    )
    dbs: Databases = Field(default_factory=Databases, description="the stores")
    smtp_interfaces: dict[str, SmtpInterface] = Field(
        default_factory=lambda: {"feeder": SmtpInterface()}, description="SMTP listeners of ingest, by name"
    )
    api: Api = Field(default_factory=Api, description="the HTTP API")
    queue: Queue = Field(default_factory=Queue, description="scheduling")
    zones: dict[str, Zone] = Field(default_factory=_default_zones, description="sending zones, by name")
    dns: Dns = Field(default_factory=Dns, description="MX lookups")
    tls: Tls = Field(default_factory=Tls, description="outbound TLS")
    tls_reporting: TlsReporting = Field(
        default_factory=TlsReporting, description="SMTP TLS reporting (RFC 8460) of MTA-STS and DANE sessions"
    )
    bounce: Bounce = Field(default_factory=Bounce, description="classification, DSNs and notifications")
    shaping: Shaping = Field(default_factory=Shaping, description="adaptive traffic shaping")
    delivery_log: DeliveryLog = Field(default_factory=DeliveryLog, description="the searchable delivery log")
    dkim: Dkim = Field(default_factory=Dkim, description="DKIM signing")
    plugins: dict[str, Plugin] = Field(
        default_factory=dict,
        description="Python plugins by import path, in the order they run: `{enabled: true, ...options}`",
    )
    metrics: Metrics = Field(default_factory=Metrics, description="metrics and health endpoints")

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

    @model_validator(mode="after")
    def _dane_needs_dnssec(self) -> Config:
        # DANE stands on the resolver's AD flag: without a validating resolver it has nothing to stand on.
        if self.dns.dnssec:
            return self
        keys = ["tls.dane"] if self.tls.dane else []
        keys += [
            f"zones.{name}.domains.{domain}.dane"
            for name, zone in self.zones.items()
            for domain, policy in zone.domains.items()
            if policy.dane
        ]
        if keys:
            raise ValueError(f"{', '.join(keys)}: DANE needs dns.dnssec: true (nameservers that validate DNSSEC)")
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
