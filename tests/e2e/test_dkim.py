"""DKIM signing at send time, checked by dkimpy against the keys published in the test DNS."""

from __future__ import annotations

import asyncio
import re

import dkim
import dns.resolver
import pytest

from tests.support import Deployment, DeploymentFactory, Infra, eventually
from zmta_devtools.sink import Sink

MESSAGE = (
    b"From: Alice <alice@b.test>\r\n"
    b"To: bob@a.test\r\n"
    b"Subject: signed  \r\n"
    b"  and folded\r\n"
    b"\r\n"
    b"Hello  there \r\n"
    b"\r\n"
    b"\r\n"
)


def dns_txt(infra: Infra):  # type: ignore[no-untyped-def]
    """dkimpy's dnsfunc, answered by the test DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = infra.dns.port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def signatures(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return re.findall(r"^DKIM-Signature:((?:.*)(?:\r\n[ \t].*)*)", head, re.MULTILINE)


def verify_all(data: bytes, infra: Infra) -> list[bool]:
    checker = dkim.DKIM(data)
    lookup = dns_txt(infra)
    results = []
    for index in range(len(signatures(data))):
        try:
            results.append(bool(checker.verify(idx=index, dnsfunc=lookup)))
        except dkim.ValidationError:  # dkimpy raises for a body hash mismatch
            results.append(False)
    return results


async def deliver(d: Deployment, sinks: dict, mail_from: str, message: bytes) -> bytes:
    await asyncio.to_thread(d.smtp_send, mail_from, ["bob@a.test"], message)
    sink: Sink = sinks["127.0.0.2"]
    await eventually(lambda: sink.messages, what="the signed delivery")
    return sink.messages[-1].data


def dkim_config(infra: Infra, canonicalization: str = "relaxed/relaxed") -> dict:
    return {"dkim": {"key_dir": str(infra.workdir / "dkim"), "canonicalization": canonicalization}}


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
async def test_author_domain_signs_with_rsa_and_ed25519(
    deploy: DeploymentFactory, sinks: dict, infra: Infra, canonicalization: str
) -> None:
    d = await deploy(dkim_config(infra, canonicalization), senders={"default": 1})
    data = await deliver(d, sinks, "alice@b.test", MESSAGE)
    tags = [dict(re.findall(r"(\w+)=([^;]*)", " ".join(s.split()))) for s in signatures(data)]
    assert sorted((t["d"], t["s"], t["a"]) for t in tags) == [
        ("b.test", "ed", "ed25519-sha256"),
        ("b.test", "rsa", "rsa-sha256"),
    ]
    assert {t["c"] for t in tags} == {canonicalization}
    assert verify_all(data, infra) == [True, True]
    # The check can fail: one changed byte of the body breaks both signatures.
    tampered = data.replace(b"Hello  there", b"Hello  thera")
    assert verify_all(tampered, infra) == [False, False]


async def test_fallback_and_platform_domains(deploy: DeploymentFactory, sinks: dict, infra: Infra) -> None:
    zone = {"dkim_fallback_domain": "b.test", "dkim_platform_domain": "platform.test"}
    d = await deploy({**dkim_config(infra), "zones": {"default": zone}}, senders={"default": 1})
    message = MESSAGE.replace(b"alice@b.test", b"carol@unsigned.test")
    data = await deliver(d, sinks, "carol@unsigned.test", message)
    domains = sorted(re.search(r"\bd=([^;\s]+)", " ".join(s.split())).group(1) for s in signatures(data))  # type: ignore[union-attr]
    assert domains == ["b.test", "b.test", "platform.test"]  # the fallback's two keys, and the platform's
    assert verify_all(data, infra) == [True, True, True]


async def test_no_key_no_signature(deploy: DeploymentFactory, sinks: dict, infra: Infra) -> None:
    d = await deploy(dkim_config(infra), senders={"default": 1})
    data = await deliver(d, sinks, "carol@unsigned.test", MESSAGE.replace(b"alice@b.test", b"carol@unsigned.test"))
    assert signatures(data) == []
