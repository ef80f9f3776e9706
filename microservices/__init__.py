"""Built-in microservices: ``data`` (upload registration, release) and ``map`` (local aggregates)."""
