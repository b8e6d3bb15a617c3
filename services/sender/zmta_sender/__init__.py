"""Delivery for one sending zone: MX lookup, local address, SMTP client, results."""
