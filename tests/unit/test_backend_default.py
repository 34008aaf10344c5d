"""models.backend defaults to `auto`: llama-server where its binary is present, else
llama-cpp-python, said in the log and in /system/memory."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.settings import AutoFacts, Settings, decide_auto_backend


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def settings_with(binary: Path, **models) -> Settings:
    return Settings(models={"llama_server_binary": str(binary), **models})


def test_auto_is_llama_server_where_its_binary_is(tmp_path: Path, monkeypatch) -> None:
    import services.settings as settings_module

    monkeypatch.setattr(settings_module, "gpus_visible", lambda: False)  # also on a GPU host
    s = settings_with(executable(tmp_path / "bin" / "llama-server"), fast={"path": "x.gguf"})
    choice = s.models.backend_choice()
    assert (choice.configured, choice.backend, choice.fallback) == ("auto", "llama-server", False)
    assert s.models.backend_of(s.models.fast) == "llama-server"
    assert s.models.parallel_of(s.models.fast) == 4


@pytest.mark.parametrize("make", ["absent", "not executable"])
def test_auto_falls_back_to_llama_cpp_python(tmp_path: Path, make: str) -> None:
    binary = tmp_path / "bin" / "llama-server"
    if make == "not executable":
        binary.parent.mkdir()
        binary.write_text("")
    s = settings_with(binary, fast={"path": "x.gguf"})
    choice = s.models.backend_choice()
    assert (choice.backend, choice.fallback) == ("llama-cpp-python", True)
    assert str(binary) in choice.because
    assert s.models.backend_of(s.models.fast) == "llama-cpp-python"
    assert s.models.parallel_of(s.models.fast) == 1


def test_a_configured_backend_is_kept(tmp_path: Path) -> None:
    s = settings_with(tmp_path / "absent", backend="llama-server")
    assert s.models.backend_choice().backend == "llama-server"  # its tiers fail, with why
    s = settings_with(executable(tmp_path / "llama-server"), backend="llama-cpp-python")
    assert s.models.backend_choice().backend == "llama-cpp-python"


def test_the_fallback_is_logged_and_shown(
    make_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(models={"llama_server_binary": str(tmp_path / "absent")})
    with caplog.at_level(logging.WARNING, "edison.models"):
        with TestClient(create_app(settings)) as client:
            shown = client.get("/system/memory").json()["llm_backend"]
    assert shown["configured"] == "auto" and shown["backend"] == "llama-cpp-python"
    assert shown["fallback"] is True and "no llama-server binary" in shown["because"]
    assert any("LLM backend: llama-cpp-python" in r.message for r in caplog.records)


# ---- auto on a GPU host: decision logic given facts (no GPU exists on this machine) ----
B = Path("/opt/llama-server")


@pytest.mark.parametrize(
    ("facts", "backend", "fallback", "words"),
    [
        (AutoFacts(B, gpu_visible=False), "llama-server", False, "no GPU visible"),
        (AutoFacts(B, True, server_gpu=True), "llama-server", False, "offloading to the GPU"),
        (AutoFacts(B, True, False, python_gpu=True), "llama-cpp-python", True, "lists no GPU"),
        (AutoFacts(B, True, False, True, "deep"), "llama-server", False, "models.deep.parallel"),
        (AutoFacts(B, True, False, False), "llama-server", False, "neither"),
    ],
)
def test_auto_on_a_gpu_host_prefers_a_build_that_offloads(facts, backend, fallback, words):
    got, because, fell_back = decide_auto_backend(facts)
    assert (got, fell_back) == (backend, fallback)
    assert words in because and str(B) in because


def test_auto_probes_the_builds_only_on_a_gpu_host(tmp_path: Path, monkeypatch) -> None:
    """The GPU is faked (NVML's count and the builds' answers): the probing and the
    settings' use of the decision are real."""
    import services.llm.backend_llama_server as server
    import services.settings as settings_module

    binary = executable(tmp_path / "bin" / "llama-server")
    asked: list[str] = []

    def cpu_build(path):
        asked.append("server")
        return server.ServerBinary(str(path), True, "1", devices=[])

    def python_offloads() -> bool:
        asked.append("python")
        return True

    monkeypatch.setattr(server, "inspect_binary", cpu_build)
    monkeypatch.setattr(settings_module, "python_gpu_offload", python_offloads)
    monkeypatch.setattr(settings_module, "gpus_visible", lambda: False)
    s = settings_with(binary, fast={"path": "x.gguf"})
    assert s.models.backend_choice().backend == "llama-server" and asked == []
    monkeypatch.setattr(settings_module, "gpus_visible", lambda: True)
    s = settings_with(binary, fast={"path": "x.gguf"})
    choice = s.models.backend_choice()
    assert (choice.backend, choice.fallback) == ("llama-cpp-python", True)
    assert asked == ["server", "python"]
    assert s.models.parallel_of(s.models.fast) == 1  # llama-cpp-python: one at a time
    # A tier that asks for slots keeps llama-server (its config stays valid).
    s = settings_with(binary, fast={"path": "x.gguf", "parallel": 2})
    assert s.models.backend_choice().backend == "llama-server"


def test_on_this_machine_auto_says_no_gpu_is_visible(llama_server_bin: Path) -> None:
    """The real binary `make install` builds, on a host with no GPU."""
    s = settings_with(llama_server_bin)
    choice = s.models.backend_choice()
    assert choice.backend == "llama-server" and "no GPU visible" in choice.because
