"""Built-in microservices: ``data`` (registers and releases uploads), ``map`` (aggregates)."""
