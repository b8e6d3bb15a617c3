"""schemathesis hooks for the fuzz test (loaded through SCHEMATHESIS_HOOKS).

/send-raw takes a whole message as ``message/rfc822``; schemathesis has no serializer
for that media type, so generated values are sent as their text (bytes as they are).
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.serializer("message/rfc822")
def rfc822(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")
