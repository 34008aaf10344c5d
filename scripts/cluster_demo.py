"""`make cluster-demo`: a private PostgreSQL in var/cluster (Debian's package) and two Edison
nodes on 127.0.0.1:8001 and :8002 serving config/demo.yaml with a `cluster` section.
Ctrl-C (or SIGTERM) stops both nodes and the database."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cluster.localdb import LocalPostgres  # noqa: E402

PORTS = {"node-a": 8001, "node-b": 8002}


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C, and a `kill` (SIGTERM) or an inherited ignored SIGINT, all stop everything.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    var = ROOT / "var" / "cluster"
    pg = LocalPostgres(var / "postgres", 55432)
    pg.start()
    print(f"PostgreSQL: {pg.url}")
    base = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    procs = []
    for name, port in PORTS.items():
        cfg = dict(base)
        cfg["server"] = {**base["server"], "port": port, "outputs_dir": str(var / name / "outputs")}
        cfg["memory"] = {**base["memory"], "state_dir": str(var / name / "state")}
        cfg["cluster"] = {
            "database_url": pg.url,
            "node_name": name,
            "public_url": f"http://127.0.0.1:{port}",
        }
        path = var / f"{name}.yaml"
        text = yaml.safe_dump(cfg).replace("../var/", str(ROOT / "var") + "/")
        path.write_text(text)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--config", str(path)], cwd=ROOT
            )
        )
        print(f"{name}: http://127.0.0.1:{port} (config {path})")
    print("Try: curl -s localhost:8001/system/cluster; Ctrl-C stops everything")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
