"""SMPC protocols: tables (being written)."""
