import msgpack
import pytest

from zmta_common.events import (
    BounceEvent,
    Classification,
    ClassifyRequest,
    DeliveryReport,
    LeasedDelivery,
    MessageQueued,
    SchemaError,
    WorkReply,
    WorkRequest,
)

SAMPLES = [
    MessageQueued(id="1a2b", zone="default", deliveries=3),
    WorkRequest(zone="default", sender="pod-0", max=10),
    WorkReply(
        deliveries=[
            LeasedDelivery(
                id="1a2b",
                seq="001",
                recipient="a@x.test",
                domain="x.test",
                mail_from="",
                lease_token="tok",
                lease_expires=1700000000.5,
                attempts=2,
            )
        ]
    ),
    DeliveryReport(
        id="1a2b",
        seq="001",
        zone="default",
        lease_token="tok",
        status="deferred",
        response="451 4.7.1 later",
        category="greylisted",
        mx="mx.x.test",
        time=1.5,
    ),
    BounceEvent(
        id="1a2b",
        seq="002",
        zone="default",
        recipient="b@x.test",
        mail_from="s@y.test",
        response="550 5.1.1 no",
        category="recipient_unknown",
        time=2.0,
        headers=b"From: s@y.test\r\n",
    ),
    ClassifyRequest(code=550, text="5.1.1 no such user", stage="rcpt"),
    Classification(action="reject", category="recipient_unknown", message="Recipient unknown"),
]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip(payload: object) -> None:
    encoded = payload.encode()  # type: ignore[attr-defined]
    assert type(payload).decode(encoded) == payload  # type: ignore[attr-defined]
    assert msgpack.unpackb(encoded)["v"] == 1


def test_unknown_fields_are_ignored() -> None:
    data = msgpack.packb({"v": 1, "id": "x", "zone": "z", "deliveries": 1, "later_field": True})
    assert MessageQueued.decode(data) == MessageQueued(id="x", zone="z", deliveries=1)


def test_missing_field_is_refused() -> None:
    with pytest.raises(SchemaError, match="deliveries"):
        MessageQueued.decode(msgpack.packb({"v": 1, "id": "x", "zone": "z"}))


def test_foreign_version_is_refused() -> None:
    with pytest.raises(SchemaError, match="version"):
        MessageQueued.decode(msgpack.packb({"v": 2, "id": "x", "zone": "z", "deliveries": 1}))


def test_garbage_is_refused() -> None:
    with pytest.raises(SchemaError):
        WorkRequest.decode(b"\xc1\xc1 not msgpack")


def test_report_status_is_checked() -> None:
    with pytest.raises(SchemaError, match="status"):
        DeliveryReport(id="a", seq="001", zone="z", lease_token="t", status="lost", response="")
