"""Secure-computation protocols run by fdrtd servers."""
