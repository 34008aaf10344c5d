"""Memory: the one place it is decided. Probe, ledger, placement (figures), gate (acts)."""
