"""A real PostgreSQL (Debian's package, a private cluster started here) and real
`edison serve` nodes on loopback ports, for the cluster tests.

One PostgreSQL server per session; each group of nodes gets its own database on it (made
from a template that already holds the schema), so groups never see each other's jobs.
Two nodes, ``a`` and ``b``, are shared by every test that kills nothing (``shared``); the
tests that kill or freeze a node start their own (``cluster``, or a module's group).

The tests skip only when PostgreSQL cannot be installed (`make test` installs it, as it
does Chromium) or its client library is missing.
"""

from __future__ import annotations

import asyncio
import itertools
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
TEMPLATE = "edison_template"
NEVER_MB = 1_048_576  # a need (1 TiB) no node here can ever hold: the node refuses it
_databases = itertools.count(1)


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
        asyncio.run(_schema(pg.create_database(TEMPLATE)))
    except LocalDbUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {exc}")
    yield pg
    pg.stop("immediate")
    pg.wait_stopped()
    shutil.rmtree(root, ignore_errors=True)


async def _schema(url: str) -> None:
    """Procrastinate's schema and Edison's tables, once, in the template database."""
    from services.cluster.store import ClusterStore

    store = ClusterStore(url)
    await store.open()
    await store.close()


def new_database(pg: Any, prefix: str) -> str:
    """A fresh database with the schema (a copy of the template); its name."""
    name = f"{prefix}{next(_databases)}"
    pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database="postgres")
    pg.psql(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"', database="postgres")
    return name


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)


@dataclass
class Cluster:
    """Nodes on one database, the hold file and the runs folder they share."""

    root: Path
    pg: Any
    pipelines: dict[str, Path]
    database: str
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.pg.url_of(self.database)

    @property
    def hold(self) -> Path:
        return self.root / "hold"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def sql(self, statement: str) -> str:
        return self.pg.psql(statement, database=self.database)

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
                    "preload": True,  # warmed before /ready: a re-run pays no load
                }
            },
            "cluster": {
                "database_url": self.url,
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
            # Why: tiny tensors gain nothing from a second thread, and on 2 busy cores the
            # nodes' threads wait on each other (as tests/conftest.py does in-process).
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        with log.open("ab") as out:
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

    def start_many(self, configs: dict[str, dict[str, Any]]) -> list[Node]:
        """Start several nodes at once (their imports overlap), then wait for each."""
        nodes = [self.start(name, wait=False, **extra) for name, extra in configs.items()]
        for node in nodes:
            self.wait_ready(node)
        return nodes

    def wait_ready(self, node: Node, timeout: float = 180) -> None:
        def ready() -> bool:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                return node.get("/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=timeout, interval=0.2, what=f"{node.name} ready")

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive]

    def completions(self) -> list[str]:
        return sorted(p.name for p in self.runs.glob("*.done"))

    def starts(self) -> list[str]:
        return sorted(p.name for p in self.runs.glob("*.start"))

    def idle(self) -> bool:
        """No job of this database is queued or running."""
        busy = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        return self.sql(busy) == "0"

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


def make_cluster(pg: Any, pipelines: dict[str, Path], root: Path, prefix: str) -> Cluster:
    c = Cluster(root, pg, pipelines, new_database(pg, prefix))
    c.runs.mkdir(parents=True, exist_ok=True)
    return c


@pytest.fixture
def cluster(postgres: Any, tiny_pipelines: dict[str, Path], tmp_path: Path) -> Iterator[Cluster]:
    """A database of its own and a fresh folder; the test starts the nodes it needs."""
    c = make_cluster(postgres, tiny_pipelines, tmp_path, "t")
    try:
        yield c
    finally:
        c.stop_all()


def shared_configs(tiny_dir: Path, pipelines: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The shared nodes: both run images. Only ``a`` can hold a music job (``b``'s need is
    beyond anything it has: it hands music back); neither can hold a video job. ``a``
    holds the ``fast`` chat tier, ``b`` has no tiers of its own."""
    music = {"pipeline": str(pipelines["music"]), "default_steps": 1}
    video = {"pipeline": str(pipelines["video"]), "required_ram_mb": NEVER_MB}
    return {
        "a": {
            "generation": {"music": {**music, "required_ram_mb": 64}, "video": video},
            "models": {"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1},
        },
        "b": {"generation": {"music": {**music, "required_ram_mb": NEVER_MB}, "video": video}},
    }


# Package scope: the shared nodes (and node a's llama-server) end with the cluster tests,
# so no later test finds their processes among this session's children.
@pytest.fixture(scope="package")
def pair(
    postgres: Any,
    tiny_pipelines: dict[str, Path],
    tiny_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Nodes ``a`` and ``b`` on one database, started once for every test that needs two
    live nodes and kills neither."""
    c = make_cluster(postgres, tiny_pipelines, tmp_path_factory.mktemp("shared"), "shared")
    try:
        c.start_many(shared_configs(tiny_dir, tiny_pipelines))
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def shared(pair: Cluster) -> Cluster:
    """The shared nodes, alive and ready, nothing queued or running, no hold, no run
    markers left from an earlier test."""
    pair.hold.unlink(missing_ok=True)
    for node in pair.nodes.values():
        assert node.alive, f"shared node {node.name} died: {node.log.read_text()[-3000:]}"
        pair.wait_ready(node)
    wait_until(pair.idle, timeout=120, interval=0.2, what="the shared queue empty")
    for marker in pair.runs.glob("*"):
        marker.unlink()
    return pair
