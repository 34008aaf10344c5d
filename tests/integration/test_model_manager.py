"""ModelManager with real llama.cpp workers on tiny GGUF models, on the CPU (tests
taking the ``backend`` fixture run on llama_cpp.server and on llama-server)."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from services.errors import ModelLoadFailed, UnknownTier
from services.llm.manager import ModelManager
from services.memory.gguf_estimate import InvalidModelFile
from services.memory.ledger import MemoryLedger
from services.memory.placement import Placement
from services.memory.probe import MemoryProbe
from tests.helpers import until

pytestmark = pytest.mark.anyio


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def manager_for(settings, **kw) -> ModelManager:
    probe = MemoryProbe(timeout_s=5)
    ledger = MemoryLedger(
        reserve_vram_mb=settings.memory.reserve_vram_mb,
        reserve_ram_mb=settings.memory.reserve_ram_mb,
    )
    return ModelManager(settings, Placement(settings, probe, ledger), **kw)


def tiers(tiny_dir: Path, *names: str, backend: str = "llama-cpp-python", **overrides) -> dict:
    out = {n: {"path": str(tiny_dir / f"{n}.gguf"), "n_ctx": 256, "preload": False} for n in names}
    for name, extra in overrides.items():
        out[name] = {**out.get(name, {}), **extra}
    return {**out, "n_threads": 1, "load_timeout_s": 60, "backend": backend}


async def test_load_then_unload_ends_the_process(make_settings, tiny_dir, backend) -> None:
    mm = manager_for(make_settings(models=tiers(tiny_dir, "fast", backend=backend)))
    model = await mm.load("fast")
    try:
        assert psutil.pid_exists(model.pid)
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{model.base_url}/v1/models")
        assert r.status_code == 200
        assert model.n_ctx == 256 and model.rung == 0
        assert model.backend == backend
        # llama-server: 4 slots of 64 tokens, each padded to 256 (and capped at the
        # trained 256); llama_cpp.server: one request, the whole context.
        assert (model.parallel, model.slot_ctx) == (
            (4, 256) if backend == "llama-server" else (1, 256)
        )
        assert model.rss_mb and model.rss_mb > 0
        assert [r.owner for r in mm.ledger.entries()] == ["model:fast"]
    finally:
        out = await mm.unload("fast")
    assert out.unloaded == ["fast"]
    assert out.held_mb > 0
    assert gone(model.pid)
    assert mm.ledger.entries() == []
    assert mm.tiers["fast"].status == "unloaded"
    assert (mm.tiers["fast"].loads, mm.tiers["fast"].unloads) == (1, 1)
    assert out.settling is False  # a CPU worker's memory is back when its process ends


async def test_heavy_slot_holds_one_model(make_settings, tiny_dir) -> None:
    mm = manager_for(make_settings(models=tiers(tiny_dir, "fast", "medium", "deep")))
    try:
        fast = await mm.load("fast")
        medium = await mm.load("medium")
        assert mm.heavy_slot == "medium"
        deep = await mm.load("deep")
        assert mm.heavy_slot == "deep"
        assert gone(medium.pid)
        assert psutil.pid_exists(fast.pid) and psutil.pid_exists(deep.pid)
        assert sorted(m.key for m in mm.loaded_models()) == ["deep", "fast"]
        assert {r.owner for r in mm.ledger.entries()} == {"model:fast", "model:deep"}
    finally:
        await mm.unload_all()
    assert gone(fast.pid) and gone(deep.pid)


def oom_wrapper(tmp_path: Path, max_ctx: int) -> str:
    """A python that fails like a CUDA OOM when asked for a context above max_ctx.

    A test double for what cannot happen on this CPU-only machine (a GPU running out of
    memory at a given rung); below the limit it runs the real llama_cpp.server.
    """
    exe = tmp_path / "python-oom"
    exe.write_text(
        "#!/bin/sh\n"
        'ctx=0; prev=""\n'
        'for a in "$@"; do [ "$prev" = "--n_ctx" ] && ctx=$a; prev=$a; done\n'
        f'if [ "$ctx" -gt {max_ctx} ]; then\n'
        '  echo "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 512.00 MiB on device 0: '
        'cudaMalloc failed: out of memory" >&2\n'
        '  echo "ValueError: Failed to create llama_context" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


async def test_ladder_walks_down_past_a_failing_rung(make_settings, tiny_dir, tmp_path) -> None:
    settings = make_settings(
        models=tiers(tiny_dir, "fast"), ladder={"gpu_layers": [0], "context": [128, 64]}
    )
    mm = manager_for(settings, python=oom_wrapper(tmp_path, max_ctx=128))
    try:
        model = await mm.load("fast")
        attempts = mm.tiers["fast"].attempts
        assert [(a.n_ctx, a.ok) for a in attempts] == [(256, False), (128, True)]
        assert "out of memory" in attempts[0].reason
        assert model.rung == 1 and model.n_ctx == 128
    finally:
        await mm.unload_all()


async def test_every_rung_failing_reports_each_attempt(make_settings, tiny_dir, tmp_path) -> None:
    settings = make_settings(
        models=tiers(tiny_dir, "fast"), ladder={"gpu_layers": [0], "context": [128]}
    )
    mm = manager_for(settings, python=oom_wrapper(tmp_path, max_ctx=64))
    with pytest.raises(ModelLoadFailed) as err:
        await mm.load("fast")
    assert len(err.value.details["attempts"]) == 2
    assert mm.tiers["fast"].status == "failed"
    assert "out of memory" in mm.tiers["fast"].last_error
    assert mm.ledger.entries() == []


async def test_bad_files_fail_without_the_ladder_and_others_serve(
    make_settings, tiny_dir, tmp_path
) -> None:
    notgguf = tmp_path / "medium.gguf"
    notgguf.write_text("not a model")
    vanishing = tmp_path / "deep.gguf"
    vanishing.write_bytes((tiny_dir / "deep.gguf").read_bytes())
    settings = make_settings(
        models=tiers(tiny_dir, "fast", medium={"path": str(notgguf)}, deep={"path": str(vanishing)})
    )
    vanishing.unlink()
    mm = manager_for(settings)
    try:
        with pytest.raises(InvalidModelFile):
            await mm.load("medium")
        with pytest.raises(InvalidModelFile):
            await mm.load("deep")
        assert mm.tiers["medium"].status == "failed"
        assert len(mm.tiers["medium"].attempts) == 1  # the header check, no worker started
        fast = await mm.load("fast")
        assert fast.worker.alive
    finally:
        await mm.unload_all()


async def test_killed_worker_is_noticed_and_reloaded(make_settings, tiny_dir, backend) -> None:
    mm = manager_for(make_settings(models=tiers(tiny_dir, "fast", backend=backend)))
    try:
        first = await mm.load("fast")
        os.kill(first.pid, signal.SIGKILL)
        await until(lambda: mm.tiers["fast"].model is None, what="the death noticed")
        assert mm.tiers["fast"].status == "unloaded"
        assert "-9" in mm.tiers["fast"].last_error
        assert mm.ledger.entries() == []
        res = await mm.resolve("fast")
        assert res.model.pid != first.pid and res.model.worker.alive
    finally:
        await mm.unload_all()


async def test_same_file_context_and_layers_load_once(make_settings, tiny_dir) -> None:
    same = str(tiny_dir / "medium.gguf")
    mm = manager_for(
        make_settings(models=tiers(tiny_dir, medium={"path": same}, deep={"path": same}))
    )
    try:
        medium = await mm.load("medium")
        deep = await mm.load("deep")
        assert deep is medium
        assert mm.tiers["deep"].alias_of == "medium"
        assert len(mm.loaded_models()) == 1 and len(mm.ledger.entries()) == 1
    finally:
        await mm.unload_all()


async def test_the_same_file_on_another_backend_is_another_worker(
    make_settings, tiny_dir, llama_server_bin
) -> None:
    same = str(tiny_dir / "medium.gguf")
    deep = {"path": same, "backend": "llama-server"}
    mm = manager_for(make_settings(models=tiers(tiny_dir, medium={"path": same}, deep=deep)))
    try:
        medium = await mm.load("medium")
        other = await mm.load("deep")  # the heavy slot: medium's worker ends, deep's starts
        assert other is not medium and other.backend == "llama-server"
        assert mm.tiers["deep"].alias_of is None
    finally:
        await mm.unload_all()


async def test_resolve_falls_back_down_the_chain(make_settings, tiny_dir, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    mm = manager_for(
        make_settings(models=tiers(tiny_dir, "fast", "medium", reasoning={"path": str(broken)}))
    )
    try:
        res = await mm.resolve("reasoning")
        assert res.requested == "reasoning" and res.tier == "medium"
        assert "reasoning:" in res.fallback_reason and "deep: not configured" in res.fallback_reason
        with pytest.raises(UnknownTier) as err:
            await mm.resolve("gigantic")
        assert err.value.details["tiers"] == ["fast", "medium", "reasoning"]
    finally:
        await mm.unload_all()


async def test_eager_loader_respects_preload_and_the_heavy_slot(make_settings, tiny_dir) -> None:
    models = tiers(
        tiny_dir, "fast", "medium", "deep", "reasoning",
        fast={"preload": True}, medium={"preload": True}, deep={"preload": True},
    )  # fmt: skip
    mm = manager_for(make_settings(models=models))
    try:
        outcome = await mm.load_llm_models()
        assert {e.tier: e.outcome for e in outcome} == {
            "fast": "loaded",
            "medium": "loaded",
            "deep": "skipped: heavy slot holds medium",
            "reasoning": "on demand",
        }
        assert mm.heavy_slot == "medium"
    finally:
        await mm.unload_all()


async def test_idle_heavy_model_is_unloaded_fast_stays(make_settings, tiny_dir) -> None:
    models = {**tiers(tiny_dir, "fast", "medium"), "heavy_keep_alive_s": 0.5}
    mm = manager_for(make_settings(models=models))
    await mm.start()
    try:
        medium = await mm.load("medium")
        fast = await mm.load("fast")
        await until(lambda: mm.tiers["medium"].model is None, what="idle medium unloaded")
        assert gone(medium.pid)
        assert mm.tiers["fast"].model is fast and fast.worker.alive
    finally:
        await mm.shutdown()


async def test_worker_not_ready_in_time_is_killed(make_settings, tiny_dir, backend) -> None:
    models = {**tiers(tiny_dir, "fast", backend=backend), "load_timeout_s": 0.01}
    mm = manager_for(make_settings(models=models, ladder={"gpu_layers": [0], "context": [128]}))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ModelLoadFailed):
        await mm.load("fast")
    attempts = mm.tiers["fast"].attempts
    # A timeout is not a want of memory: a smaller rung would wait as long again.
    assert len(attempts) == 1 and attempts[0].failure == "timeout"
    assert "not ready within" in attempts[0].reason
    assert not [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before
        and any(w in " ".join(p.cmdline()) for w in ("llama_cpp", "llama-server"))
    ]


async def test_a_broken_llama_server_binary_fails_its_tier_and_others_serve(
    make_settings, tiny_dir, tmp_path
) -> None:
    """medium runs on a llama-server that is not there: it fails once, with that reason
    (no rung walk: another rung cannot bring a binary), and falls back to fast."""
    models = tiers(tiny_dir, "fast", "medium", medium={"backend": "llama-server"})
    models["llama_server_binary"] = str(tmp_path / "absent" / "llama-server")
    mm = manager_for(make_settings(models=models))
    try:
        with pytest.raises(ModelLoadFailed):
            await mm.load("medium")
        medium = mm.tiers["medium"]
        assert medium.status == "failed" and len(medium.attempts) == 1
        assert "llama-server binary not found" in medium.last_error
        assert str(tmp_path / "absent" / "llama-server") in medium.last_error
        res = await mm.resolve("medium")
        assert res.tier == "fast" and "llama-server binary not found" in res.fallback_reason
        assert res.model.backend == "llama-cpp-python" and res.model.worker.alive
    finally:
        await mm.unload_all()
