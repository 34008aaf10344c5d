"""Many GPUs on a simulated host: real llama.cpp workers and real tiny pipelines on the
CPU, placed on GPUs that a fake probe reports (two cards cannot exist on this machine).

What is real: the worker processes and their environment, the ledger entries per device,
the gate's lines, the pipelines' runs. What is given: each card's total and used memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.llm.manager import ModelManager
from tests.helpers import FakeGpuProbe, placement_for, wait_ready, wait_until

pytestmark = pytest.mark.anyio


def visible_devices(pid: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES a running worker was started with."""
    return psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES")


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def tier(tiny_dir: Path, name: str, **extra: object) -> dict:
    return {"path": str(tiny_dir / f"{name}.gguf"), "n_ctx": 256, "preload": False, **extra}


def two_gpu_manager(
    make_settings, tiny_dir: Path, **models: object
) -> tuple[ModelManager, FakeGpuProbe]:
    settings = make_settings(
        memory={"devices": "auto", "reserve_vram_mb": 1024},
        models={
            "fast": tier(tiny_dir, "fast"),
            "medium": tier(tiny_dir, "medium", device=0),
            "deep": tier(tiny_dir, "deep"),
            "reasoning": tier(tiny_dir, "reasoning"),
            "n_threads": 1,
            "load_timeout_s": 60,
            "min_residency_s": 30,
            "max_residency_wait_s": 0,
            **models,
        },
    )
    probe = FakeGpuProbe(total_mb=12_288, gpus=2)
    probe.set_used(4_000, index=0)  # another program on cuda:0
    return ModelManager(settings, placement_for(settings, probe)), probe


async def test_workers_see_only_their_device_and_the_ledger_books_each(
    make_settings, tiny_dir, caplog
) -> None:
    caplog.set_level("INFO", logger="edison.models")
    mm, _ = two_gpu_manager(make_settings, tiny_dir)
    try:
        fast = await mm.load("fast")  # auto: same rung on both; cuda:1 has more usable
        medium = await mm.load("medium")  # pinned to GPU 0
        assert (fast.device, visible_devices(fast.pid)) == ("cuda:1", "1")
        assert (medium.device, visible_devices(medium.pid)) == ("cuda:0", "0")
        booked = {(r.owner, r.device) for r in mm.ledger.entries()}
        # Each card's VRAM entry, and each worker's RAM side on this GPU host.
        assert booked == {
            ("model:fast", "cuda:1"),
            ("model:medium", "cuda:0"),
            ("model:fast", "cpu"),
            ("model:medium", "cpu"),
        }
        # A chat for deep: cuda:0's heavy slot holds medium (loaded just now), cuda:1's is
        # empty: deep goes there, and medium stays.
        res = await mm.resolve("deep")
        assert res.tier == "deep" and res.model.device == "cuda:1"
        assert visible_devices(res.model.pid) == "1"
        assert mm.heavy_slots() == {"cuda:0": "medium", "cuda:1": "deep"}
        assert not gone(medium.pid)
        # Every load says where it went and why.
        assert "Load of fast placed on cuda:1 because same rung elsewhere" in caplog.text
        assert "Load of medium placed on cuda:0 because the only device" in caplog.text
    finally:
        await mm.unload_all()


async def test_residency_keeps_young_heavy_models_then_lets_them_go(
    make_settings, tiny_dir
) -> None:
    mm, _ = two_gpu_manager(make_settings, tiny_dir)
    offset = {"s": 0.0}
    mm.clock = lambda: time.time() + offset["s"]  # the residency's clock, moved by the test
    try:
        medium = await mm.load("medium")
        deep = (await mm.resolve("deep")).model
        assert {medium.device, deep.device} == {"cuda:0", "cuda:1"}
        # Both heavy slots hold models younger than 30 s and no wait is allowed: the chat
        # for reasoning falls back along its chain (deep), evicting nothing.
        res = await mm.resolve("reasoning")
        assert res.tier == "deep" and res.model is deep
        assert "loaded less than 30 s ago" in (res.fallback_reason or "")
        assert not gone(medium.pid) and not gone(deep.pid)
        assert mm.tiers["reasoning"].attempts == []  # never started a worker
        # Past the residency, the same chat evicts one of them.
        offset["s"] = 31.0
        res = await mm.resolve("reasoning")
        assert res.tier == "reasoning" and res.fallback_reason is None
        evicted = medium if res.model.device == medium.device else deep
        kept = deep if evicted is medium else medium
        assert wait_until(lambda: gone(evicted.pid), what="the evicted worker ended")
        assert not gone(kept.pid)
        assert mm.heavy_slots()[res.model.device] == "reasoning"
    finally:
        await mm.unload_all()


async def test_a_chat_waits_out_a_short_residency(make_settings, tiny_dir) -> None:
    mm, _ = two_gpu_manager(
        make_settings,
        tiny_dir,
        medium=tier(tiny_dir, "medium", device=0),
        deep=tier(tiny_dir, "deep", device=0),
        max_residency_wait_s=60,
    )
    offset = {"s": 0.0}
    waits: list[float] = []
    mm.clock = lambda: time.time() + offset["s"]

    async def sleep(seconds: float) -> None:  # time passes at once on the test's clock
        waits.append(seconds)
        offset["s"] += seconds

    mm.sleep = sleep
    try:
        medium = await mm.load("medium")
        res = await mm.resolve("deep")  # pinned to cuda:0, whose slot medium holds
        assert res.tier == "deep" and res.model.device == "cuda:0"
        assert len(waits) == 1 and 29 < waits[0] <= 30
        assert res.residency_wait_s == pytest.approx(waits[0], abs=0.01)
        assert wait_until(lambda: gone(medium.pid), what="medium ended")
    finally:
        await mm.unload_all()


async def test_one_device_keeps_todays_heavy_slot_rule(make_settings, tiny_dir) -> None:
    """With one GPU the residency rule is off: the slot goes to the latest chat."""
    settings = make_settings(
        memory={"reserve_vram_mb": 1024},
        models={
            "medium": tier(tiny_dir, "medium"),
            "deep": tier(tiny_dir, "deep"),
            "n_threads": 1,
            "min_residency_s": 30,
            "max_residency_wait_s": 0,
        },
    )
    mm = ModelManager(settings, placement_for(settings, FakeGpuProbe(total_mb=12_288)))
    try:
        medium = await mm.load("medium")
        res = await mm.resolve("deep")
        assert res.tier == "deep" and res.fallback_reason is None
        assert res.model.device == "cuda:0" and visible_devices(res.model.pid) == "0"
        assert wait_until(lambda: gone(medium.pid), what="medium ended")
    finally:
        await mm.unload_all()


# ---- heavy tasks: one line per device ------------------------------------------------


@pytest.fixture
def two_gpu_app(make_settings, tiny_pipelines):
    def build(max_waiting: int = 8, **image: object):
        settings = make_settings(
            memory={"devices": "auto", "reserve_vram_mb": 1024},
            generation={
                "image": {
                    "pipeline": str(tiny_pipelines["image"]),
                    "required_vram_mb": 3000,
                    "default_steps": 2,
                    **image,
                }
            },
            queue={"max_waiting": max_waiting, "max_wait_s": 120},
        )
        probe = FakeGpuProbe(total_mb=12_288, gpus=2)
        # Every placed "cuda:N" runs on this machine's CPU.
        return create_app(settings, probe=probe, pipeline_run_device=lambda device: "cpu")

    return build


def submit(client: TestClient, prompt: str) -> str:
    r = client.post(
        "/generate-image",
        json={"prompt": prompt, "width": 32, "height": 32, "steps": 2},
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_two_generations_on_two_devices_run_at_once(two_gpu_app, step_gate) -> None:
    with TestClient(two_gpu_app()) as client:
        wait_ready(client)
        a = submit(client, "first")
        step_gate.wait_held(1)
        b = submit(client, "second")
        step_gate.wait_held(2)  # both runs are in flight at once
        jobs = {j: client.get(f"/jobs/{j}").json() for j in (a, b)}
        assert {j["device"] for j in jobs.values()} == {"cuda:0", "cuda:1"}
        assert all(j["status"] == "running" and j["position"] == 0 for j in jobs.values())
        assert "idle gate" in jobs[b]["gate"]["placed_because"]
        memory = client.get("/system/memory").json()
        lanes = {d["lane"]["device"]: d["lane"] for d in memory["devices"]}
        assert {d: lane["state"] for d, lane in lanes.items()} == {
            "cuda:0": "busy",
            "cuda:1": "busy",
        }
        tasks = {(r["owner"], r["device"]) for r in memory["reservations"]}
        assert tasks == {("task:image: first", "cuda:0"), ("task:image: second", "cuda:1")}
        step_gate.release()
        for j in (a, b):
            wait_until(
                lambda j=j: client.get(f"/jobs/{j}").json()["status"] == "succeeded",
                what=f"job {j} done",
            )
    assert step_gate.max_in_flight == 2


def test_two_generations_pinned_to_one_device_queue(two_gpu_app, step_gate) -> None:
    with TestClient(two_gpu_app(max_waiting=1, device=1)) as client:
        wait_ready(client)
        a = submit(client, "first")
        step_gate.wait_held(1)
        b = submit(client, "second")
        waiting = wait_until(
            lambda: (j := client.get(f"/jobs/{b}").json())["device"] is not None and j,
            what="the second job joined a line",
        )
        assert waiting["status"] == "queued" and waiting["device"] == "cuda:1"
        assert waiting["position"] == 1
        gate = client.get("/system/memory").json()["gate"]
        assert [(q["device"], q["position"]) for q in gate["queue"]] == [("cuda:1", 1)]
        # cuda:1's line is full (1 waiting): a third is refused, naming that line, though
        # cuda:0 is idle (the pin holds).
        r = client.post(
            "/generate-image", json={"prompt": "third", "width": 32, "height": 32, "steps": 2}
        )
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["device"] == "cuda:1"
        text = client.get("/metrics").text
        assert 'edison_device_queue_length{device="cuda:1"} 1.0' in text
        assert 'edison_device_busy{device="cuda:1"} 1.0' in text
        assert 'edison_device_busy{device="cuda:0"} 0.0' in text
        step_gate.release()
        for j in (a, b):
            done = wait_until(
                lambda j=j: (x := client.get(f"/jobs/{j}").json())["status"] == "succeeded" and x,
                what=f"job {j} done",
            )
            assert done["device"] == "cuda:1"
    assert step_gate.max_in_flight == 1


def test_chat_answer_names_the_device(make_settings, tiny_dir) -> None:
    settings = make_settings(
        memory={"devices": "auto", "reserve_vram_mb": 1024},
        models={"fast": tier(tiny_dir, "fast", preload=True), "n_threads": 1},
    )
    probe = FakeGpuProbe(total_mb=12_288, gpus=2)
    probe.set_used(6_000, index=0)
    with TestClient(create_app(settings, probe=probe)) as client:
        wait_ready(client)
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "fast",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["edison"]["device"] == "cuda:1"
        assert r.json()["edison"].get("residency_wait_s") is None  # nothing waited
        memory = client.get("/system/memory").json()
        assert [m["devices"] for m in memory["loaded_models"]] == [["cuda:1"]]
        lanes = {d["lane"]["device"] for d in memory["devices"]}
        assert lanes == {"cuda:0", "cuda:1"}


async def test_a_model_no_card_holds_alone_is_split_when_allowed(make_settings, tiny_dir) -> None:
    """Two cards of 1.2 MB each (figures), a model whose only GPU rung needs 1.85 MB (its
    GGUF estimate, no worker overhead): split across both when the tier allows it, on one
    card's CPU rung when it does not."""

    def manager(allow_split: bool) -> ModelManager:
        settings = make_settings(
            memory={"devices": "auto", "reserve_vram_mb": 0, "worker_overhead_prior_mb": 0},
            # llama-cpp-python: the split is read from its --tensor_split.
            models={
                "medium": tier(tiny_dir, "medium", allow_split=allow_split),
                "n_threads": 1,
                "backend": "llama-cpp-python",
            },
        )
        return ModelManager(
            settings, placement_for(settings, FakeGpuProbe(1.2, gpus=2), reserve_vram_mb=0)
        )

    mm = manager(allow_split=True)
    try:
        model = await mm.load("medium")
        assert model.devices == ("cuda:0", "cuda:1") and model.n_gpu_layers > 0
        assert visible_devices(model.pid) == "0,1"
        cmd = psutil.Process(model.pid).cmdline()
        shares = [float(x) for x in cmd[cmd.index("--tensor_split") + 1 :][:2]]
        assert shares == pytest.approx([0.5, 0.5])
        booked = sorted(
            (r.device, round(r.mb, 3)) for r in mm.ledger.entries() if r.device != "cpu"
        )
        assert [d for d, _ in booked] == ["cuda:0", "cuda:1"]
        assert sum(mb for _, mb in booked) == pytest.approx(1.852, abs=0.01)
        assert mm.heavy_slots() == {"cuda:0": "medium", "cuda:1": "medium"}
    finally:
        await mm.unload_all()
    assert mm.ledger.entries() == []

    mm = manager(allow_split=False)
    try:
        model = await mm.load("medium")
        assert model.n_gpu_layers == 0 and len(model.devices) == 1
        assert visible_devices(model.pid) == ""  # a CPU rung sees no GPU
        assert "--tensor_split" not in psutil.Process(model.pid).cmdline()
    finally:
        await mm.unload_all()


async def test_a_chat_does_not_take_a_cpu_rung_beside_a_young_model(
    make_settings, tiny_dir
) -> None:
    """cuda:1 is nearly full (another program): deep could only get a CPU rung there, so
    the chat does not load it there; cuda:0's medium is young: deep falls back to it."""
    mm, probe = two_gpu_manager(make_settings, tiny_dir)
    probe.set_used(12_288 - 1_024 - 100, index=1)  # 100 MB usable: no GPU rung fits
    try:
        medium = await mm.load("medium")
        res = await mm.resolve("deep")
        assert res.tier == "medium" and res.model is medium
        assert "deep: heavy slots hold medium on cuda:0" in (res.fallback_reason or "")
        assert mm.tiers["deep"].attempts == [] and mm.tiers["deep"].status == "unloaded"
        # An operator's load is not a chat: residency does not hold it, and a GPU rung in
        # cuda:0's slot is worth evicting medium for.
        deep = await mm.load("deep")
        assert deep.device == "cuda:0" and deep.n_gpu_layers > 0
        assert wait_until(lambda: gone(medium.pid), what="medium ended")
    finally:
        await mm.unload_all()
