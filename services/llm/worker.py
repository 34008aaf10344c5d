"""One llama.cpp model in its own child process: ``python -m llama_cpp.server`` or
llama.cpp's ``llama-server`` (``models.backend``). Everything here but the command
line, the readiness answer's details and the error lines is the same for both.

Ending the process is the only sure way to give its VRAM back (dropping a ``Llama``
object does not reliably do it, and a CUDA error inside ggml aborts the whole
process), so each model gets a process, as in Ollama, llama-swap and LocalAI.

What each server does, as measured here, is in its backend module.

What this module adds: an allow-listed, offline environment; its own process group;
the GPU hidden when no layer is offloaded; a parent-death signal (BOOTSTRAP, or
EXEC_WRAPPER for llama-server), so a worker never outlives an Edison killed with
SIGKILL; one retry on a new port; for llama-server, a binary that is missing or cannot
run fails the start at once with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping

import anyio
import httpx

from services.errors import ModelLoadFailed
from services.llm.backend_llama_server import inspect_binary
from services.llm.failures import LoadFailure, classify
from services.llm.worker_command import (
    PORT_TAKEN,
    WorkerSpec,
    binary_of,
    build_command,
    child_env,
    extract_reason,
    free_port,
)

log = logging.getLogger("edison.llama_worker")

TAIL_LINES = 200
MAX_LINE_CHARS = 2000
POLL_S = 0.05


class WorkerStartFailed(ModelLoadFailed):
    """The worker exited, or did not answer in time, before it was ready. ``failure``
    says why as a kind the load ladder decides on (``failures.py``)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        stderr_tail: str,
        returncode: int | None,
        failure: LoadFailure,
        timed_out: bool = False,
        missing_file: bool = False,
        port_taken: bool = False,
    ) -> None:
        super().__init__(
            message,
            reason=reason,
            returncode=returncode,
            timed_out=timed_out,
            missing_file=missing_file,
            failure=failure.kind,
        )
        self.reason = reason
        self.stderr_tail = stderr_tail  # kept off the client-facing details: it is long
        self.returncode = returncode
        self.failure = failure
        self.timed_out = timed_out
        self.missing_file = missing_file
        self.port_taken = port_taken


class LlamaWorker:
    """A ``llama_cpp.server`` or ``llama-server`` child serving one model on a loopback
    port."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        python: str = sys.executable,
        on_exit: Callable[[LlamaWorker, int], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.python = python
        self.on_exit = on_exit
        self._env_overrides = dict(env or {})
        self.pid: int | None = None
        self.port: int = 0
        self.started_at: float = 0.0  # wall clock (time.time()) of the spawn
        self.ready_ms: float = 0.0  # spawn to first 200 from /v1/models, port retry included
        # The context one request may fill: n_ctx on llama_cpp.server, a slot's share on
        # llama-server (its /props once ready).
        self.slot_ctx: int = spec.n_ctx
        self._flags: tuple[str, ...] = ()  # optional llama-server flags its binary knows
        self._proc: asyncio.subprocess.Process | None = None
        # Why a deque: the child's output must be read continuously or its pipe fills
        # and the child blocks in a write; only the last lines are worth keeping.
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._reader: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[int] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[int | None] | None = None
        self._stopping = False

    # ---- state ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def stderr_tail(self, n: int = 40) -> str:
        """The last n lines the worker printed (stdout and stderr together)."""
        lines = list(self._lines)
        return "\n".join(lines[-n:] if n > 0 else [])

    # ---- start ---------------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        """Spawn the worker and return once it serves; raise WorkerStartFailed if not.

        If the port turns out to be taken (another process bound it between our
        choice and the worker's bind) the worker is started once more on a new port,
        within the same timeout.
        """
        if self._proc is not None:
            raise RuntimeError(f"worker {self.spec.key} was already started")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + timeout_s
        await self._check_binary()
        for attempt in (1, 2):
            try:
                await self._start_once(deadline)
            except WorkerStartFailed as exc:
                if attempt == 1 and exc.port_taken and loop.time() < deadline:
                    log.warning("worker %s: port %d taken, retrying", self.spec.key, self.port)
                    self._reset()
                    continue
                raise
            self.ready_ms = (loop.time() - t0) * 1000
            log.info(
                "worker %s ready on port %d (pid %s) in %.0f ms",
                self.spec.key,
                self.port,
                self.pid,
                self.ready_ms,
            )
            return

    async def _check_binary(self) -> None:
        """For llama-server: a binary that is missing or does not run fails the start
        here, with that reason; one that runs tells which optional flags it knows."""
        binary = binary_of(self.spec)
        if binary is None:
            return
        info = await anyio.to_thread.run_sync(inspect_binary, binary)
        if not info.usable:
            reason = info.reason or f"llama-server {binary} is not usable"
            raise WorkerStartFailed(
                f"worker {self.spec.key} cannot start: {reason}",
                reason=reason,
                stderr_tail="",
                returncode=None,
                failure=LoadFailure("backend", reason),
                missing_file=True,
            )
        self._flags = tuple(info.flags)

    def _reset(self) -> None:
        self._proc = None
        self.pid = None
        self._reader = self._waiter = None
        self._lines.clear()

    async def _start_once(self, deadline: float) -> None:
        self.port = free_port()
        self.started_at = time.time()
        self._proc = await asyncio.create_subprocess_exec(
            *build_command(self.spec, self.port, self.python, self._flags),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(self.spec, self._env_overrides),
            start_new_session=True,  # its own process group: a kill takes its children
        )
        self.pid = self._proc.pid
        assert self._proc.stdout is not None
        self._reader = asyncio.create_task(self._read(self._proc.stdout))
        self._waiter = asyncio.create_task(self._proc.wait())
        ready = False
        try:
            await self._poll_ready(deadline)
            ready = True
        finally:
            if not ready:  # cancelled or failed: never leave a half-started worker behind
                self._signal(signal.SIGKILL)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _poll_ready(self, deadline: float) -> None:
        assert self._waiter is not None
        loop = asyncio.get_running_loop()
        url = f"{self.base_url}/v1/models"
        # trust_env=False: a proxy from the environment must never see loopback calls.
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if self._waiter.done():
                    await self._drain()
                    raise self._failure(f"worker {self.spec.key} exited before it was ready")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    await self._kill()
                    raise self._failure(
                        f"worker {self.spec.key} was not ready within the timeout", timed_out=True
                    )
                try:
                    r = await client.get(url, timeout=max(0.05, min(1.0, remaining)))
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 200:
                    if self._serves_our_model(r):
                        await self._read_slot_ctx(client)
                        return
                    # Another server answers on "our" port: ours will fail to bind.
                    await self._kill()
                    raise self._failure(
                        f"another server answers on port {self.port}", port_taken=True
                    )
                await asyncio.wait({self._waiter}, timeout=min(POLL_S, max(0.0, remaining)))

    async def _read_slot_ctx(self, client: httpx.AsyncClient) -> None:
        """llama-server's context per slot, from its ``GET /props``."""
        if self.spec.backend != "llama-server":
            return
        try:
            r = await client.get(f"{self.base_url}/props", timeout=5.0)
            self.slot_ctx = int(r.json()["default_generation_settings"]["n_ctx"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("worker %s: no slot context from /props (%s)", self.spec.key, exc)

    def _serves_our_model(self, response: httpx.Response) -> bool:
        try:
            data = response.json().get("data", [])
            return any(m.get("id") == self.spec.key for m in data)
        except (ValueError, AttributeError):
            return False

    def _failure(
        self, message: str, *, timed_out: bool = False, port_taken: bool = False
    ) -> WorkerStartFailed:
        lines = list(self._lines)
        rc = self.returncode
        if not port_taken and rc not in (None, 0) and not timed_out:
            port_taken = any(PORT_TAKEN.search(ln) for ln in lines[-20:])
        missing = not self.spec.model_path.is_file() or (
            self.spec.clip_path is not None and not self.spec.clip_path.is_file()
        )
        if timed_out:
            last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
            reason = "not ready in time" + (f" (last output: {last})" if last else "")
        else:
            reason = extract_reason(lines, self.spec.backend)
        failure = classify(lines, reason, returncode=rc, timed_out=timed_out, missing_file=missing)
        return WorkerStartFailed(
            f"{message}: {reason}",
            reason=reason,
            stderr_tail=self.stderr_tail(),
            returncode=rc,
            failure=failure,
            timed_out=timed_out,
            missing_file=missing,
            port_taken=port_taken,
        )

    # ---- output and supervision ----------------------------------------------------
    async def _read(self, stream: asyncio.StreamReader) -> None:
        """Read the child's output to EOF, keeping the last lines."""
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\r")[:MAX_LINE_CHARS])
            if len(pending) > MAX_LINE_CHARS:  # a line without end: keep its start
                self._lines.append(pending[:MAX_LINE_CHARS].decode("utf-8", "replace"))
                pending = b""
        if pending:
            self._lines.append(pending.decode("utf-8", "replace")[:MAX_LINE_CHARS])

    async def _drain(self, timeout_s: float = 2.0) -> None:
        """Wait (briefly) until the output reader saw EOF, so the tail is complete."""
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)

    async def _supervise(self) -> None:
        """Await the process; report an exit that stop() did not ask for."""
        assert self._waiter is not None
        rc = await self._waiter
        await self._drain()
        if self._stopping:
            return
        log.error(
            "worker %s (pid %s) exited unexpectedly with %s: %s",
            self.spec.key,
            self.pid,
            rc,
            extract_reason(list(self._lines), self.spec.backend),
        )
        if self.on_exit is not None:
            try:
                self.on_exit(self, rc)
            except Exception:
                log.exception("on_exit callback of worker %s failed", self.spec.key)

    def _signal(self, sig: signal.Signals) -> None:
        """Send sig to the worker's process group while the worker is not yet reaped."""
        if self._proc is None or self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # not our group after all: signal the process alone
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self._waiter is not None:
            await asyncio.shield(self._waiter)
        await self._drain()

    # ---- stop ----------------------------------------------------------------------
    async def stop(self, grace_s: float = 10) -> int | None:
        """End the worker: SIGTERM, up to grace_s to exit, then SIGKILL. Idempotent.

        Returns its exit code (negative: the signal that ended it), None if it never
        started.
        """
        if self._proc is None:
            return None
        self._stopping = True
        # Why a shared task: two concurrent stop() calls wait for the same ending.
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace_s))
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float) -> int | None:
        assert self._proc is not None and self._waiter is not None
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), grace_s)
        except TimeoutError:
            log.warning("worker %s ignored SIGTERM for %g s: killing", self.spec.key, grace_s)
            await self._kill()
        await self._drain()
        if self._supervisor is not None:
            await self._supervisor
        return self._proc.returncode

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.returncode}"
        return f"<LlamaWorker {self.spec.key} pid={self.pid} port={self.port} {state}>"
