"""The HTTP API: message submission, queue views, counters, metrics."""
