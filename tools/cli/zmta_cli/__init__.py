"""``zmta``: the operators' command line of ZoneMTA-py (the queue, the delivery log, the
suppression list, pauses, traffic shaping over the HTTP API; config checks and DKIM keys
offline)."""
