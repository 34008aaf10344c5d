"""Logging, configured once: one line per event.

Libraries' own chatter goes through it too: Python warnings (deprecations, the
torchvision notice transformers prints) become DEBUG lines of the `py.warnings` logger,
and diffusers' and transformers' progress bars ("Loading pipeline components") are off.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _warning_to_debug(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    logging.getLogger("py.warnings").debug(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )


def quiet_libraries() -> None:
    """Progress bars off, library verbosity to errors, warnings to DEBUG log lines."""
    warnings.showwarning = _warning_to_debug
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


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
