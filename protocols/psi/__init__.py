"""Private set intersection by commutative (Diffie-Hellman) blinding."""
