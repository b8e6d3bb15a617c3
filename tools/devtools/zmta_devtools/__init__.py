"""Development tools: real servers for tests, the local runner, the catch-all sink, the benchmark."""
