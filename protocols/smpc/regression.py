"""SMPC protocols: regression (being written)."""
