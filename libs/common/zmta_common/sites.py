"""MX rollup: the *site* of a recipient domain is the set of MX hosts that receive its mail.

Thousands of domains hosted by one provider (every Google Workspace domain has the same
``aspmx.l.google.com`` hosts) are one receiving site, and the provider counts our
connections and messages per site, not per domain. So the limits of a zone hold per site
too (``zones.<name>.sites``, and the ``mx_hosts`` patterns as overrides), and traffic
shaping reacts per site. The site's name is made here and nowhere else: the queue names
it when it leases, the senders when they open connections and read replies, and both must
spell it the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# Longer names are shortened to a digest: they become Redis keys and metric labels.
MAX_NAME = 200


def site_name(hosts: Iterable[str]) -> str:
    """The MX host names, lower case without the root dot, sorted and joined by commas."""
    names = sorted({host.lower().rstrip(".") for host in hosts})
    name = ",".join(names)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{names[0]},+{len(names) - 1}:{digest}"
