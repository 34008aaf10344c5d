"""LlamaWorker against a real worker serving a tiny model, on either backend
(``llama_cpp.server`` or ``llama-server``: the ``backend`` fixture)."""

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
TAIL_ALL = 1000
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


def spec(path: Path, backend: str, key: str = "tiny", **kw) -> WorkerSpec:
    return WorkerSpec(
        key=key, model_path=path, n_gpu_layers=0, n_ctx=256, n_threads=1, backend=backend, **kw
    )


# What each backend prints once it listens on its port.
LISTENING = {
    "llama-cpp-python": "Uvicorn running on http://127.0.0.1:{port}",
    "llama-server": "listening on http://127.0.0.1:{port}",
}


def gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=30)


@pytest.mark.anyio
async def test_start_serve_chat_and_stop(
    tiny: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each would change the child if it leaked into it: PORT overrides --port in
    # llama_cpp.server, API_KEY would make every request answer 401, LLAMA_ARG_* set
    # llama-server's options (a port, an API key).
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("API_KEY", "not-for-the-worker")
    monkeypatch.setenv("LLAMA_ARG_PORT", "1")
    monkeypatch.setenv("LLAMA_API_KEY", "not-for-the-worker")
    exits: list[int] = []
    w = LlamaWorker(spec(tiny, backend), on_exit=lambda _w, rc: exits.append(rc))
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
        assert LISTENING[backend].format(port=w.port) in tail
        lines = len(tail.splitlines())
        # Bounded: llama_cpp.server prints ~300 lines at start-up; llama-server ~20.
        assert lines == llama_worker.TAIL_LINES if backend == "llama-cpp-python" else lines < 40
        assert len(w.stderr_tail(3).splitlines()) == 3
    finally:
        rc = await w.stop()
    assert rc is not None and not w.alive
    assert gone(w.pid)
    assert await w.stop() == rc  # idempotent
    assert exits == []  # a stop is not an unexpected exit


@pytest.mark.anyio
async def test_missing_model_file(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "absent.gguf"
    w = LlamaWorker(spec(missing, backend))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(START_S)
    e = err.value
    assert str(missing) in e.reason
    assert e.returncode == 1
    assert e.missing_file and not e.timed_out
    assert ("Traceback" if backend == "llama-cpp-python" else "exiting due to") in e.stderr_tail
    assert isinstance(e, ModelLoadFailed) and e.details["returncode"] == 1
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_truncated_model_fails_with_llama_cpp_s_reason(
    truncated: Path, backend: str
) -> None:
    w = LlamaWorker(spec(truncated, backend))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(START_S)
    e = err.value
    assert e.returncode == 1 and not e.missing_file and not e.timed_out
    # The reason is llama.cpp's own line from stderr, not only the generic ending.
    cause = e.reason.split(" (")[0]
    assert "error loading model" in cause and "blk." in cause
    assert cause in e.stderr_tail
    generic = {
        "llama-cpp-python": "Failed to load model from file",
        "llama-server": "exiting due to model loading error",
    }
    assert generic[backend] in e.reason
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_killed_worker_calls_on_exit(tiny: Path, backend: str) -> None:
    exited = asyncio.Event()
    codes: list[int] = []

    def on_exit(worker: LlamaWorker, rc: int) -> None:
        assert worker is w
        codes.append(rc)
        exited.set()

    w = LlamaWorker(spec(tiny, backend), on_exit=on_exit)
    await w.start(START_S)
    os.kill(w.pid, signal.SIGKILL)
    await asyncio.wait_for(exited.wait(), 30)
    assert codes == [-signal.SIGKILL]
    assert not w.alive and w.returncode == -signal.SIGKILL
    assert await w.stop() == -signal.SIGKILL
    assert codes == [-signal.SIGKILL]  # stop() after the death reports nothing more


@pytest.mark.anyio
async def test_a_hung_worker_is_killed_after_the_grace_period(tiny: Path, backend: str) -> None:
    """A worker that no longer runs (SIGSTOP: it cannot act on SIGTERM) is SIGKILLed
    once stop()'s grace period has passed, and reported as such."""
    codes: list[int] = []
    w = LlamaWorker(spec(tiny, backend), on_exit=lambda _w, rc: codes.append(rc))
    await w.start(START_S)
    os.kill(w.pid, signal.SIGSTOP)
    assert await w.stop(grace_s=0.5) == -signal.SIGKILL
    assert gone(w.pid) and not w.alive
    assert codes == []  # asked for: not an unexpected exit


@pytest.mark.anyio
async def test_start_timeout_kills_the_worker(tiny: Path, backend: str) -> None:
    w = LlamaWorker(spec(tiny, backend))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(0.01)
    assert err.value.timed_out
    assert err.value.returncode == -signal.SIGKILL
    assert gone(w.pid) and not w.alive


@pytest.mark.anyio
async def test_a_cancelled_start_leaves_no_process(tiny: Path, backend: str) -> None:
    w = LlamaWorker(spec(tiny, backend))
    task = asyncio.create_task(w.start(START_S))
    await until(lambda: w.pid is not None, what="spawned")  # the worker offers no event
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await w.stop(grace_s=5) is not None
    assert gone(w.pid)


@pytest.mark.anyio
async def test_a_port_held_by_another_server_is_retried(
    tiny: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker b is handed the port of worker a: it must notice and move to a new port."""
    a = LlamaWorker(spec(tiny, backend, key="a"))
    await a.start(START_S)
    ports = [a.port]
    real_free_port = llama_worker.free_port

    def fake_free_port() -> int:
        return ports.pop(0) if ports else real_free_port()

    monkeypatch.setattr(llama_worker, "free_port", fake_free_port)
    b = LlamaWorker(spec(tiny, backend, key="b"))
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
    tiny: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's "address already in use" exit (status 3), llama-server's "couldn't bind"
    (status 1), lead to one more try."""
    holder = socket.socket()  # bound, not listening: connections are refused, binds fail
    holder.bind(("127.0.0.1", 0))
    ports = [holder.getsockname()[1]]
    real_free_port = llama_worker.free_port
    monkeypatch.setattr(
        llama_worker, "free_port", lambda: ports.pop(0) if ports else real_free_port()
    )
    w = LlamaWorker(spec(tiny, backend))
    try:
        await w.start(START_S)
        assert w.port != holder.getsockname()[1]
        assert w.alive
    finally:
        await w.stop()
        holder.close()


@pytest.mark.anyio
async def test_a_worker_does_not_outlive_a_killed_parent(tiny: Path, backend: str) -> None:
    """An Edison killed with SIGKILL cannot stop its workers: the kernel must end them."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from services.llm.worker import LlamaWorker, WorkerSpec\n"
        "async def main():\n"
        f"    s = WorkerSpec('t', Path({str(tiny)!r}), 0, 256, n_threads=1, backend={backend!r})\n"
        "    w = LlamaWorker(s)\n"
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


# ---- llama-server only -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("problem", ["missing", "not executable", "not llama-server"])
async def test_a_broken_llama_server_binary_fails_with_the_reason(
    tiny: Path, tmp_path: Path, problem: str
) -> None:
    binary = tmp_path / "llama-server"
    if problem != "missing":
        binary.write_text("#!/bin/sh\necho 'usage: something else' >&2\nexit 2\n")
        binary.chmod(0o755 if problem == "not llama-server" else 0o644)
    w = LlamaWorker(spec(tiny, "llama-server", binary=binary))
    with pytest.raises(WorkerStartFailed) as err:
        await w.start(START_S)
    e = err.value
    expected = {
        "missing": "llama-server binary not found",
        "not executable": "llama-server binary is not executable",
        "not llama-server": "is not llama-server",
    }
    assert expected[problem] in e.reason and str(binary) in e.reason
    assert e.missing_file and not e.timed_out and e.returncode is None
    assert w.pid is None  # nothing was started


@pytest.mark.anyio
async def test_llama_server_slots_share_the_context(tiny: Path, llama_server_bin: Path) -> None:
    """n_ctx 1024 over 4 slots: each slot holds 256 tokens, as /props says."""
    s = WorkerSpec("tiny", tiny, 0, 1024, n_threads=1, backend="llama-server", parallel=4)
    w = LlamaWorker(s)
    await w.start(START_S)
    try:
        assert w.slot_ctx == 256
        async with client() as c:
            props = (await c.get(f"{w.base_url}/props")).json()
            assert props["total_slots"] == 4
            n = (await c.post(f"{w.base_url}/tokenize", json={"content": "hello"})).json()
        assert n["tokens"]
        tail = w.stderr_tail(TAIL_ALL)
        assert "n_slots = 4, n_ctx_slot = 256" in tail
    finally:
        await w.stop()
