"""SMTP TLS reporting (RFC 8460): the session counts the senders keep in Redis, as the bounce
service reads them back for the daily reports.

Per policy domain (the recipient domain whose MTA-STS policy or DANE TLSA records applied)
and UTC day, one hash (:func:`zmta_common.redis_keys.tlsrpt`) with three kinds of fields,
``<pk>`` being :func:`policy_key` of the policy's JSON:

``policy:<pk>``
    the policy object of the report (RFC 8460 section 4.4: ``policy-type``, ``policy-string``,
    ``policy-domain``, ``mx-host``), as JSON;
``ok:<pk>``
    the sessions under it that succeeded;
``fail:<pk>:<failure>``
    the sessions under it that failed alike: ``<failure>`` is :meth:`Failure.field`, the JSON
    of the failure details without their count.

The day's set (:func:`zmta_common.redis_keys.tlsrpt_domains`) names the domains that have
such a hash. :func:`policies` turns a hash into the report's ``policies`` array.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

# RFC 8460 section 4.3: the result types of failed sessions.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"
RESULT_TYPES = (
    STARTTLS_NOT_SUPPORTED,
    CERTIFICATE_HOST_MISMATCH,
    CERTIFICATE_EXPIRED,
    CERTIFICATE_NOT_TRUSTED,
    VALIDATION_FAILURE,
    TLSA_INVALID,
    DNSSEC_INVALID,
    DANE_REQUIRED,
    STS_POLICY_FETCH_ERROR,
    STS_POLICY_INVALID,
    STS_WEBPKI_INVALID,
)

# policy-type (RFC 8460 section 4.4)
STS = "sts"
TLSA = "tlsa"
NO_POLICY_FOUND = "no-policy-found"

POLICY = "policy:"
OK = "ok:"
FAIL = "fail:"
MAX_REASON = 200  # characters of a failure-reason-code


def day_of(timestamp: float | None = None) -> str:
    """The UTC day (``YYYY-MM-DD``) of ``timestamp`` (default: now)."""
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def policy_json(policy: dict[str, Any]) -> str:
    return json.dumps(policy, separators=(",", ":"), sort_keys=True)


def policy_key(policy: str) -> str:
    """A short name for a policy's JSON in the fields of its hash."""
    return hashlib.sha256(policy.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Failure:
    """The details of failed sessions that are counted together (RFC 8460 section 4.4, failure-details)."""

    result_type: str
    sending_mta_ip: str = ""
    receiving_mx_hostname: str = ""
    receiving_ip: str = ""
    reason: str = ""  # failure-reason-code

    def details(self) -> dict[str, str]:
        """The failure-details entry without its count; fields we do not know are left out."""
        found = {
            "result-type": self.result_type,
            "sending-mta-ip": self.sending_mta_ip,
            "receiving-mx-hostname": self.receiving_mx_hostname,
            "receiving-ip": self.receiving_ip,
            "failure-reason-code": self.reason[:MAX_REASON],
        }
        return {key: value for key, value in found.items() if value}

    def field(self, key: str) -> str:
        """Its hash field under the policy ``key``."""
        return f"{FAIL}{key}:{json.dumps(self.details(), separators=(',', ':'), sort_keys=True)}"


def policies(fields: dict[str, str]) -> list[dict[str, Any]]:
    """The report's ``policies`` array from a domain's hash (fields and values decoded).

    Each policy with its summary and its failure details (an empty array when none failed), the
    largest counts first; policies are ordered by their JSON, so the same counts give the same
    report."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        if name.startswith(POLICY):
            found.setdefault(name[len(POLICY) :], _empty())["policy"] = json.loads(value)
    for name, value in fields.items():
        if name.startswith(OK):
            entry = found.get(name[len(OK) :])
            if entry is not None:
                entry["summary"]["total-successful-session-count"] += int(value)
        elif name.startswith(FAIL):
            key, _, details = name[len(FAIL) :].partition(":")
            entry = found.get(key)
            if entry is not None and int(value) > 0:
                entry["summary"]["total-failure-session-count"] += int(value)
                entry["failure-details"].append({**json.loads(details), "failed-session-count": int(value)})
    result = []
    for _, entry in sorted(found.items(), key=lambda item: policy_json(item[1]["policy"])):
        entry["failure-details"].sort(key=lambda d: (-d["failed-session-count"], json.dumps(d, sort_keys=True)))
        result.append(entry)
    return result


def _empty() -> dict[str, Any]:
    return {
        "policy": {},
        "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
        "failure-details": [],
    }
