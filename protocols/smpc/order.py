"""SMPC protocols: order (being written)."""
