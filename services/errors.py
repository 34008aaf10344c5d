"""Typed errors raised by Edison's services.

Services never know about HTTP: each error carries a stable ``code`` and its
details; ``app/errors.py`` maps the classes to status codes and one error body.
"""

from __future__ import annotations

from typing import Any


class EdisonError(Exception):
    """Base of every error Edison reports to a client."""

    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigError(EdisonError):
    code = "invalid_config"


class InvalidRequest(EdisonError):
    """A request value outside what the config allows; ``fields`` names each one."""

    code = "invalid_request"

    def __init__(self, field: str, message: str, **extra: Any) -> None:
        # ``extra`` goes into the field's entry, e.g. ``nearest=[64, 80]``: the valid
        # values either side of the one refused.
        super().__init__(
            f"Invalid request: {field}: {message}",
            fields=[{"field": field, "message": message, **extra}],
        )
        self.field = field


class NotReady(EdisonError):
    code = "not_ready"


class InsufficientMemory(EdisonError):
    """Not enough VRAM (or RAM on a CPU-only host) for the task, even after unloading."""

    code = "insufficient_vram"

    def __init__(self, message: str, *, retry_after_s: float = 10, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s
        if details.get("device") == "cpu":
            self.code = "insufficient_ram"


class ResidencyHold(EdisonError):
    """Every heavy slot a chat could take holds a model younger than
    ``models.min_residency_s``: the chat waits (``wait_s``) or falls back."""

    code = "heavy_slot_resident"

    def __init__(self, message: str, *, wait_s: float, **details: Any) -> None:
        super().__init__(message, wait_s=wait_s, **details)
        self.wait_s = wait_s
        self.retry_after_s = max(1.0, wait_s)


class QueueFull(EdisonError):
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 5, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class QueueTimeout(QueueFull):
    code = "queue_timeout"


class UnknownTier(EdisonError):
    code = "unknown_tier"


class ModelLoadFailed(EdisonError):
    code = "model_load_failed"


class ModelUnavailable(EdisonError):
    """A model or pipeline that cannot serve now (missing, broken, or its worker died)."""

    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 5, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class ContextLengthExceeded(EdisonError):
    code = "context_length_exceeded"


class UpstreamError(EdisonError):
    """A worker answered with an error or broke the connection mid-request."""

    code = "upstream_error"


class UpstreamRejected(EdisonError):
    """A worker refused the request as invalid (its own 4xx)."""

    code = "invalid_request"


class NotFound(EdisonError):
    code = "not_found"


class Cancelled(EdisonError):
    code = "cancelled"


class JobNotFinished(EdisonError):
    """A request that needs a finished job (removing it) on one still queued or running."""

    code = "job_not_finished"
