"""Queue ids in the original's format, so tools written for ZoneMTA read ours.

A queue id is the hex of ``epoch_ms * 0x1000 + counter`` (counter restarts every
millisecond) followed by four hex digits that tell processes apart: time-sortable,
about 18 characters, for example ``1578a823de00009fbb``. A delivery is ``<id>.<seq>``
where seq is the 1-based recipient number in hex, zero-padded to three digits.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time

_ID_RE = re.compile(r"^[0-9a-f]{14,24}$")
_lock = threading.Lock()
_state = {"ms": 0, "counter": 0}
_suffix = f"{(os.getpid() ^ secrets.randbits(16)) & 0xFFFF:04x}"


def new_queue_id() -> str:
    """A new, time-sortable queue id unique across processes."""
    with _lock:
        now = int(time.time() * 1000)
        if now <= _state["ms"]:
            _state["counter"] += 1
            if _state["counter"] >= 0x1000:  # more than 4096 ids in one ms: borrow the next ms
                _state["ms"] += 1
                _state["counter"] = 0
        else:
            _state["ms"], _state["counter"] = now, 0
        value = _state["ms"] * 0x1000 + _state["counter"]
    return f"{value:x}{_suffix}"


def is_queue_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def seq_for(index: int) -> str:
    """The seq of the index-th recipient (0-based index; seq is 1-based)."""
    return f"{index + 1:03x}"


def new_object_id() -> str:
    """A 24-hex id shaped like a MongoDB ObjectId (suppression entries keep the original's id shape)."""
    return f"{int(time.time()):08x}{secrets.token_hex(8)}"
