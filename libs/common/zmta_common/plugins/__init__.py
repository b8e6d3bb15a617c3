"""Plugins that ship with ZoneMTA-py; enable them by import path in the config's ``plugins``."""
