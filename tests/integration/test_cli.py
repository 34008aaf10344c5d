"""The `edison` command: doctor, make-demo and a refused config, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def edison(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_doctor_reports_every_probe_step_and_the_builds() -> None:
    out = edison("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    steps = report["probe"]["steps"]
    assert list(steps) == ["nvml", "torch", "nvidia-smi"]
    answered = report["probe"]["answered"]
    assert answered == report["snapshot"]["vram_source"]
    if answered == "none":
        assert all(s["ok"] is False and s["reason"] for s in steps.values())
    assert report["torch"]["installed"] is True
    assert isinstance(report["llama_cpp"]["gpu_offload"], bool)
    # Both worker backends: the llama-server binary `make install` builds, its version.
    server = report["llama_server"]
    assert server["path"].endswith("bin/llama-server")
    if server["usable"]:
        assert server["version"] and "version" not in server["version"]
        assert isinstance(server["gpu_offload"], bool)
    else:
        assert "llama-server" in server["reason"]
    # models.backend auto: llama-server where its binary is, else llama-cpp-python.
    assert report["backends"]["default"] == (
        "llama-server" if server["usable"] else "llama-cpp-python"
    )
    text = edison("doctor")
    assert "Probe ladder:" in text.stdout and "llama-cpp-python" in text.stdout
    assert "llama-server" in text.stdout and "Worker backend:" in text.stdout


def test_make_demo_writes_what_the_demo_config_needs(tmp_path: Path) -> None:
    out = edison("make-demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    for tier in ("fast", "medium", "deep", "reasoning"):
        assert (tmp_path / "demo" / f"{tier}.gguf").stat().st_size > 1000
    for kind in ("image", "video", "music"):
        assert (tmp_path / "demo" / "pipelines" / kind / "model_index.json").is_file()
    again = edison("make-demo", "--out", str(tmp_path / "demo"))
    assert "already present" in again.stdout


def test_cli_refuses_bad_config_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "edison.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": 70000}}))
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "EDISON_CONFIG": ""},
        timeout=120,
    )
    assert out.returncode == 2
    assert "server.port" in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr


def test_the_llama_server_build_does_nothing_when_current(llama_server_bin: Path) -> None:
    """`make install` runs scripts/build_llama_server.sh every time: with the binary built
    from this llama-cpp-python and these flags, it must not touch it."""
    stamp = llama_server_bin.with_name("llama-server.build")
    before = llama_server_bin.stat().st_mtime_ns, stamp.read_text()
    out = subprocess.run(
        ["scripts/build_llama_server.sh", str(Path(sys.executable).parent.parent)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    assert (llama_server_bin.stat().st_mtime_ns, stamp.read_text()) == before
    assert stamp.read_text().startswith("llama-cpp-python==0.3.36 ")
