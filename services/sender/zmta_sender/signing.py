"""Which DKIM keys sign a message, and the DKIM-Signature headers they make.

Keys come from ``dkim.keys`` in the config and from ``dkim.key_dir`` (files named
``<domain>.<selector>.pem``, as a Kubernetes Secret mounted as a directory gives
them). A message is signed with every key of its From domain (several selectors,
e.g. RSA and Ed25519, give several signatures), or, when that domain has none, with
the keys of its zone's ``dkim_fallback_domain``; and also with the keys of the zone's
``dkim_platform_domain`` (the sending platform's own signature).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from email.utils import getaddresses
from pathlib import Path

from zmta_common.config import Config, Zone
from zmta_common.domains import canonical_domain, domain_of
from zmta_common.headers import HeaderBlock

from .dkim_signer import DkimKey, load_key, sign

log = logging.getLogger(__name__)


class DkimKeyError(ValueError):
    """A configured key that cannot be used (named with where it came from)."""


def load_keys(config: Config) -> dict[str, list[DkimKey]]:
    """Every configured key, by signing domain; raises DkimKeyError naming a bad one."""
    keys: dict[str, list[DkimKey]] = defaultdict(list)
    for index, entry in enumerate(config.dkim.keys):
        text = entry.private_key
        pem = text.encode() if "-----BEGIN" in text or "\n" in text.strip() else _read(Path(text), index)
        keys[entry.domain].append(_load(entry.domain, entry.selector, pem, f"dkim.keys.{index}"))
    if config.dkim.key_dir:
        for path in sorted(Path(config.dkim.key_dir).glob("*.pem")):
            domain, _, selector = path.stem.rpartition(".")
            if not domain:
                raise DkimKeyError(f"{path}: a key file must be named <domain>.<selector>.pem")
            domain = canonical_domain(domain)
            keys[domain].append(_load(domain, selector, path.read_bytes(), str(path)))
    return dict(keys)


def _read(path: Path, index: int) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"dkim.keys.{index}.private_key: cannot read {path}: {exc.strerror}") from None


def _load(domain: str, selector: str, pem: bytes, where: str) -> DkimKey:
    try:
        return load_key(domain, selector, pem)
    except ValueError as exc:
        raise DkimKeyError(f"{where}: {exc}") from None


class Signer:
    def __init__(self, config: Config, zone: Zone, keys: dict[str, list[DkimKey]]) -> None:
        self.enabled = config.dkim.enabled and bool(keys)
        self.header_canon = config.dkim.canonicalization.split("/")[0]
        self.sign_headers = config.dkim.sign_headers or None
        self.expire = config.dkim.expire
        self.zone = zone
        self.keys = keys

    def signatures(self, headers: bytes, meta: dict[str, object]) -> bytes:
        """The DKIM-Signature headers for this message (empty when no key applies)."""
        dkim = meta.get("dkim")
        if not self.enabled or not isinstance(dkim, dict) or not dkim.get("bodyHash"):
            return b""
        canonicalization = f"{self.header_canon}/{dkim.get('bodyCanon', 'relaxed')}"
        now = int(time.time())
        expire = now + int(self.expire) if self.expire else None
        out = []
        for key in self.keys_for(HeaderBlock.parse(headers)):
            out.append(
                sign(
                    headers,
                    str(dkim["bodyHash"]),
                    key,
                    canonicalization=canonicalization,
                    signed_headers=self.sign_headers,
                    timestamp=now,
                    expire=expire,
                )
            )
        return b"".join(out)

    def keys_for(self, headers: HeaderBlock) -> list[DkimKey]:
        addresses = [addr for _, addr in getaddresses(headers.get_all("from")) if "@" in addr]
        author = domain_of(addresses[0]) if addresses else ""
        chosen = list(self.keys.get(author, []))
        if not chosen and self.zone.dkim_fallback_domain:
            chosen = list(self.keys.get(self.zone.dkim_fallback_domain, []))
        platform = self.zone.dkim_platform_domain or ""
        if platform and platform != author:
            chosen += self.keys.get(platform, [])
        return chosen
