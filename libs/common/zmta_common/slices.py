"""Which part of a zone's address pool this sender process uses.

A zone's senders run as pods 0..M-1 (a StatefulSet), and pod N uses slice N of M
of the pool: the addresses whose position in the pool is N modulo M. With more pods
than addresses, pods share: pod N uses address N modulo the pool size. The slice
comes from ``--slice N/M``, else from ``ZMTA_SLICE_INDEX``/``ZMTA_SLICE_COUNT``,
else (count given, index not) from the ordinal that ends a StatefulSet pod's host
name (``sender-bulk-3`` is pod 3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .config import PoolAddress


class SliceError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Slice:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owners(self, position: int, pool_size: int) -> set[int]:
        """The slices (of this slice's count) that hold the pool address at ``position``."""
        if self.count <= pool_size:
            return {position % self.count}
        return {i for i in range(self.count) if i % pool_size == position}

    def of(self, pool: list[PoolAddress]) -> list[PoolAddress]:
        if not pool:
            return []
        if self.count <= len(pool):
            return [entry for position, entry in enumerate(pool) if position % self.count == self.index]
        return [pool[self.index % len(pool)]]


def parse(text: str) -> Slice:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise SliceError(f"slice {text!r} is not N/M (pod N of M, counted from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise SliceError(f"slice {text!r}: N must be 0..M-1 and M at least 1")
    return Slice(index, count)


def resolve(option: str | None, env: Mapping[str, str]) -> Slice:
    """The slice from the command line, else from the environment, else the whole pool."""
    if option:
        return parse(option)
    count = env.get("ZMTA_SLICE_COUNT")
    if not count:
        return Slice(0, 1)
    index = env.get("ZMTA_SLICE_INDEX")
    if index is None:
        ordinal = re.search(r"-(\d+)$", env.get("HOSTNAME", ""))
        if ordinal is None:
            raise SliceError("ZMTA_SLICE_COUNT is set but neither ZMTA_SLICE_INDEX nor a pod ordinal in HOSTNAME")
        index = ordinal.group(1)
    return parse(f"{index}/{count}")
