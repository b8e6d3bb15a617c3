"""Shared code of the ZoneMTA-py services. Services import this package, never each other."""

__version__ = "0.1.0"
