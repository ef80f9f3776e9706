"""Secure multiparty computation by additive secret sharing."""
