"""models.backend defaults to `auto`: llama-server where its binary is present, else
llama-cpp-python, said in the log and in /system/memory."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.settings import Settings


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def settings_with(binary: Path, **models) -> Settings:
    return Settings(models={"llama_server_binary": str(binary), **models})


def test_auto_is_llama_server_where_its_binary_is(tmp_path: Path) -> None:
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
