"""Tiny models Edison writes itself for the demo config and the tests (no download)."""
