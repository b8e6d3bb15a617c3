"""The TLS context of an SMTP interface, from its ``tls_cert`` / ``tls_key`` PEM files."""

from __future__ import annotations

import ssl
from pathlib import Path

from zmta_common.config import SmtpInterface


class StartupError(Exception):
    """An interface cannot start as configured; the message names the config key."""


def server_context(name: str, interface: SmtpInterface) -> ssl.SSLContext | None:
    """The server-side TLS context of the interface, or None if it has no certificate."""
    if interface.tls_cert is None:
        return None
    prefix = f"smtp_interfaces.{name}"
    for key, path in (("tls_cert", interface.tls_cert), ("tls_key", interface.tls_key)):
        if path is not None and not Path(path).is_file():
            raise StartupError(f"{prefix}.{key}: {path} does not exist or is not a file")
    # Purpose.CLIENT_AUTH: a server context (no client certificates asked for).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(interface.tls_cert, interface.tls_key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        keys = f"{prefix}.tls_cert" + (f" / {prefix}.tls_key" if interface.tls_key else "")
        files = interface.tls_cert + (f", {interface.tls_key}" if interface.tls_key else "")
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            reason = "the private key does not belong to the certificate"
        elif isinstance(exc, ssl.SSLError):
            reason = f"not a PEM certificate and private key ({exc})"
        else:
            reason = getattr(exc, "strerror", None) or str(exc)
        raise StartupError(f"{keys}: cannot load the certificate and key from {files}: {reason}") from None
    return context
