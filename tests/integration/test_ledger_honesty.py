"""The ledger agrees with the card: a load settles from the best evidence there is, its
RAM side is booked on a GPU host, and a release wait waits for the release.

Real llama.cpp workers on tiny GGUFs. The GPU is the one thing faked (this machine has
none): ``ContainerNvml`` stands in for pynvml under the real MemoryProbe. Its device
figure moves as our workers start and end, as a driver's does; its process list names
none of our pids, as NVML does in a container without the host's PID namespace (or names
them, with ``lists_pids``)."""

from __future__ import annotations

import shutil
import sys
import threading
import types
from pathlib import Path

import psutil
import pytest

from services.errors import ModelLoadFailed
from services.llm.loader import projector_need_mb
from services.llm.manager import ModelManager
from services.memory.gguf_estimate import estimate, read_gguf_info
from services.memory.ledger import CPU
from services.memory.placement import Placement, ceiling_mb, ledger_for, load_need_mb
from services.memory.probe import MemoryProbe
from tests.helpers import FakeGpuProbe, until

pytestmark = pytest.mark.anyio
MiB = 2**20


class ContainerNvml(types.SimpleNamespace):
    """pynvml of one 12 GB card: ``other_mb`` used by other programs, plus ``worker_mb``
    for each live child process of this test serving one of ``models``. A worker's memory
    shows released ``release_lag`` memory queries after its process ended."""

    def __init__(
        self,
        models: list[Path],
        *,
        total_mb: float = 12288,
        other_mb: float = 1000,
        worker_mb: float = 700,
        lists_pids: bool = False,
        listed_mb: float = 650,
        release_lag: int = 0,
    ) -> None:
        super().__init__()
        self.models = [str(m) for m in models]
        self.total_mb, self.other_mb, self.worker_mb = total_mb, other_mb, worker_mb
        self.lists_pids, self.listed_mb = lists_pids, listed_mb
        self.release_lag = release_lag
        self._lag: dict[int, int] = {}  # ended worker pid -> queries left before release
        self._lock = threading.Lock()

    def workers(self) -> list[int]:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and any(
                    m in a for a in p.cmdline() for m in self.models
                ):
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out

    def used_mb(self) -> float:
        with self._lock:
            live = set(self.workers())
            for pid in list(self._lag):
                if pid not in live:
                    self._lag[pid] -= 1
                    if self._lag[pid] < 0:
                        del self._lag[pid]
            for pid in live:
                self._lag[pid] = self.release_lag
            return self.other_mb + self.worker_mb * len(self._lag)

    # ---- the pynvml calls MemoryProbe makes
    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return "Container GPU 12GB"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        used = self.used_mb()
        return types.SimpleNamespace(
            total=self.total_mb * MiB, used=used * MiB, free=(self.total_mb - used) * MiB
        )

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[types.SimpleNamespace]:
        if not self.lists_pids:
            return [types.SimpleNamespace(pid=4242, usedGpuMemory=300 * MiB)]  # not ours
        return [
            types.SimpleNamespace(pid=pid, usedGpuMemory=self.listed_mb * MiB)
            for pid in self.workers()
        ]


@pytest.fixture
def gpu_model(tmp_path: Path, tiny_dir: Path) -> Path:
    """The fast tiny model under a path of this test's own (the fake counts its workers)."""
    path = tmp_path / "on-gpu" / "fast.gguf"
    path.parent.mkdir()
    shutil.copy(tiny_dir / "fast.gguf", path)
    return path


def manager_on(settings, probe) -> ModelManager:
    return ModelManager(settings, Placement(settings, probe, ledger_for(settings)))


def gpu_settings(make_settings, model: Path, **models):
    return make_settings(
        models={
            "fast": {"path": str(model), "n_ctx": 256, "preload": False},
            "n_threads": 1,
            "load_timeout_s": 60,
            **models,
        },
        memory={"recovery_wait_s": 10, "recovery_poll_s": 0.01},
    )


async def test_in_a_container_a_load_settles_from_the_device_figure(
    monkeypatch: pytest.MonkeyPatch, make_settings, gpu_model: Path
) -> None:
    nvml = ContainerNvml([gpu_model], release_lag=3)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = MemoryProbe(timeout_s=5)
    mm = manager_on(gpu_settings(make_settings, gpu_model), probe)
    try:
        model = await mm.load("fast")
        assert model.device == "cuda:0"
        assert model.settled_from == "device_delta"
        assert model.reservation.settled and model.reservation.mb == pytest.approx(700)
        assert model.vram_measured_mb == pytest.approx(700)
        # Our model is ours, not "other programs": unloading it could free it.
        budget = mm.ledger.budget(probe.snapshot(), "cuda:0")
        reserve = mm.settings.memory.reserve_vram_mb
        assert ceiling_mb(budget) == pytest.approx(12288 - 1000 - reserve)
    finally:
        out = await mm.unload("fast")
    # The release wait polled the device until its figure showed the memory back.
    assert out.settling is False
    assert probe.snapshot().gpus[0].used_mb == pytest.approx(1000)
    assert mm.ledger.entries() == []


async def test_where_nvml_lists_our_pid_its_figure_wins(
    monkeypatch: pytest.MonkeyPatch, make_settings, gpu_model: Path
) -> None:
    nvml = ContainerNvml([gpu_model], lists_pids=True, listed_mb=650)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    mm = manager_on(gpu_settings(make_settings, gpu_model), MemoryProbe(timeout_s=5))
    try:
        model = await mm.load("fast")
        assert model.settled_from == "nvml_process"
        assert model.reservation.mb == pytest.approx(650)
    finally:
        out = await mm.unload("fast")
    assert out.settling is False


async def test_without_evidence_the_estimate_stays(make_settings, gpu_model: Path) -> None:
    """A GPU whose figure never moves and no NVML: nothing measured, the estimate kept."""
    mm = manager_on(gpu_settings(make_settings, gpu_model), FakeGpuProbe(used_mb=1000))
    try:
        model = await mm.load("fast")
        assert model.settled_from == "estimate"
        assert not model.reservation.settled
        assert model.reservation.mb == pytest.approx(model.vram_estimate_mb, abs=0.1)
    finally:
        out = await mm.unload("fast")
    assert out.settling is True  # nothing can confirm the release: the gate polls instead


async def test_a_cpu_rung_on_a_gpu_host_books_its_ram(make_settings, gpu_model: Path) -> None:
    settings = gpu_settings(
        make_settings,
        gpu_model,
        fast={"path": str(gpu_model), "n_ctx": 256, "preload": False, "n_gpu_layers": 0},
    )
    mm = manager_on(settings, FakeGpuProbe())
    try:
        model = await mm.load("fast")
        assert (model.device, model.n_gpu_layers) == ("cuda:0", 0)
        assert model.reservation.mb == 0  # no VRAM: the worker is hidden from the GPU
        ram = [r for r in mm.ledger.entries() if r.device == CPU]
        assert [r.owner for r in ram] == ["model:fast"]
        assert model.settled_from == "rss"
        cache = settings.models.llama_server_cache_ram_mb if model.backend == "llama-server" else 0
        assert ram[0].mb == pytest.approx(model.rss_mb + cache)
    finally:
        await mm.unload("fast")
    assert mm.ledger.entries() == []


async def test_a_cpu_rung_without_the_ram_starts_no_worker(make_settings, gpu_model: Path) -> None:
    settings = gpu_settings(
        make_settings,
        gpu_model,
        fast={"path": str(gpu_model), "n_ctx": 256, "preload": False, "n_gpu_layers": 0},
    )
    settings.memory.reserve_ram_mb = 1048576  # every MB of RAM held back
    mm = manager_on(settings, FakeGpuProbe())
    with pytest.raises(ModelLoadFailed) as err:
        await mm.load("fast")
    attempts = mm.tiers["fast"].attempts
    assert attempts and all(a.failure == "memory" and a.ms == 0 for a in attempts)
    assert "not enough RAM" in attempts[0].reason
    assert err.value.details["failure"] == "memory"
    assert mm.ledger.entries() == []


async def test_llama_server_prompt_cache_is_capped_and_counted(
    make_settings, tiny_dir: Path, llama_server_bin: Path
) -> None:
    from services.llm.backend_llama_server import inspect_binary

    path = tiny_dir / "fast.gguf"
    settings = make_settings(
        models={
            "fast": {"path": str(path), "n_ctx": 256, "preload": False},
            "backend": "llama-server",
            "llama_server_cache_ram_mb": 64,
            "n_threads": 1,
        }
    )
    mm = manager_on(settings, MemoryProbe(timeout_s=5))
    overhead = mm.placement.worker_overhead_mb(CPU, "llama-server")
    est = estimate(read_gguf_info(path), 0, 256, slots=4, flash_attn=True)
    need = load_need_mb(est, CPU, overhead + 64)
    try:
        model = await mm.load("fast")
        assert mm.tiers["fast"].attempts[-1].estimate_mb == pytest.approx(need)
        assert model.reservation.mb == pytest.approx(model.rss_mb + 64)
        cmd = psutil.Process(model.pid).cmdline()
        if "--cache-ram" in inspect_binary(llama_server_bin).flags:
            assert cmd[cmd.index("--cache-ram") + 1] == "64"
    finally:
        await mm.unload("fast")


async def test_a_vision_projector_is_in_the_need_and_settled_after_the_first_image(
    make_settings, tiny_dir: Path, tmp_path: Path
) -> None:
    from services.demo.assets import DEMO_PROJECTOR, write_vision_pair
    from services.llm.chat import ChatProxy
    from tests.images import data_url, image_bytes, image_message

    model_path, clip = write_vision_pair(tmp_path / "vision")
    settings = make_settings(
        models={
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256, "preload": False},
            "vision": {
                "path": str(model_path),
                "clip_path": str(clip),
                "chat_format": "mtmd",
                "image_tokens": DEMO_PROJECTOR.n_patches,
                "n_ctx": 256,
                "backend": "llama-cpp-python",  # the backend that loads it at the first image
            },
            "n_threads": 1,
        }
    )
    mm = manager_on(settings, MemoryProbe(timeout_s=5))
    chat = ChatProxy(mm)
    projector = projector_need_mb(clip)
    overhead = mm.placement.worker_overhead_mb(CPU)  # before this load teaches it
    est = estimate(read_gguf_info(model_path), 0, 256)
    need = load_need_mb(est, CPU, overhead + projector)
    try:
        model = await mm.load("vision")
        assert model.projector_mb == pytest.approx(projector, abs=0.1)
        assert mm.tiers["vision"].attempts[-1].estimate_mb == pytest.approx(need)
        # Settled to what the worker holds, plus the projector it has not loaded yet.
        at_load = model.reservation.mb
        assert at_load == pytest.approx(model.rss_mb + projector)
        assert model.projector_pending_mb == pytest.approx(projector)
        body = {
            "model": "vision",
            "messages": [image_message(data_url(image_bytes()))],
            "max_tokens": 4,
        }
        await chat.complete(body)
        await until(lambda: model.projector_pending_mb == 0, what="the projector settled")
        await until(lambda: model.reservation.mb != at_load, what="a new figure booked")
        worker_rss = psutil.Process(model.pid).memory_info().rss / MiB
        assert model.reservation.mb == pytest.approx(worker_rss, rel=0.2)
    finally:
        await chat.aclose()
        await mm.unload_all()
