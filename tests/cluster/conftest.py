"""A real PostgreSQL (Debian's package, a private cluster started here) and real
`edison serve` nodes on loopback ports, for the cluster tests.

The tests skip only when PostgreSQL cannot be installed (`make test` installs it, as it
does Chromium) or its client library is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import deep_merge, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
FAST = {  # short heartbeats: the chaos tests wait seconds, not half a minute
    "heartbeat_s": 0.5,
    "heartbeat_timeout_s": 5.0,
    "sweep_every_s": 0.5,
    "poll_s": 1.0,
    "handback_delay_s": 0.2,
    "progress_every_s": 0.2,
}


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    pytest.importorskip("procrastinate", reason="the cluster extra is not installed")
    from services.cluster.localdb import LocalDbUnavailable, LocalPostgres, pg_bin_dir

    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    # Not under pytest's basetemp: every pytest session (another run's too) resets that
    # folder to mode 0700, and the 'postgres' user must keep reaching its data.
    root = Path(tempfile.mkdtemp(prefix="edison-pg-"))
    pg = LocalPostgres(root, free_port())
    try:
        pg.start()
    except LocalDbUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {exc}")
    yield pg
    pg.stop("immediate")
    pg.wait_stopped()
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)


@dataclass
class Cluster:
    """Nodes of one test, the hold file and the runs folder they share."""

    root: Path
    pg: Any
    pipelines: dict[str, Path]
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def hold(self) -> Path:
        return self.root / "hold"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def config(self, name: str, port: int, **extra: Any) -> dict[str, Any]:
        base = {
            "server": {
                "port": port,
                "outputs_dir": str(self.root / name / "outputs"),
                "log_level": "info",
            },
            "memory": {"reserve_ram_mb": 0, "state_dir": str(self.root / name / "state")},
            "generation": {
                "image": {
                    "pipeline": str(self.pipelines["image"]),
                    "required_ram_mb": 64,
                    "default_steps": 2,
                    "max_pixels": 65536,
                }
            },
            "cluster": {
                "database_url": self.pg.url,
                "node_name": name,
                "public_url": f"http://127.0.0.1:{port}",
                **FAST,
            },
        }
        return deep_merge(base, extra)

    def start(self, name: str, wait: bool = True, **extra: Any) -> Node:
        port = free_port()
        (self.root / name).mkdir(parents=True, exist_ok=True)
        cfg = self.root / name / "edison.yaml"
        cfg.write_text(yaml.safe_dump(self.config(name, port, **extra)))
        log = self.root / name / "node.log"
        env = {
            **os.environ,
            "EDISON_TEST_RUNS": str(self.runs),
            "EDISON_TEST_HOLD": str(self.hold),
            "EDISON_TEST_NODE": name,
            "HF_HUB_OFFLINE": "1",
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster.node", str(cfg)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        node = Node(name, port, proc, log)
        self.nodes[name] = node
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: Node) -> None:
        def ready() -> bool:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                return node.get("/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=120, interval=0.1, what=f"{node.name} ready")

    def completions(self) -> list[str]:
        return sorted(p.name for p in self.runs.glob("*.done"))

    def starts(self) -> list[str]:
        return sorted(p.name for p in self.runs.glob("*.start"))

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
                node.proc.terminate()
        for node in self.nodes.values():
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()


@pytest.fixture
def cluster(postgres: Any, tiny_pipelines: dict[str, Path], tmp_path: Path) -> Iterator[Cluster]:
    """An empty queue and a fresh folder; the test starts the nodes it needs."""
    postgres.psql(
        "DO $$ BEGIN IF to_regclass('edison_jobs') IS NOT NULL THEN "
        "TRUNCATE edison_jobs, edison_nodes, procrastinate_jobs, procrastinate_workers, "
        "procrastinate_events CASCADE; END IF; END $$"
    )
    c = Cluster(tmp_path, postgres, tiny_pipelines)
    c.runs.mkdir()
    try:
        yield c
    finally:
        c.stop_all()
