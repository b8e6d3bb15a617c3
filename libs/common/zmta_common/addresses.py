"""Checking envelope addresses with email-validator (syntax only; DNS decides deliverability)."""

from __future__ import annotations

import functools

from email_validator import EmailNotValidError, validate_email


# A pure function of its arguments, and bulk mail repeats its senders (and often its
# recipients): the verdicts of recent addresses are kept.
@functools.lru_cache(maxsize=8192)
def address_error(address: str, smtputf8: bool = True) -> str | None:
    """None when ``address`` is a valid RFC 5321 mailbox, else the reason it is not."""
    try:
        validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=smtputf8,
            allow_quoted_local=True,
            allow_domain_literal=True,
            globally_deliverable=False,
            # Lets the reserved .test domain through; tests and staging setups send there.
            test_environment=True,
        )
    except EmailNotValidError as exc:
        return str(exc)
    return None
