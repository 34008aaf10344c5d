"""The ``cluster`` config section. Plain pydantic: importing it loads no database client."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ClusterSettings(BaseModel):
    """Several hosts as one service. Without this section Edison is one host, no database."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    database_url: str = Field(
        description="PostgreSQL that every node points at (postgresql://user@host:port/db). "
        "Procrastinate's tables and Edison's job table live there."
    )
    node_name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="This node's name, unique in the cluster.",
    )
    public_url: str = Field(
        description="How the other nodes reach this one (http://host:port): chat and output "
        "files are proxied there."
    )
    heartbeat_s: float = Field(
        2.0, gt=0, le=60, description="Seconds between this node's heartbeats."
    )
    heartbeat_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="A node silent this long (by the database's clock) has its running job "
        "re-queued for another node.",
    )
    sweep_every_s: float = Field(
        2.0, gt=0, le=600, description="Seconds between this node's sweeps for stalled jobs."
    )
    poll_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Seconds between fetch attempts when no notification came (LISTEN/NOTIFY "
        "wakes the loop at once otherwise).",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="Runs a job may start (node deaths included) before it fails."
    )
    progress_every_s: float = Field(
        0.5, gt=0, le=60, description="Most often a running job's progress is written."
    )
    handback_delay_s: float = Field(
        1.0,
        ge=0,
        le=600,
        description="A job this node can never hold waits this long before a node may fetch "
        "it again (so another node gets it first).",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Seconds to reach the database at start-up."
    )

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v

    @field_validator("public_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _timeout_above_heartbeat(self) -> ClusterSettings:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_s:
            raise ValueError("heartbeat_timeout_s must be more than twice heartbeat_s")
        return self
