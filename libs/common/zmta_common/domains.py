"""The one spelling of a domain wherever state is keyed by it.

A domain reaches us as a user wrote it: ``Exämple.TEST.``, ``xn--exmple-cua.test`` and
``exämple.test`` are one domain. Every place that keys state by domain (the store's
``deliveries.domain`` and suppression list, Redis limits, skip lists, MX and MTA-STS
caches, pauses, config lookups such as ``zones.<zone>.domains`` and DKIM keys) uses
:func:`canonical_domain`: lower case, no trailing dot, international names as their
A-label (the punycode form DNS knows), address literals without brackets. The
A-label is the form that is unique (the U-label of a name has several spellings that
map to it) and that fits in a Redis key and a log line without surprises.

IDNA 2008 with the UTS 46 mapping (the ``idna`` package) is what mail clients and
resolvers use today; Python's built-in ``idna`` codec is IDNA 2003 and maps ``ß`` to
``ss``, so it is only a fallback for names that IDNA 2008 refuses but that some
server may still use.
"""

from __future__ import annotations

import functools

import idna


@functools.lru_cache(maxsize=16384)
def canonical_domain(name: str) -> str:
    """``name`` in the form every lookup keyed by domain uses."""
    domain = name.strip().rstrip(".").lower()
    if domain.startswith("[") and domain.endswith("]"):
        return domain[1:-1]
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        pass
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not a name DNS could hold; it fails later with a clear DNS error


def domain_of(address: str) -> str:
    """The canonical domain of an address (see :func:`canonical_domain`)."""
    return canonical_domain(address.rpartition("@")[2])


def canonical_address(address: str) -> str:
    """An address as the suppression list keys it: the local part case-folded (the list
    is case-insensitive, as the original's) and the canonical domain."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return domain.lower()
    return f"{local.lower()}@{canonical_domain(domain)}"
