"""LlamaWorker against a real ``llama_cpp.server`` child serving a tiny model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import httpx
import psutil
import pytest

from services import llama_worker
from services.errors import ModelLoadFailed
from services.llama_worker import (
    LlamaWorker,
    WorkerSpec,
    WorkerStartFailed,
    build_command,
    child_env,
    extract_reason,
    wait_gpu_memory_released,
)
from services.memory_probe import MemoryProbe
from services.tiny_gguf import write_tiny_gguf

START_S = 60  # generous: the tiny model is ready in about half a second
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("w") / "tiny.gguf")


@pytest.fixture
def truncated(tiny: Path, tmp_path: Path) -> Path:
    """The tiny model cut in the middle of its tensors."""
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny.read_bytes()[:100_000])
    return path


def spec(path: Path, key: str = "tiny", **kw) -> WorkerSpec:
    return WorkerSpec(key=key, model_path=path, n_gpu_layers=0, n_ctx=256, n_threads=1, **kw)


def gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=30)


@pytest.mark.anyio
async def test_start_serve_chat_and_stop(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both would change the child if they leaked into it: PORT overrides --port in
    # llama_cpp.server, API_KEY would make every request answer 401.
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("API_KEY", "not-for-the-worker")
    exits: list[int] = []
    w = LlamaWorker(spec(tiny), on_exit=lambda _w, rc: exits.append(rc))
    await w.start(START_S)
    try:
        assert w.alive and w.pid is not None and w.returncode is None
        assert w.base_url == f"http://127.0.0.1:{w.port}"
        assert w.ready_ms > 0 and w.started_at > 0
        async with client() as c:
            models = (await c.get(f"{w.base_url}/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["tiny"]
            r = await c.post(
                f"{w.base_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
            )
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 5
        tail = w.stderr_tail(1000)
        assert f"Uvicorn running on http://127.0.0.1:{w.port}" in tail
        assert len(tail.splitlines()) == llama_worker.TAIL_LINES  # bounded: ~300 lines came
        assert len(w.stderr_tail(3).splitlines()) == 3
    finally:
        rc = await w.stop()
    assert rc is not None and not w.alive
    assert gone(w.pid)
    assert await w.stop() == rc  # idempotent
    assert exits == []  # a stop is not an unexpected exit


@pytest.mark.anyio
async def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    w = LlamaWorker(spec(missing))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(START_S)
    e = err.value
    assert str(missing) in e.reason
    assert e.returncode == 1
    assert e.missing_file and not e.timed_out
    assert "Traceback" in e.stderr_tail
    assert isinstance(e, ModelLoadFailed) and e.details["returncode"] == 1
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_truncated_model_fails_with_llama_cpp_s_reason(truncated: Path) -> None:
    w = LlamaWorker(spec(truncated))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(START_S)
    e = err.value
    assert e.returncode == 1 and not e.missing_file and not e.timed_out
    # The reason is llama.cpp's own line from stderr, not only Python's generic error.
    cause = e.reason.split(" (ValueError")[0]
    assert "error loading model" in cause and "blk." in cause
    assert cause in e.stderr_tail
    assert "Failed to load model from file" in e.reason
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_killed_worker_calls_on_exit(tiny: Path) -> None:
    exited = asyncio.Event()
    codes: list[int] = []

    def on_exit(worker: LlamaWorker, rc: int) -> None:
        assert worker is w
        codes.append(rc)
        exited.set()

    w = LlamaWorker(spec(tiny), on_exit=on_exit)
    await w.start(START_S)
    os.kill(w.pid, signal.SIGKILL)
    await asyncio.wait_for(exited.wait(), 30)
    assert codes == [-signal.SIGKILL]
    assert not w.alive and w.returncode == -signal.SIGKILL
    assert await w.stop() == -signal.SIGKILL
    assert codes == [-signal.SIGKILL]  # stop() after the death reports nothing more


@pytest.mark.anyio
async def test_start_timeout_kills_the_worker(tiny: Path) -> None:
    w = LlamaWorker(spec(tiny))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(0.01)
    assert err.value.timed_out
    assert err.value.returncode == -signal.SIGKILL
    assert gone(w.pid) and not w.alive


@pytest.mark.anyio
async def test_a_cancelled_start_leaves_no_process(tiny: Path) -> None:
    w = LlamaWorker(spec(tiny))
    task = asyncio.create_task(w.start(START_S))
    while w.pid is None:  # noqa: ASYNC110 - the worker offers no event for "spawned"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await w.stop(grace_s=5) is not None
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_port_held_by_another_server_is_retried(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker b is handed the port of worker a: it must notice and move to a new port."""
    a = LlamaWorker(spec(tiny, key="a"))
    await a.start(START_S)
    ports = [a.port]
    real_free_port = llama_worker.free_port

    def fake_free_port() -> int:
        return ports.pop(0) if ports else real_free_port()

    monkeypatch.setattr(llama_worker, "free_port", fake_free_port)
    b = LlamaWorker(spec(tiny, key="b"))
    try:
        await b.start(START_S)
        assert b.port != a.port
        async with client() as c:
            ids = [m["id"] for m in (await c.get(f"{b.base_url}/v1/models")).json()["data"]]
        assert ids == ["b"]
        assert a.alive  # a was not disturbed
    finally:
        await b.stop()
        await a.stop()


@pytest.mark.anyio
async def test_a_port_that_cannot_be_bound_is_retried(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's "address already in use" exit (status 3) leads to one more try."""
    holder = socket.socket()  # bound, not listening: connections are refused, binds fail
    holder.bind(("127.0.0.1", 0))
    ports = [holder.getsockname()[1]]
    real_free_port = llama_worker.free_port
    monkeypatch.setattr(
        llama_worker, "free_port", lambda: ports.pop(0) if ports else real_free_port()
    )
    w = LlamaWorker(spec(tiny))
    try:
        await w.start(START_S)
        assert w.port != holder.getsockname()[1]
        assert w.alive
    finally:
        await w.stop()
        holder.close()


def test_command_line_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = WorkerSpec(
        key="vision",
        model_path=tmp_path / "m.gguf",
        n_gpu_layers=-1,
        n_ctx=4096,
        n_threads=4,
        chat_format="llava-1-5",
        clip_path=tmp_path / "mmproj.gguf",
        extra_args=("--flash_attn", "true"),
    )
    cmd = build_command(s, 8123, python="py")
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert cmd[:2] == ["py", "-c"] and cmd[3] == str(os.getpid())
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8123",
        "--model": str(tmp_path / "m.gguf"),
        "--model_alias": "vision",
        "--n_gpu_layers": "-1",
        "--n_ctx": "4096",
        "--use_mlock": "false",
        "--n_threads": "4",
        "--chat_format": "llava-1-5",
        "--clip_model_path": str(tmp_path / "mmproj.gguf"),
        "--flash_attn": "true",
    }
    monkeypatch.setenv("PORT", "9")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    env = child_env(s, {"GGML_EXTRA": "x"})
    assert "PORT" not in env and "HTTPS_PROXY" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["GGML_EXTRA"] == "x"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    # The CPU rung hides the GPU, so it really allocates no VRAM.
    cpu = WorkerSpec(key="c", model_path=s.model_path, n_gpu_layers=0, n_ctx=512)
    assert child_env(cpu)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                "INFO:     Application startup complete.",
                "ERROR:    [Errno 98] error while attempting to bind on address "
                "('127.0.0.1', 8000): address already in use",
                "INFO:     Waiting for application shutdown.",
            ],
            "ERROR:    [Errno 98] error while attempting to bind on address "
            "('127.0.0.1', 8000): address already in use",
        ),
        (
            [
                "llama_model_loader: - kv   0: general.architecture str = llama",
                "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0:"
                " cudaMalloc failed: out of memory",
                "alloc_tensor_range: failed to allocate CUDA0 buffer of size 9437184000",
                "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "ValueError: Failed to load model from file: /m.gguf",
            ],
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0:"
            " cudaMalloc failed: out of memory"
            " (ValueError: Failed to load model from file: /m.gguf)",
        ),
        ([], "no output"),
    ],
    ids=["port-taken", "cuda-oom", "silent"],
)
def test_extract_reason(lines: list[str], reason: str) -> None:
    assert extract_reason(lines) == reason


class FakeProbe:
    def __init__(self, answers: list[dict[int, float] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def process_vram_mb(self, pids: list[int]) -> dict[int, float] | None:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answers", "released", "calls"),
    [
        ([None], True, 1),  # no NVML: nothing to wait on
        ([{7: 0.0}], True, 1),
        ([{}], True, 1),  # the pid is absent from the figures
        ([{7: 900.0}, {7: 300.0}, {7: 0.0}], True, 3),
        ([{7: 900.0}], False, None),  # never released within the timeout
    ],
)
async def test_wait_gpu_memory_released(answers, released: bool, calls: int | None) -> None:
    probe = FakeProbe(answers)
    assert await wait_gpu_memory_released(probe, 7, timeout_s=0.3, poll_s=0.01) is released
    if calls is not None:
        assert probe.calls == calls
    else:
        assert probe.calls >= 2


@pytest.mark.anyio
async def test_wait_gpu_memory_released_with_the_real_probe() -> None:
    probe = MemoryProbe(timeout_s=2)
    if probe.process_vram_mb([os.getpid()]) is not None:
        pytest.skip("NVML is available here: covered by the GPU validation")
    assert await wait_gpu_memory_released(probe, os.getpid(), timeout_s=1, poll_s=0.1)


@pytest.mark.anyio
async def test_a_worker_does_not_outlive_a_killed_parent(tiny: Path) -> None:
    """An Edison killed with SIGKILL cannot stop its workers: the kernel must end them."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from services.llama_worker import LlamaWorker, WorkerSpec\n"
        "async def main():\n"
        f"    w = LlamaWorker(WorkerSpec('t', Path({str(tiny)!r}), 0, 256, n_threads=1))\n"
        "    await w.start(60)\n"
        "    print(w.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        llama_worker.sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), START_S)
        worker_pid = int(line)
        assert not gone(worker_pid)
    finally:
        parent.kill()
        await parent.wait()
    for _ in range(200):
        if gone(worker_pid):
            break
        await asyncio.sleep(0.1)
    assert gone(worker_pid)
