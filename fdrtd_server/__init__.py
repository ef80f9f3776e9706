"""fdrtd server: API controller, bus, peer gateway, identities and policy."""
