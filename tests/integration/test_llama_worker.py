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

from services.demo.tiny_gguf import write_tiny_gguf
from services.errors import ModelLoadFailed
from services.llm import worker as llama_worker
from services.llm.worker import LlamaWorker, WorkerStartFailed
from services.llm.worker_command import WorkerSpec
from tests.helpers import until

START_S = 60  # generous: the tiny model is ready in about half a second
REPO = Path(__file__).resolve().parents[2]


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
    await until(lambda: w.pid is not None, what="spawned")  # the worker offers no event
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


@pytest.mark.anyio
async def test_a_worker_does_not_outlive_a_killed_parent(tiny: Path) -> None:
    """An Edison killed with SIGKILL cannot stop its workers: the kernel must end them."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from services.llm.worker import LlamaWorker, WorkerSpec\n"
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
    await until(lambda: gone(worker_pid), what="the orphaned worker ended")
