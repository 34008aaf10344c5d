"""Without a `cluster` section nothing of the cluster is imported; with an unreachable
database `edison serve` stops at once, naming cluster.database_url, with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_one_host_without_a_cluster_section_imports_no_database_client(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from services.settings import Settings\n"
        f"s = Settings(server={{'outputs_dir': {str(tmp_path / 'o')!r}}},"
        f" memory={{'state_dir': {str(tmp_path / 's')!r}}})\n"
        "with TestClient(create_app(s)) as c:\n"
        "    assert c.get('/health').status_code == 200\n"
        "    assert c.get('/system/cluster').status_code == 404\n"
        "db = ('procrastinate', 'psycopg', 'psycopg_pool')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in db"
        " or m.startswith('services.cluster.') and m != 'services.cluster.config']\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED []" in out.stdout, out.stdout


def test_an_unreachable_database_at_start_exits_2_naming_the_key(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    cfg = tmp_path / "edison.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "server": {"outputs_dir": str(tmp_path / "o")},
                "memory": {"state_dir": str(tmp_path / "s")},
                "cluster": {
                    "database_url": f"postgresql://edison@127.0.0.1:{port}/edison",
                    "node_name": "a",
                    "public_url": "http://127.0.0.1:1",
                    "connect_timeout_s": 2,
                },
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cluster.database_url" in out.stderr and str(port) in out.stderr


def test_the_compose_file_matches_the_dockerfile_and_the_cluster_settings() -> None:
    """compose.yaml: a postgres service and two nodes built from the Dockerfile, whose
    environment overrides make valid, distinct `cluster` sections pointing at it."""
    from services.cluster.config import ClusterSettings

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    services = compose["services"]
    assert "postgres" in services and "healthcheck" in services["postgres"]
    nodes = {k: v for k, v in services.items() if k != "postgres"}
    assert len(nodes) == 2
    exposed = dockerfile.split("\nEXPOSE ")[1].split()[0]
    config_in_image = dockerfile.split("EDISON_CONFIG=")[1].split()[0]
    names = set()
    for name, svc in nodes.items():
        assert svc["build"] == "." and svc["depends_on"]["postgres"]["condition"] == (
            "service_healthy"
        )
        assert any(v.endswith(f":{config_in_image}:ro") for v in svc["volumes"])
        env = {
            k.removeprefix("EDISON__CLUSTER__").lower(): v.replace(
                "${EDISON_DB_PASSWORD:-change-me}", "pw"
            )
            for k, v in svc["environment"].items()
            if k.startswith("EDISON__CLUSTER__")
        }
        cfg = ClusterSettings(**env)
        assert cfg.public_url == f"http://{name}:{exposed}"  # how the other node reaches it
        assert "@postgres:5432/" in cfg.database_url
        assert any(p.endswith(f":{exposed}") for p in svc["ports"])
        names.add(cfg.node_name)
    assert len(names) == 2
