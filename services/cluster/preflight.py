"""Before serving: can this node reach the cluster database? (`edison serve` exits 2 if not.)"""

from __future__ import annotations

import psycopg

from services.cluster.config import ClusterSettings
from services.cluster.node import _redacted
from services.errors import ConfigError


def check_database(cfg: ClusterSettings) -> None:
    """One connection with the configured timeout; ConfigError naming cluster.database_url."""
    try:
        with psycopg.connect(cfg.database_url, connect_timeout=max(1, int(cfg.connect_timeout_s))):
            pass
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cluster.database_url: cannot reach the cluster database "
            f"{_redacted(cfg.database_url)}: {reason}"
        ) from None
