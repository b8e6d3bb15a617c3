"""Per-client connection limits of an ingest interface (the arithmetic; the wire is in
tests/integration/test_ingest_abuse.py)."""

from __future__ import annotations

from zmta_common.config import SmtpInterface
from zmta_ingest.client_limits import ClientLimits


def test_concurrent_connections_per_address() -> None:
    limits = ClientLimits(SmtpInterface(max_connections_per_client=2), "mta.test")
    assert limits.admit("192.0.2.1") is None
    assert limits.admit("::ffff:192.0.2.1") is None  # the same client on a dual-stack listener
    refusal = limits.admit("192.0.2.1")
    assert refusal == "421 4.7.0 mta.test Error: too many connections from 192.0.2.1"
    assert limits.admit("192.0.2.2") is None  # another client is not affected
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1") is None
    for _ in range(3):
        limits.release("192.0.2.1")
    assert "192.0.2.1" not in limits.open  # nothing kept for a client that has gone


def test_connection_rate_per_address() -> None:
    limits = ClientLimits(SmtpInterface(max_connections_per_client=0, max_connection_rate_per_client=3), "mta.test")
    for _ in range(3):
        assert limits.admit("2001:db8::1") is None
        limits.release("2001:db8::1")
    refusal = limits.admit("2001:db8::1")
    assert refusal is not None and refusal.startswith("421 4.7.0") and "in the last minute" in refusal
    limits.recent["2001:db8::1"][0] -= 61.0  # the oldest connection leaves the minute
    assert limits.admit("2001:db8::1") is None


def test_exceptions_are_not_counted() -> None:
    interface = SmtpInterface(max_connections_per_client=1, client_limit_exceptions=["10.0.0.0/8"])
    limits = ClientLimits(interface, "mta.test")
    for _ in range(5):
        assert limits.admit("10.1.2.3") is None
    assert not limits.open
    assert limits.admit("192.0.2.9") is None
    assert limits.admit("192.0.2.9") is not None
