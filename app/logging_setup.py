"""Logging, configured once: one line per event."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Set the root handler and level; calling again only changes the level."""
    root = logging.getLogger()
    if not any(getattr(h, "_edison", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._edison = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("edison").setLevel(level.upper())
    # One line per event: httpx would add one per proxied request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
