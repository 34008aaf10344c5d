"""Prometheus metrics, one registry per app (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.memory.ledger import MemoryLedger
from services.memory.placement import DeviceView
from services.memory.probe import MemorySnapshot

if TYPE_CHECKING:
    from services.llm.manager import ModelManager
    from services.memory.gate import MemoryGate


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ram_total = Gauge("edison_ram_total_mb", "Total RAM, MB.", registry=r)
        self.ram_available = Gauge("edison_ram_available_mb", "Available RAM, MB.", registry=r)
        self.vram_total = Gauge(
            "edison_vram_total_mb", "VRAM per device, MB.", ["device"], registry=r
        )
        self.vram_free = Gauge(
            "edison_vram_free_mb", "Free VRAM per device, MB.", ["device"], registry=r
        )
        self.held = Gauge(
            "edison_ledger_held_mb", "Memory held in the ledger, MB.", ["device"], registry=r
        )
        self.models_loaded = Gauge("edison_models_loaded", "LLM workers running.", registry=r)
        self.queue_length = Gauge("edison_gate_queue_length", "Heavy tasks waiting.", registry=r)
        self.gate_busy = Gauge("edison_gate_busy", "1 while a heavy task runs.", registry=r)
        self.gate_decisions = Counter(
            "edison_gate_decisions", "Gate outcomes.", ["outcome"], registry=r
        )
        self.task_seconds = Histogram(
            "edison_task_duration_seconds",
            "Generation job duration by endpoint and status.",
            ["endpoint", "status"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.prediction_ratio = Histogram(
            "edison_memory_prediction_ratio",
            "Measured working memory of a generation run / its learned prediction "
            "(margin included): below 1 the prediction covered the peak.",
            ["kind"],
            buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4),
            registry=r,
        )
        per = ["device"]
        self.device_usable = Gauge(
            "edison_device_usable_mb",
            "What a decision may use on each device Edison places on, MB.",
            per,
            registry=r,
        )
        self.device_queue = Gauge(
            "edison_device_queue_length", "Heavy tasks waiting per device.", per, registry=r
        )
        self.device_busy = Gauge(
            "edison_device_busy", "1 while a heavy task runs on the device.", per, registry=r
        )
        self.heavy_slot = Gauge(
            "edison_heavy_slot",
            "1 for the heavy LLM tier loaded on each device.",
            ["device", "tier"],
            registry=r,
        )
        self._seen_outcomes: dict[str, int] = {}
        self._cluster: tuple[Gauge, Gauge, Gauge, Gauge] | None = None  # cluster mode only

    def observe_cluster_queue(
        self, queue: str, *, queued: int, running: int, attempts: int, retried: int
    ) -> None:
        """Cluster mode: one kind's queue as the database has it (the gauges exist only
        once a cluster node sets them, so one host's /metrics is unchanged)."""
        depth, attempts_g, retried_g, up = self._cluster_gauges()
        depth.labels(queue=queue, state="queued").set(queued)
        depth.labels(queue=queue, state="running").set(running)
        attempts_g.labels(queue=queue).set(attempts)
        retried_g.labels(queue=queue).set(retried)
        up.set(1)

    def observe_cluster_down(self) -> None:
        """Cluster mode: the database did not answer (the last queue figures stand)."""
        self._cluster_gauges()[3].set(0)

    def _cluster_gauges(self) -> tuple[Gauge, Gauge, Gauge, Gauge]:
        if self._cluster is None:
            r, q = self.registry, ["queue"]
            self._cluster = (
                Gauge(
                    "edison_cluster_queue_depth",
                    "Cluster jobs per queue and state (queued, running), every node's.",
                    ["queue", "state"],
                    registry=r,
                ),
                Gauge(
                    "edison_cluster_job_attempts",
                    "Attempts the engine recorded over the queue's jobs it keeps: finished "
                    "runs, requeues after a node died, hand-backs.",
                    q,
                    registry=r,
                ),
                Gauge(
                    "edison_cluster_jobs_retried",
                    "The queue's jobs that took more than one attempt.",
                    q,
                    registry=r,
                ),
                Gauge(
                    "edison_cluster_database_up",
                    "1 while the cluster database answers this node.",
                    registry=r,
                ),
            )
        return self._cluster

    def observe_task(self, kind: str, status: str, seconds: float) -> None:
        self.task_seconds.labels(endpoint=f"/generate-{kind}", status=status).observe(seconds)

    def observe_prediction(self, kind: str, predicted_mb: float, measured_mb: float) -> None:
        if predicted_mb > 0:
            self.prediction_ratio.labels(kind=kind).observe(measured_mb / predicted_mb)

    def render(
        self,
        snap: MemorySnapshot,
        ledger: MemoryLedger,
        models: ModelManager,
        gate: MemoryGate,
        views: Sequence[DeviceView] = (),
    ) -> bytes:
        """Refresh the gauges from one snapshot (``views``: each device placed on,
        budgeted from it) and return the text format."""
        self.heavy_slot.clear()
        for view in views:
            lane = gate.lane_state(view.device)
            self.device_usable.labels(device=view.device).set(view.budget.usable_mb)
            self.device_queue.labels(device=view.device).set(lane.queue_length)
            self.device_busy.labels(device=view.device).set(1 if lane.state == "busy" else 0)
            if lane.heavy_slot is not None:
                self.heavy_slot.labels(device=view.device, tier=lane.heavy_slot).set(1)
        self.ram_total.set(snap.ram_total_mb)
        self.ram_available.set(snap.ram_available_mb)
        for g in snap.gpus:
            self.vram_total.labels(device=f"cuda:{g.index}").set(g.total_mb)
            self.vram_free.labels(device=f"cuda:{g.index}").set(g.free_mb)
        devices = (
            {r.device for r in ledger.entries()} | {"cpu"} | {f"cuda:{g.index}" for g in snap.gpus}
        )
        for d in devices:
            self.held.labels(device=d).set(ledger.held_mb(d))
        self.models_loaded.set(len(models.loaded_models()))
        self.queue_length.set(gate.queue_length)
        self.gate_busy.set(1 if gate.current is not None else 0)
        for outcome, n in gate.outcomes.items():
            delta = n - self._seen_outcomes.get(outcome, 0)
            if delta > 0:
                self.gate_decisions.labels(outcome=outcome).inc(delta)
            self._seen_outcomes[outcome] = n
        return generate_latest(self.registry)
