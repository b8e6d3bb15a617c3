"""Every Redis key name of the system, in one place.

Each service reads keys that another one writes (the senders cache MX answers that the
queue reads for site limits, the queue's skip list is shown by the API), so a
name spelled twice is a bug waiting to happen. Domains in keys are always in their
canonical form (:func:`zmta_common.domains.canonical_domain`); the functions here apply
it, so a caller cannot get it wrong.

The Lua scripts of :mod:`zmta_common.limits` get the per-zone prefixes below as
arguments and only append the domain or site to them.

=========================================  =============================================
key                                        what it holds
=========================================  =============================================
``zmta:dns:<domain>``                      MX hosts and their addresses (JSON), DNS TTL
``zmta:sts:<domain>``                      the domain's MTA-STS policy (JSON)
``zmta:dane:<domain>``                     DNSSEC status of the domain's MX records, DNS TTL
``zmta:tlsa:<host>:<port>``                an MX host's TLSA records and their status (JSON)
``zmta:pods:<zone>``                       hash: sender slice -> last work request
``zmta:skip:<zone>``                       sorted set: domains at a limit -> free again at
``zmta:inflight:<zone>:d|s:<name>``        sorted set: leased deliveries -> lease expiry
``zmta:rate:<zone>:d|s:<name>``            GCRA theoretical arrival time
``zmta:lease:<zone>:<id>.<seq>``           where a leased delivery holds its places
``zmta:conn:<zone>:d|s:<name>``            sorted set: open SMTP connections -> expiry
``zmta:want:<zone>:d|s:<name>``            flag: a sender waits for a connection slot
``zmta:blacklist``                         sorted set: ``<domain>|<local address>`` -> expiry
``zmta:blacklist:why``                     hash: the same members -> what set the mark (JSON)
``zmta:authfail:<interface>:<client>``     refused SMTP AUTH attempts in the window
``zmta:leased:<zone>:<site>:<minute>``     deliveries leased to a site in a minute (shaping)
``zmta:shaping:<zone>``                    hash: scope key -> traffic shaping override (JSON)
``zmta:shapinghits:<zone>:<rule>:<scope>`` a shaping rule's matches in its window
``zmta:shapinglast:<zone>:<scope>``        when the scope last pushed back (Unix time)
``zmta:logstream:leader``                  the bounce replica streaming the delivery log
``zmta:tlsrpt:<day>``                      set: domains with TLS reporting counts that UTC day
``zmta:tlsrpt:<day>:<domain>``             hash: a domain's TLS policies and session counts (RFC 8460)
``zmta:tlsrptsent:<day>:<domain>``         marker: the domain's TLS report of that day is taken
=========================================  =============================================

``d`` keys count per recipient domain, ``s`` keys per site (:mod:`zmta_common.sites`).
"""

from __future__ import annotations

from typing import Literal

from .domains import canonical_domain

PREFIX = "zmta:"

BLACKLIST = f"{PREFIX}blacklist"
BLACKLIST_WHY = f"{PREFIX}blacklist:why"

# What a limit counts: a recipient domain, or a site.
Kind = Literal["d", "s"]


def dns(domain: str) -> str:
    return f"{PREFIX}dns:{canonical_domain(domain)}"


def sts(domain: str) -> str:
    return f"{PREFIX}sts:{canonical_domain(domain)}"


def dane(domain: str) -> str:
    return f"{PREFIX}dane:{canonical_domain(domain)}"


def tlsa(host: str, port: int) -> str:
    return f"{PREFIX}tlsa:{canonical_domain(host)}:{port}"


def pods(zone: str) -> str:
    return f"{PREFIX}pods:{zone}"


def skip(zone: str) -> str:
    return f"{PREFIX}skip:{zone}"


def inflight_prefix(zone: str) -> str:
    return f"{PREFIX}inflight:{zone}:"


def rate_prefix(zone: str) -> str:
    return f"{PREFIX}rate:{zone}:"


def lease_prefix(zone: str) -> str:
    return f"{PREFIX}lease:{zone}:"


def connections(zone: str, kind: Kind, name: str) -> str:
    return f"{PREFIX}conn:{zone}:{kind}:{canonical_domain(name) if kind == 'd' else name}"


def want(connection_key: str) -> str:
    """The want flag that goes with a :func:`connections` key."""
    return connection_key.replace(f"{PREFIX}conn:", f"{PREFIX}want:", 1)


def blacklist_member(domain: str, address: str) -> str:
    return f"{canonical_domain(domain)}|{address}"


def auth_failures(interface: str, client: str) -> str:
    return f"{PREFIX}authfail:{interface}:{client}"


def inflight(zone: str, kind: Kind, name: str) -> str:
    return f"{inflight_prefix(zone)}{kind}:{canonical_domain(name) if kind == 'd' else name}"


def leased_prefix(zone: str) -> str:
    return f"{PREFIX}leased:{zone}:"


def site_leased(zone: str, site: str, minute: int) -> str:
    """Deliveries leased to ``site`` in the minute ``minute`` (Unix time // 60)."""
    return f"{leased_prefix(zone)}{site}:{minute}"


def shaping(zone: str) -> str:
    return f"{PREFIX}shaping:{zone}"


def shaping_last(zone: str, scope_key: str) -> str:
    """When the scope last pushed back (a reply a shaping rule matched), Unix time."""
    return f"{PREFIX}shapinglast:{zone}:{scope_key}"


def shaping_hits(zone: str, rule: str, scope_key: str) -> str:
    return f"{PREFIX}shapinghits:{zone}:{rule}:{scope_key}"


def tlsrpt_domains(day: str) -> str:
    """The domains with TLS reporting counts on the UTC day ``day`` (``YYYY-MM-DD``)."""
    return f"{PREFIX}tlsrpt:{day}"


def tlsrpt(day: str, domain: str) -> str:
    """A policy domain's TLS policies and session counts of the UTC day ``day`` (RFC 8460)."""
    return f"{PREFIX}tlsrpt:{day}:{canonical_domain(domain)}"


def tlsrpt_sent(day: str, domain: str) -> str:
    """Set (NX) by the bounce replica that reports ``domain``'s TLS sessions of ``day``."""
    return f"{PREFIX}tlsrptsent:{day}:{canonical_domain(domain)}"


# The bounce replica that streams the delivery log (one at a time).
LOG_STREAM_LEADER = f"{PREFIX}logstream:leader"
