"""SMTP TLS reporting (RFC 8460) without servers: the counts' hash read back into the report's
``policies`` (against the RFC's example report, field by field), the report, its file name
(section 5.1), the ``_smtp._tls`` TXT record (section 3) and the report mail (section 5.3)."""

from __future__ import annotations

import gzip
import json
import re
from datetime import UTC, date, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest

from zmta_bounce.tlsrpt import (
    Mail,
    RecordError,
    build_mail,
    compress,
    due_days,
    filename,
    mailto_addresses,
    parse_record,
    report,
    report_id,
)
from zmta_common import tlsrpt as counts
from zmta_common.tlsrpt import Failure
from zmta_sender.dane import HostDane, Tlsa
from zmta_sender.mta_sts import StsPolicy
from zmta_sender.tlsrpt import certificate_result, no_policy, sts_policy, tlsa_policy

# RFC 8460 section 4.4's example report, as we write it: "mx-host" is an array, as the field's
# definition says (the example shows a bare string), and the optional "additional-information"
# (a URI of the reporter's) is one we never give.
RFC_EXAMPLE: dict[str, Any] = {
    "organization-name": "Company-X",
    "date-range": {"start-datetime": "2016-04-01T00:00:00Z", "end-datetime": "2016-04-01T23:59:59Z"},
    "contact-info": "sts-reporting@company-x.example",
    "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": ["version: STSv1", "mode: testing", "mx: *.mail.company-y.example", "max_age: 86400"],
                "policy-domain": "company-y.example",
                "mx-host": ["*.mail.company-y.example"],
            },
            "summary": {"total-successful-session-count": 5326, "total-failure-session-count": 303},
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "sending-mta-ip": "2001:db8:abcd:0012::1",
                    "receiving-mx-hostname": "mx1.mail.company-y.example",
                    "failed-session-count": 100,
                },
                {
                    "result-type": "starttls-not-supported",
                    "sending-mta-ip": "2001:db8:abcd:0013::1",
                    "receiving-mx-hostname": "mx2.mail.company-y.example",
                    "receiving-ip": "203.0.113.56",
                    "failed-session-count": 200,
                },
                {
                    "result-type": "validation-failure",
                    "sending-mta-ip": "198.51.100.62",
                    "receiving-ip": "203.0.113.58",
                    "receiving-mx-hostname": "mx-backup.mail.company-y.example",
                    "failed-session-count": 3,
                    "failure-reason-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED",
                },
            ],
        }
    ],
}
COMPANY_Y = StsPolicy("testing", 86400, ("*.mail.company-y.example",), "id1")


def example_hash() -> dict[str, str]:
    """The counts of the RFC's example as the senders leave them in Redis."""
    policy = sts_policy("company-y.example", COMPANY_Y)
    key = counts.policy_key(policy)
    failures = {
        Failure("certificate-expired", "2001:db8:abcd:0012::1", "mx1.mail.company-y.example"): 100,
        Failure("starttls-not-supported", "2001:db8:abcd:0013::1", "mx2.mail.company-y.example", "203.0.113.56"): 200,
        Failure(
            "validation-failure",
            "198.51.100.62",
            "mx-backup.mail.company-y.example",
            "203.0.113.58",
            "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED",
        ): 3,
    }
    fields = {counts.POLICY + key: policy, counts.OK + key: "5326"}
    fields |= {failure.field(key): str(n) for failure, n in failures.items()}
    return fields


def test_the_report_of_the_rfc_example_field_by_field() -> None:
    document = report(
        "Company-X",
        "sts-reporting@company-x.example",
        "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
        date(2016, 4, 1),
        counts.policies(example_hash()),
    )
    assert list(document) == ["organization-name", "date-range", "contact-info", "report-id", "policies"]
    assert {k: v for k, v in document.items() if k != "policies"} == {
        k: v for k, v in RFC_EXAMPLE.items() if k != "policies"
    }
    (entry,) = document["policies"]
    (expected,) = RFC_EXAMPLE["policies"]
    assert entry["policy"] == expected["policy"]
    assert entry["summary"] == expected["summary"]
    # The largest counts first; each entry with exactly the RFC's fields.
    assert [d["failed-session-count"] for d in entry["failure-details"]] == [200, 100, 3]
    by_type = {d["result-type"]: d for d in entry["failure-details"]}
    for detail in expected["failure-details"]:
        assert by_type[detail["result-type"]] == detail
    assert json.loads(gzip.decompress(compress(document))) == document


def test_the_report_is_the_same_for_the_same_counts() -> None:
    document = report("X", "c@x.example", "r", date(2016, 4, 1), counts.policies(example_hash()))
    assert compress(document) == compress(json.loads(json.dumps(document)))  # no time stamp in the gzip header
    shuffled = dict(reversed(list(example_hash().items())))
    assert counts.policies(shuffled) == counts.policies(example_hash())


def test_policies_each_with_their_own_counts_and_an_empty_failure_list() -> None:
    dane = HostDane("mx.b.example", 25, (Tlsa(3, 1, 1, bytes.fromhex("ab" * 32)), Tlsa(2, 0, 1, b"\x01" * 32)))
    tlsa = tlsa_policy("b.example", dane)
    unfetched = no_policy("b.example")
    fields = {counts.POLICY + counts.policy_key(p): p for p in (tlsa, unfetched)}
    fields[counts.OK + counts.policy_key(tlsa)] = "7"
    fields[Failure("sts-policy-fetch-error", reason="HTTP 404").field(counts.policy_key(unfetched))] = "2"
    fields["fail:unknownkey:{}"] = "9"  # counts of a policy not in the hash are left out
    found = counts.policies(fields)
    assert found == [
        {
            "policy": {
                "policy-type": "tlsa",
                "policy-string": [f"3 1 1 {'ab' * 32}", f"2 0 1 {'01' * 32}"],
                "policy-domain": "b.example",
                "mx-host": ["mx.b.example"],
            },
            "summary": {"total-successful-session-count": 7, "total-failure-session-count": 0},
            "failure-details": [],
        },
        {
            "policy": {"policy-domain": "b.example", "policy-type": "no-policy-found"},
            "summary": {"total-successful-session-count": 0, "total-failure-session-count": 2},
            "failure-details": [
                {"result-type": "sts-policy-fetch-error", "failure-reason-code": "HTTP 404", "failed-session-count": 2}
            ],
        },
    ]


def test_a_failed_tlsa_lookup_names_the_host_and_no_records() -> None:
    assert json.loads(tlsa_policy("b.example", "mx.b.example")) == {
        "policy-type": "tlsa",
        "policy-string": [],
        "policy-domain": "b.example",
        "mx-host": ["mx.b.example"],
    }
    assert json.loads(tlsa_policy("b.example", ""))["mx-host"] == []  # the MX lookup itself failed


def test_failure_details_leave_out_what_is_unknown_and_cut_long_reasons() -> None:
    assert Failure("dnssec-invalid", receiving_mx_hostname="mx.b.example").details() == {
        "result-type": "dnssec-invalid",
        "receiving-mx-hostname": "mx.b.example",
    }
    assert len(Failure("validation-failure", reason="x" * 1000).details()["failure-reason-code"]) == counts.MAX_REASON


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (10, "certificate-expired"),
        (62, "certificate-host-mismatch"),
        (18, "certificate-not-trusted"),  # self-signed
        (20, "certificate-not-trusted"),  # unknown issuer
        (9, "validation-failure"),  # not yet valid: none of the above
    ],
)
def test_certificate_failures_by_openssl_verify_code(code: int, result: str) -> None:
    assert certificate_result(code) == result
    assert result in counts.RESULT_TYPES


def test_result_types_are_rfc_8460s() -> None:
    assert set(counts.RESULT_TYPES) == {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
    }


# RFC 8460 section 5.1: filename = sender "!" policy-domain "!" begin-timestamp "!" end-timestamp
# [ "!" unique-id ] "." extension
FILENAME = re.compile(
    r"(?P<sender>[A-Za-z0-9.-]+)!(?P<domain>[A-Za-z0-9.-]+)!(?P<begin>\d+)!(?P<end>\d+)(![A-Za-z0-9]+)?\.json(\.gz)?"
)


def test_the_file_name_of_a_day() -> None:
    name = filename("mail.sender.example", "recipient.example", date(2016, 8, 1))
    assert name == "mail.sender.example!recipient.example!1470009600!1470095999.json.gz"
    match = FILENAME.fullmatch(name)
    assert match and int(match["end"]) - int(match["begin"]) == 86399
    assert FILENAME.fullmatch(filename("mta.test", "xn--80akhbyknj4f.test", date(2026, 12, 5)))


def test_the_date_range_is_the_whole_utc_day() -> None:
    document = report("X", "c@x.example", "r", date(2026, 12, 31), [])
    assert document["date-range"] == {"start-datetime": "2026-12-31T00:00:00Z", "end-datetime": "2026-12-31T23:59:59Z"}
    assert report_id(date(2026, 12, 31), "b.example", "mta.test") == "2026-12-31.b.example@mta.test"


@pytest.mark.parametrize(
    ("texts", "rua"),
    [
        (["v=TLSRPTv1; rua=mailto:reports@example.com"], ["mailto:reports@example.com"]),
        (["v=TLSRPTv1;rua=https://reporting.example.com/v1/tlsrpt"], ["https://reporting.example.com/v1/tlsrpt"]),
        (
            ["v=TLSRPTv1; rua=mailto:a@example.com, https://r.example.com/x?y=1 ,mailto:b@example.net;"],
            ["mailto:a@example.com", "https://r.example.com/x?y=1", "mailto:b@example.net"],
        ),
        # Unknown fields are ignored; other records at the name are not ours.
        (["v=spf1 -all", "v=TLSRPTv1 ; ext=1; rua=mailto:a@example.com"], ["mailto:a@example.com"]),
    ],
)
def test_the_rua_of_a_txt_record(texts: list[str], rua: list[str]) -> None:
    assert parse_record(texts).rua == rua


def test_uris_we_cannot_use_are_set_aside() -> None:
    record = parse_record(["v=TLSRPTv1; rua=http://plain.example.com/,mailto:a@example.com,ftp://x.example"])
    assert (record.rua, record.ignored) == (["mailto:a@example.com"], ["http://plain.example.com/", "ftp://x.example"])


@pytest.mark.parametrize(
    ("texts", "why"),
    [
        ([], "no v=TLSRPTv1 record"),
        (["v=TLSRPTv2; rua=mailto:a@example.com"], "no v=TLSRPTv1 record"),
        (["v=tlsrptv1; rua=mailto:a@example.com"], "no v=TLSRPTv1 record"),  # the version is case-sensitive
        (["rua=mailto:a@example.com; v=TLSRPTv1"], "no v=TLSRPTv1 record"),  # it comes first
        (["v=TLSRPTv1x; rua=mailto:a@example.com"], "no v=TLSRPTv1 record"),
        (
            ["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"],
            "2 v=TLSRPTv1 records, not one",
        ),
        (["v=TLSRPTv1;"], "no rua"),
        (["v=TLSRPTv1; ruf=mailto:a@example.com"], "no rua"),
        (["v=TLSRPTv1; rua"], "'rua' is not key=value"),
        (["v=TLSRPTv1; rua=http://example.com/r"], "no usable mailto: or https: URI in rua: http://example.com/r"),
        (["v=TLSRPTv1; rua=mailto:"], "no usable mailto: or https: URI in rua: mailto:"),
    ],
)
def test_records_that_say_nowhere(texts: list[str], why: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(texts)
    assert str(caught.value) == why


def test_mailto_addresses() -> None:
    assert mailto_addresses("mailto:a@example.com") == ["a@example.com"]
    assert mailto_addresses("mailto:a@example.com%2Cb@example.com?subject=x") == ["a@example.com", "b@example.com"]
    assert mailto_addresses("MAILTO:tls%2Brpt@example.com") == ["tls+rpt@example.com"]


def test_the_report_mail() -> None:
    document = report("Org", "c@mta.test", "2026-12-05.b.example@mta.test", date(2026, 12, 5), [])
    body = compress(document)
    name = filename("mta.test", "b.example", date(2026, 12, 5))
    mail = Mail(
        domain="b.example",
        submitter="mta.test",
        report_id="2026-12-05.b.example@mta.test",
        filename=name,
        from_address="noreply-tlsrpt@mta.test",
        to=["tlsrpt@b.example"],
        zone="bounces",
        day=date(2026, 12, 5),
    )
    raw = build_mail(body, mail)
    assert raw.isascii() and b"\r\n" in raw
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert (
        parsed["Subject"] == "Report Domain: b.example Submitter: mta.test Report-ID: <2026-12-05.b.example@mta.test>"
    )
    assert (parsed["TLS-Report-Domain"], parsed["TLS-Report-Submitter"]) == ("b.example", "mta.test")
    assert (parsed["From"], parsed["To"]) == ("noreply-tlsrpt@mta.test", "tlsrpt@b.example")
    assert parsed["X-Sending-Zone"] == "bounces" and parsed["Message-ID"] and parsed["Date"]
    text, attachment = parsed.iter_parts()
    assert text.get_content_type() == "text/plain" and "b.example" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_filename() == name
    assert json.loads(gzip.decompress(attachment.get_content())) == document


def test_the_days_due_at_a_time() -> None:
    assert due_days(datetime(2026, 12, 6, 0, 30, tzinfo=UTC), 1) == [date(2026, 12, 4)]
    assert due_days(datetime(2026, 12, 6, 1, 0, tzinfo=UTC), 1) == [date(2026, 12, 4), date(2026, 12, 5)]
    assert due_days(datetime(2026, 12, 6, 0, 0, tzinfo=UTC), 0) == [date(2026, 12, 4), date(2026, 12, 5)]
    # UTC days, whatever the time zone of the clock.
    east = timezone(timedelta(hours=10))
    assert due_days(datetime(2026, 12, 6, 9, 0, tzinfo=east), 1) == [date(2026, 12, 3), date(2026, 12, 4)]
