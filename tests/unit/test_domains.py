"""One spelling of a domain wherever state is keyed by it (zmta_common.domains)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from zmta_common import redis_keys
from zmta_common.config import Config, Dkim, DomainPolicy, Zone
from zmta_common.domains import canonical_address, canonical_domain, domain_of
from zmta_common.headers import HeaderBlock
from zmta_common.routing import route
from zmta_sender.signing import Signer, load_keys

A_LABEL = "xn--exmple-cua.test"


@pytest.mark.parametrize(
    "written",
    ["exämple.test", "Exämple.TEST", "exämple.test.", " EXÄMPLE.test ", A_LABEL, "XN--EXMPLE-CUA.TEST."],
)
def test_every_spelling_of_a_domain_is_one_key(written: str) -> None:
    assert canonical_domain(written) == A_LABEL
    assert domain_of(f"User@{written}") == A_LABEL
    assert redis_keys.dns(written) == f"zmta:dns:{A_LABEL}"


def test_idna_2008_not_2003() -> None:
    # IDNA 2003 (Python's codec) maps ß to "ss": another domain than the one meant.
    assert canonical_domain("straße.test") == "xn--strae-oqa.test"
    assert canonical_domain("[192.0.2.1]") == "192.0.2.1"


def test_addresses_are_keyed_with_their_canonical_domain() -> None:
    assert canonical_address("Jöe@Exämple.TEST") == f"jöe@{A_LABEL}"
    assert canonical_address(f"jöe@{A_LABEL}") == canonical_address("JÖE@exämple.test.")


def test_config_written_with_u_labels_applies_to_a_labels() -> None:
    config = Config(
        zones={
            "default": Zone(),
            "idn": Zone(recipient_domains=["Exämple.test"], domains={"exämple.test": DomainPolicy(connections=1)}),
        }
    )
    assert route(config, HeaderBlock.parse(b""), "s@b.test", [f"r@{A_LABEL}", "r@other.test"], False) == [
        "idn",
        "default",
    ]
    assert config.zones["idn"].domain_policy(domain_of("r@EXÄMPLE.test")).connections == 1


def test_a_dkim_key_configured_for_a_u_label_signs_for_its_a_label() -> None:
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    config = Config(
        zones={"default": Zone(dkim_platform_domain="Plätform.test")},
        dkim=Dkim.model_validate(
            {
                "keys": [
                    {"domain": "Exämple.test", "selector": "s1", "private_key": pem},
                    {"domain": "plätform.test", "selector": "p1", "private_key": pem},
                ]
            }
        ),
    )
    signer = Signer(config, config.zones["default"], load_keys(config))
    chosen = signer.keys_for(HeaderBlock.parse(f"From: Someone <someone@{A_LABEL}>\r\n".encode()))
    assert [(k.domain, k.selector) for k in chosen] == [(A_LABEL, "s1"), ("xn--pltform-6wa.test", "p1")]
