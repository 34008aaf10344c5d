"""Many hosts on loopback: two `edison serve` nodes on one private PostgreSQL (Debian's
package, started here in a temporary folder), the tiny image pipeline really running.

Measured, all in one run:

- **enqueue-to-start**: jobs posted one at a time (alternating the node that takes the
  request) to an idle cluster; the time from the engine's `deferred` event to its
  `started` event (both stamped by the database's clock), p50 and p95;
- **death to restart**: a long job running, its node killed with SIGKILL; the time from
  the kill to the job's next `started` event on the other node (the sweep waits
  `cluster.heartbeat_timeout_s`; both nodes use the defaults unless told otherwise); the
  killed node is started again between kills;
- **throughput**: N tiny image jobs (64x64, 2 steps) posted at once to one node, with one
  node alive against two; wall time from the first post to the last success, and the
  ratio one/two.

Each node runs torch on one thread (OMP_NUM_THREADS=1), so each has one of this
machine's 2 cores to itself as far as the other lets it: the two nodes share the CPU,
so the throughput ratio is at most about 2 and is what to read, not the absolute times.

    .venv/bin/python bench/cluster.py [--starts 30] [--kills 3] [--jobs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import ROOT, free_port, pct  # noqa: E402
from services.cluster.localdb import LocalPostgres  # noqa: E402
from services.demo.tiny_pipelines import write_tiny_pipeline  # noqa: E402

ASYNC = {"Prefer": "respond-async"}


@dataclass
class Node:
    name: str
    port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        log = self.config.with_suffix(".log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(self.config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.config.with_suffix('.log')}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in 300 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def node_config(root: Path, name: str, pg: LocalPostgres, pipeline: Path, **cluster: Any) -> Node:
    port = free_port()
    cfg = {
        "server": {
            "port": port,
            "outputs_dir": str(root / name / "outputs"),
            "log_level": "warning",
        },
        "memory": {"reserve_ram_mb": 0, "state_dir": str(root / name / "state")},
        "generation": {
            "image": {
                "pipeline": str(pipeline),
                "required_ram_mb": 64,
                "default_steps": 2,
                "max_steps": 1000,
                "max_pixels": 65536,
                "preload": True,
            }
        },
        "cluster": {
            "database_url": pg.url,
            "node_name": name,
            "public_url": f"http://127.0.0.1:{port}",
            **cluster,
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Node(name, port, path)


def post(node: Node, prompt: str, steps: int = 2) -> str:
    body = {"prompt": prompt, "width": 64, "height": 64, "steps": steps, "seed": 1}
    r = httpx.post(f"{node.url}/generate-image", json=body, headers=ASYNC, timeout=60)
    r.raise_for_status()
    return r.json()["job_id"]


def view(node: Node, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{node.url}/jobs/{job_id}", timeout=60)
    r.raise_for_status()
    return r.json()


def wait_for(check: Any, timeout: float = 300, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise RuntimeError(f"not reached in {timeout} s: {check}")


def sql(pg: LocalPostgres, statement: str) -> list[list[str]]:
    return [line.split("|") for line in pg.psql(statement).splitlines() if line]


def event_times(pg: LocalPostgres, edison_id: str, kind: str) -> list[float]:
    """The engine's events of ``kind`` for one job, as epoch seconds, oldest first."""
    rows = sql(
        pg,
        "SELECT extract(epoch FROM ev.at) FROM procrastinate_events ev "
        "JOIN edison_jobs e ON e.procrastinate_id = ev.job_id "
        f"WHERE e.id = '{edison_id}' AND ev.type = '{kind}' ORDER BY ev.at",
    )
    return [float(r[0]) for r in rows]


def enqueue_to_start(pg: LocalPostgres, nodes: list[Node], n: int) -> list[float]:
    out = []
    for i in range(n):
        front = nodes[i % len(nodes)]
        job_id = post(front, f"start {i}")
        wait_for(lambda j=job_id, f=front: view(f, j)["status"] == "succeeded")
        deferred, started = event_times(pg, job_id, "deferred"), event_times(pg, job_id, "started")
        out.append((started[0] - deferred[0]) * 1000)
    return out


def death_to_restart(pg: LocalPostgres, nodes: list[Node], kills: int) -> list[float]:
    out = []
    for i in range(kills):
        job_id = post(nodes[0], f"long {i}", steps=400)
        first = wait_for(lambda j=job_id: (v := view(nodes[0], j))["progress"]["done"] > 0 and v)
        victim = next(n for n in nodes if n.name == first["node"])
        survivor = next(n for n in nodes if n is not victim)
        killed_at = time.time()
        victim.stop(signal.SIGKILL)
        wait_for(lambda j=job_id: len(event_times(pg, j, "started")) >= 2, every=0.2)
        out.append(event_times(pg, job_id, "started")[1] - killed_at)
        done = wait_for(
            lambda j=job_id, s=survivor: (v := view(s, j))["status"] == "succeeded" and v
        )
        assert done["attempts"] == 2 and done["node"] == survivor.name, done
        victim.start()
        victim.wait_ready()
    return out


def throughput(nodes: list[Node], n: int) -> float:
    front = nodes[0]
    t0 = time.perf_counter()
    ids = [post(front, f"burst {i}") for i in range(n)]
    for job_id in ids:
        wait_for(lambda j=job_id: view(front, j)["status"] == "succeeded", every=0.1)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=30, help="jobs for enqueue-to-start")
    ap.add_argument("--kills", type=int, default=3, help="node deaths")
    ap.add_argument("--jobs", type=int, default=20, help="jobs per throughput arm")
    ap.add_argument("--heartbeat-s", type=float, default=None, help="cluster.heartbeat_s")
    ap.add_argument("--timeout-s", type=float, default=None, help="cluster.heartbeat_timeout_s")
    args = ap.parse_args()
    cluster: dict[str, float] = {}
    if args.heartbeat_s is not None:
        cluster["heartbeat_s"] = cluster["sweep_every_s"] = args.heartbeat_s
    if args.timeout_s is not None:
        cluster["heartbeat_timeout_s"] = args.timeout_s

    root = Path(tempfile.mkdtemp(prefix="edison-bench-cluster-"))
    pg = LocalPostgres(root / "pg", free_port())
    nodes: list[Node] = []
    try:
        pg.start()
        pipeline = write_tiny_pipeline("image", root / "image")
        nodes = [node_config(root, n, pg, pipeline, **cluster) for n in ("a", "b")]
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        settings = cluster or "defaults (heartbeat 2 s, timeout 10 s, sweep every 2 s)"
        print(f"two nodes on {pg.url}; cluster settings: {settings}")

        starts = enqueue_to_start(pg, nodes, args.starts)
        p50, p95 = statistics.median(starts), pct(starts, 95)
        print(f"enqueue-to-start, {len(starts)} jobs: p50 {p50:.1f} ms, p95 {p95:.1f} ms")

        restarts = death_to_restart(pg, nodes, args.kills)
        print(
            "death to restart, "
            + ", ".join(f"{s:.2f} s" for s in restarts)
            + f" (median {statistics.median(restarts):.2f} s)"
        )

        two = throughput(nodes, args.jobs)
        nodes[1].stop()
        one = throughput(nodes[:1], args.jobs)
        print(
            f"throughput, {args.jobs} jobs: one node {one:.2f} s ({args.jobs / one:.2f} jobs/s), "
            f"two nodes {two:.2f} s ({args.jobs / two:.2f} jobs/s); one/two wall time "
            f"{one / two:.2f}x (both nodes share this machine's 2 CPU cores)"
        )
    finally:
        for node in nodes:
            node.stop()
        pg.stop("immediate")
        pg.wait_stopped()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
