"""The load ladder walks on only for failures for want of memory, and its walk does not
hold the lock unloads take. Real llama.cpp workers on tiny GGUFs, on the CPU."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import anyio
import pytest

from services.errors import ModelLoadFailed
from services.llm.manager import ModelManager
from services.memory.placement import Placement, ledger_for
from services.memory.probe import MemoryProbe

pytestmark = pytest.mark.anyio


def manager_for(settings, **kw) -> ModelManager:
    return ModelManager(
        settings, Placement(settings, MemoryProbe(timeout_s=5), ledger_for(settings)), **kw
    )


def write_unknown_architecture(path: Path) -> Path:
    """A well-formed GGUF whose ``general.architecture`` no llama.cpp knows ("edisonnet"):
    every key and tensor a llama-style header has, so Edison's own header check passes and
    only the worker can say no."""
    import gguf
    import numpy as np

    n_embd, n_vocab, n_layer = 32, 300, 2
    w = gguf.GGUFWriter(str(path), "edisonnet")
    w.add_context_length(1024)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd)).astype(np.float16))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


async def test_an_unknown_architecture_fails_in_one_worker_start(
    make_settings, tmp_path: Path
) -> None:
    model = write_unknown_architecture(tmp_path / "edisonnet.gguf")
    settings = make_settings(
        models={"fast": {"path": str(model), "n_ctx": 1024, "preload": False}, "n_threads": 1},
        # Three rungs on the CPU (1024, 512, 256): a walk would start three workers.
        ladder={"gpu_layers": [0], "context": [512, 256]},
    )
    mm = manager_for(settings)
    with pytest.raises(ModelLoadFailed) as err:
        await mm.load("fast")
    attempts = mm.tiers["fast"].attempts
    assert len(attempts) == 1
    assert attempts[0].failure == "model" and attempts[0].ms > 0  # a worker did start
    assert "edisonnet" in attempts[0].reason
    assert err.value.details["failure"] == "model"
    assert "smaller rungs not tried" in err.value.message
    assert mm.tiers["fast"].status == "failed"
    assert mm.ledger.entries() == []


def held_python(tmp_path: Path, model: str, flag: Path) -> str:
    """A python that starts the worker for ``model`` only once ``flag`` exists (a load
    held in flight until the test lets it go); other workers start at once."""
    exe = tmp_path / "python-held"
    exe.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *{model}*) while [ ! -e "{flag}" ]; do sleep 0.02; done;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


async def test_an_unload_does_not_wait_for_another_tiers_load(
    make_settings, tiny_dir: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "go"
    settings = make_settings(
        models={
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256, "preload": False},
            "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256, "preload": False},
            "n_threads": 1,
            "backend": "llama-cpp-python",  # the held python starts this backend's workers
        }
    )
    mm = manager_for(settings, python=held_python(tmp_path, "medium.gguf", flag))
    try:
        fast = await mm.load("fast")
        async with anyio.create_task_group() as tg:
            tg.start_soon(mm.load, "medium")
            with anyio.fail_after(30):
                while mm.tiers["medium"].status != "loading":
                    await anyio.sleep(0.01)
            # medium's worker is held before it even runs: its load is in flight.
            with anyio.fail_after(20):
                out = await mm.unload("fast")
            assert out.unloaded == ["fast"] and not fast.worker.alive
            assert mm.tiers["medium"].status == "loading"
            flag.touch()
        assert mm.tiers["medium"].status == "loaded"
    finally:
        flag.touch()
        await mm.unload_all()
