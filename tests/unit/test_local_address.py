"""Local address choice: stable per delivery, weighted by ratio, minimal movement; pool slices."""

from collections import Counter

import pytest

from zmta_common import local_address, slices
from zmta_common.config import PoolAddress

POOL = [
    PoolAddress(name="a.example", address="192.0.2.1"),
    PoolAddress(name="b.example", address="192.0.2.2"),
    PoolAddress(name="c.example", address="192.0.2.3"),
    PoolAddress(name="warm.example", address="192.0.2.4", ratio=0.05),
]
KEYS = [f"1a2b3c{n:06x}.{n % 7 + 1:03x}" for n in range(20000)]


def test_same_delivery_same_address() -> None:
    assert all(local_address.choose(POOL, k) == local_address.choose(POOL, k) for k in KEYS[:500])


def test_ratio_sets_the_share() -> None:
    counts = Counter(local_address.choose(POOL, k).address for k in KEYS)  # type: ignore[union-attr]
    assert 0.04 < counts["192.0.2.4"] / len(KEYS) < 0.06
    for plain in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert 0.29 < counts[plain] / len(KEYS) < 0.345


@pytest.mark.parametrize("gone", ["192.0.2.2", "192.0.2.4"])
def test_removing_an_address_moves_only_its_deliveries(gone: str) -> None:
    before = {k: local_address.choose(POOL, k) for k in KEYS}
    smaller = [p for p in POOL if p.address != gone]
    after = {k: local_address.choose(smaller, k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved
    assert all(before[k].address == gone for k in moved)  # type: ignore[union-attr]


def test_raising_a_ratio_only_adds_to_that_address() -> None:
    warmer = [*POOL[:3], PoolAddress(name="warm.example", address="192.0.2.4", ratio=0.2)]
    before = {k: local_address.choose(POOL, k) for k in KEYS}
    after = {k: local_address.choose(warmer, k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k].address == "192.0.2.4" for k in moved)  # type: ignore[union-attr]
    assert 0.18 < sum(1 for k in KEYS if after[k] == warmer[3]) / len(KEYS) < 0.22


def test_ratio_one_takes_everything_and_all_ratio_pools_share() -> None:
    only = [*POOL[:3], PoolAddress(name="all", address="192.0.2.8", ratio=1.0)]
    assert {local_address.choose(only, k).address for k in KEYS[:2000]} == {"192.0.2.8"}  # type: ignore[union-attr]
    halves = [
        PoolAddress(name="x", address="192.0.2.5", ratio=0.5),
        PoolAddress(name="y", address="192.0.2.6", ratio=0.5),
    ]
    counts = Counter(local_address.choose(halves, k).address for k in KEYS)  # type: ignore[union-attr]
    assert 0.47 < counts["192.0.2.5"] / len(KEYS) < 0.53


def test_ratio_zero_is_never_used_and_ipv6_needs_consent() -> None:
    pool = [PoolAddress(name="off", address="192.0.2.9", ratio=0.0), PoolAddress(name="v6", address="2001:db8::1")]
    assert local_address.choose(pool, "x.001") is None  # no usable IPv4 address: the OS picks
    assert local_address.choose(pool, "x.001", ipv6=True).address == "2001:db8::1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        ("0/2", ["192.0.2.1", "192.0.2.3"]),
        ("1/2", ["192.0.2.2", "192.0.2.4"]),
        ("3/4", ["192.0.2.4"]),
        ("5/6", ["192.0.2.2"]),
        ("0/1", ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]),
    ],
)
def test_slices_of_the_pool(part: str, expected: list[str]) -> None:
    assert [a.address for a in slices.parse(part).of(POOL)] == expected


def test_every_address_is_in_exactly_one_slice() -> None:
    for count in range(1, 5):
        owned = [a.address for i in range(count) for a in slices.Slice(i, count).of(POOL)]
        assert sorted(owned) == sorted(a.address for a in POOL)


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_bad_slices_are_refused(bad: str) -> None:
    with pytest.raises(slices.SliceError):
        slices.parse(bad)


def test_slice_from_the_environment() -> None:
    assert slices.resolve("1/3", {}) == slices.Slice(1, 3)
    assert slices.resolve(None, {}) == slices.Slice(0, 1)
    assert slices.resolve(None, {"ZMTA_SLICE_COUNT": "4", "ZMTA_SLICE_INDEX": "2"}) == slices.Slice(2, 4)
    assert slices.resolve(None, {"ZMTA_SLICE_COUNT": "4", "HOSTNAME": "zmta-sender-bulk-3"}) == slices.Slice(3, 4)
    with pytest.raises(slices.SliceError):
        slices.resolve(None, {"ZMTA_SLICE_COUNT": "4", "HOSTNAME": "laptop"})
