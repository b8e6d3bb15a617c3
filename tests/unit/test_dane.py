"""DANE (zmta_sender.dane) without any server: TLSA matching for every usage, selector and
matching type against certificates made by trustme and cryptography, DANE-TA chains and
names, what is usable, the presented chain of a real handshake (over memory, no socket),
how DANE and MTA-STS combine, the TLS outcome and policy, and the settings."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from zmta_common import redis_keys
from zmta_common.config import ConfigError, load_config
from zmta_sender.dane import (
    CERT,
    DANE_EE,
    DANE_TA,
    FULL,
    PKIX_EE,
    PKIX_TA,
    SHA256,
    SHA512,
    SPKI,
    Dane,
    DaneMismatch,
    HostDane,
    Tlsa,
    authenticate,
    presented_chain,
    spki,
    with_sts,
)
from zmta_sender.errors import DeliveryError
from zmta_sender.mta_sts import StsPolicy
from zmta_sender.mx import Target
from zmta_sender.tls import OPPORTUNISTIC, REQUIRED, TlsContexts, TlsOutcome, TlsPolicy

MX = "mx.a.test"
NOW = datetime.datetime.now(datetime.UTC)


def der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    """The chain as the server presents it: its certificate, then the intermediates."""
    return [x509.load_pem_x509_certificate(pem.bytes()).public_bytes(Encoding.DER) for pem in leaf.cert_chain_pems]


def cert_of(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def record(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> Tlsa:
    selected = cert.public_bytes(Encoding.DER) if selector == CERT else spki(cert)
    if mtype == SHA256:
        selected = hashlib.sha256(selected).digest()
    elif mtype == SHA512:
        selected = hashlib.sha512(selected).digest()
    return Tlsa(usage, selector, mtype, selected)


def wrong(usage: int) -> Tlsa:
    return Tlsa(usage, SPKI, SHA256, bytes(32))


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def intermediate(root: trustme.CA) -> trustme.CA:
    return root.create_child_ca()


@pytest.fixture(scope="module")
def leaf(intermediate: trustme.CA) -> trustme.LeafCert:
    """mx.a.test's certificate, issued by the intermediate: chain [leaf, intermediate]."""
    return intermediate.issue_cert(MX)


# DANE-EE


@pytest.mark.parametrize("selector", [CERT, SPKI])
@pytest.mark.parametrize("mtype", [FULL, SHA256, SHA512])
def test_dane_ee_matches_the_certificate_or_its_key_by_every_matching_type(
    leaf: trustme.LeafCert, selector: int, mtype: int
) -> None:
    chain = der_chain(leaf)
    own = record(DANE_EE, selector, mtype, x509.load_der_x509_certificate(chain[0]))
    assert authenticate([wrong(DANE_EE), own], chain, [MX], NOW) == "DANE-EE"


def test_dane_ee_checks_neither_name_nor_dates(root: trustme.CA) -> None:
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    old = root.issue_cert("elsewhere.test", not_before=past, not_after=past + datetime.timedelta(days=1))
    chain = der_chain(old)
    own = record(DANE_EE, SPKI, SHA256, x509.load_der_x509_certificate(chain[0]))
    assert authenticate([own], chain, [MX], NOW) == "DANE-EE"


def test_dane_ee_of_another_certificate_with_the_same_name_does_not_match(
    leaf: trustme.LeafCert, intermediate: trustme.CA
) -> None:
    other = der_chain(intermediate.issue_cert(MX))[0]
    records = [record(DANE_EE, SPKI, SHA256, x509.load_der_x509_certificate(other)), wrong(DANE_EE)]
    with pytest.raises(DaneMismatch, match=r"^matches none of its 2 TLSA records$"):
        authenticate(records, der_chain(leaf), [MX], NOW)


def test_dane_ee_is_about_the_server_certificate_only(leaf: trustme.LeafCert, intermediate: trustme.CA) -> None:
    # A DANE-EE record of the intermediate does not make the chain pass.
    with pytest.raises(DaneMismatch):
        authenticate([record(DANE_EE, CERT, SHA256, cert_of(intermediate))], der_chain(leaf), [MX], NOW)


# DANE-TA


@pytest.mark.parametrize("selector", [CERT, SPKI])
@pytest.mark.parametrize("mtype", [FULL, SHA256, SHA512])
def test_dane_ta_matches_an_issuer_the_server_presents(
    leaf: trustme.LeafCert, intermediate: trustme.CA, selector: int, mtype: int
) -> None:
    anchor = record(DANE_TA, selector, mtype, cert_of(intermediate))
    assert authenticate([anchor], der_chain(leaf), [MX], NOW) == "DANE-TA"


def test_dane_ta_through_an_intermediate_to_a_presented_root(
    leaf: trustme.LeafCert, root: trustme.CA, intermediate: trustme.CA
) -> None:
    chain = [*der_chain(leaf), cert_of(root).public_bytes(Encoding.DER)]
    assert authenticate([record(DANE_TA, SPKI, SHA256, cert_of(root))], chain, [MX], NOW) == "DANE-TA"


def test_dane_ta_needs_the_anchor_in_the_presented_chain(leaf: trustme.LeafCert, root: trustme.CA) -> None:
    # The root is not presented (only leaf and intermediate): nothing to match the record against.
    with pytest.raises(DaneMismatch, match="matches none of its 1 TLSA records"):
        authenticate([record(DANE_TA, SPKI, SHA256, cert_of(root))], der_chain(leaf), [MX], NOW)


def test_dane_ta_needs_the_anchor_to_issue_the_server_certificate(leaf: trustme.LeafCert) -> None:
    # A presented certificate that matches the record but issued nothing of the chain.
    stranger = trustme.CA()
    chain = [*der_chain(leaf), cert_of(stranger).public_bytes(Encoding.DER)]
    with pytest.raises(DaneMismatch, match="matches none"):
        authenticate([record(DANE_TA, CERT, SHA256, cert_of(stranger))], chain, [MX], NOW)


def test_dane_ta_checks_the_name(intermediate: trustme.CA) -> None:
    chain = der_chain(intermediate.issue_cert("mx.elsewhere.test"))
    anchor = record(DANE_TA, SPKI, SHA256, cert_of(intermediate))
    with pytest.raises(
        DaneMismatch, match=r"^chains to its DANE-TA trust anchor but does not name mx\.a\.test or a\.test$"
    ):
        authenticate([anchor], chain, [MX, "a.test"], NOW)


def test_dane_ta_takes_the_next_hop_domain_and_a_wildcard(intermediate: trustme.CA) -> None:
    anchor = record(DANE_TA, SPKI, SHA256, cert_of(intermediate))
    assert authenticate([anchor], der_chain(intermediate.issue_cert("a.test")), [MX, "a.test"], NOW) == "DANE-TA"
    assert authenticate([anchor], der_chain(intermediate.issue_cert("*.a.test")), [MX], NOW) == "DANE-TA"
    with pytest.raises(DaneMismatch, match="does not name"):  # one label only
        authenticate([anchor], der_chain(intermediate.issue_cert("*.test")), [MX], NOW)


def test_dane_ta_checks_the_dates(intermediate: trustme.CA) -> None:
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    chain = der_chain(intermediate.issue_cert(MX, not_before=past, not_after=past + datetime.timedelta(days=1)))
    with pytest.raises(DaneMismatch, match="is not valid now"):
        authenticate([record(DANE_TA, SPKI, SHA256, cert_of(intermediate))], chain, [MX], NOW)


def test_dane_ta_falls_back_to_the_common_name_without_dns_names() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TA")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)]), key, ca_name, ca_key)
    chain = [server.public_bytes(Encoding.DER), ca.public_bytes(Encoding.DER)]
    assert authenticate([record(DANE_TA, CERT, FULL, ca)], chain, [MX], NOW) == "DANE-TA"


def certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signer, hashes.SHA256())


def test_garbage_instead_of_a_certificate_is_a_mismatch() -> None:
    with pytest.raises(DaneMismatch, match="cannot be parsed"):
        authenticate([wrong(DANE_EE)], [b"not a certificate"], [MX], NOW)
    with pytest.raises(DaneMismatch, match="was not presented"):
        authenticate([wrong(DANE_EE)], [], [MX], NOW)


# Usable records, the cache form


def test_pkix_usages_and_unknown_parameters_are_unusable() -> None:
    data = bytes(32)
    host = HostDane(
        MX,
        25,
        (
            Tlsa(PKIX_TA, SPKI, SHA256, data),
            Tlsa(PKIX_EE, SPKI, SHA256, data),
            Tlsa(DANE_EE, 2, SHA256, data),  # no such selector
            Tlsa(DANE_EE, SPKI, 3, data),  # no such matching type
            Tlsa(4, SPKI, SHA256, data),  # no such usage
            Tlsa(DANE_TA, CERT, SHA512, data),
        ),
    )
    assert host.usable == (Tlsa(DANE_TA, CERT, SHA512, data),)
    assert HostDane(MX, 25, host.records[:2]).usable == ()


def test_host_records_round_trip_through_json() -> None:
    host = HostDane(MX, 2525, (Tlsa(3, 1, 1, bytes(range(32))), Tlsa(2, 0, 2, b"\xff" * 64)))
    assert HostDane.from_json(MX, 2525, host.to_json()) == host
    assert HostDane.from_json(MX, 25, HostDane(MX, 25).to_json()).records == ()
    assert redis_keys.tlsa("MX.A.test.", 25) == "zmta:tlsa:mx.a.test:25"
    assert redis_keys.dane("A.Test") == "zmta:dane:a.test"


# The chain a real handshake presents (Python 3.11: the private _ssl method)


def handshake(server_context: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake between two SSLObjects over memory BIOs; the client's side, unverified."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = TlsContexts(None).unverified.wrap_bio(client_in, client_out, server_hostname=MX)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):  # waits for the other side's bytes
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if client.version() and server.version():
            return client
    raise AssertionError("no handshake")


def test_presented_chain_is_the_whole_chain_the_server_sent(leaf: trustme.LeafCert) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    assert presented_chain(handshake(context)) == der_chain(leaf)


# DANE before MTA-STS, the policy and the outcome


def targets(*hosts: str) -> list[Target]:
    return [Target(host, "192.0.2.1", 25) for host in hosts]


def test_dane_hosts_stay_whatever_the_mta_sts_policy_says() -> None:
    contexts = TlsContexts(None)
    dane = {"mx1.a.test": HostDane("mx1.a.test", 25, (wrong(DANE_EE),))}
    policy = StsPolicy("enforce", 86400, ("mx2.a.test",))
    tls, left = with_sts(
        policy,
        "a.test",
        TlsPolicy(OPPORTUNISTIC, contexts, dane=dane),
        targets("mx1.a.test", "mx2.a.test", "mx3.a.test"),
    )
    assert [t.host for t in left] == ["mx1.a.test", "mx2.a.test"]  # mx3: not in the policy, and no DANE
    assert tls.mode == REQUIRED and tls.dane == dane

    nothing = StsPolicy("enforce", 86400, ("mail.elsewhere.test",))
    tls, left = with_sts(
        nothing, "a.test", TlsPolicy(OPPORTUNISTIC, contexts, dane=dane), targets("mx1.a.test", "mx2.a.test")
    )
    assert [t.host for t in left] == ["mx1.a.test"]
    with pytest.raises(DeliveryError, match="allows none of its MX hosts"):  # without DANE: as before
        with_sts(nothing, "a.test", TlsPolicy(OPPORTUNISTIC, contexts), targets("mx2.a.test"))


def test_a_parked_session_serves_a_dane_host_only_if_it_was_opened_under_dane() -> None:
    policy = TlsPolicy(OPPORTUNISTIC, TlsContexts(None), dane={MX: HostDane(MX, 25, (wrong(DANE_EE),))})
    verified = TlsOutcome("TLSv1.3", "TLS_AES_256_GCM_SHA384", verified=True)
    assert not policy.satisfied_by(verified, MX)
    assert policy.satisfied_by(TlsOutcome("TLSv1.3", "X", verified=True, dane="DANE-EE"), MX)
    assert policy.satisfied_by(TlsOutcome(), "mx.other.test")  # opportunistic for the others


def test_the_outcome_says_how_dane_authenticated() -> None:
    assert str(TlsOutcome("TLSv1.3", "X", True, "DANE-TA")) == "version=TLSv1.3 cipher=X verified=yes dane=DANE-TA"
    assert str(TlsOutcome("TLSv1.2", "X", False, "unusable")) == "version=TLSv1.2 cipher=X verified=no dane=unusable"
    assert str(TlsOutcome("TLSv1.3", "X", False)) == "version=TLSv1.3 cipher=X verified=no"


# Settings


def test_dane_needs_a_validating_resolver(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.dane: DANE needs dns\.dnssec: true"):
        load_config(None, tls={"dane": True})
    with pytest.raises(ConfigError, match=r"zones\.default\.domains\.a\.test\.dane: DANE needs dns\.dnssec"):
        load_config(None, zones={"default": {"domains": {"a.test": {"dane": True}}}})
    assert load_config(None, dns={"dnssec": True}, tls={"dane": True}).tls.dane is True


def test_dane_is_on_with_dnssec_unless_turned_off_for_all_a_zone_or_a_domain() -> None:
    config = load_config(
        None,
        dns={"dnssec": True},
        zones={
            "default": {"domains": {"b.test": {"dane": False}}},
            "bulk": {"domains": {"*": {"dane": False}, "a.test": {"dane": True}}},
        },
    )
    dane = Dane(config.dns, config.tls, None)
    assert dane.wanted(config.zones["default"], "a.test") and not dane.wanted(config.zones["default"], "b.test")
    assert not dane.wanted(config.zones["bulk"], "c.test") and dane.wanted(config.zones["bulk"], "a.test")

    off = load_config(
        None, dns={"dnssec": True}, tls={"dane": False}, zones={"default": {"domains": {"a.test": {"dane": True}}}}
    )
    dane = Dane(off.dns, off.tls, None)
    assert not dane.wanted(off.zones["default"], "b.test") and dane.wanted(off.zones["default"], "a.test")
    plain = load_config(None)
    assert plain.dns.dnssec is False and Dane(plain.dns, plain.tls, None).default is False
