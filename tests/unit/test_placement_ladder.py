"""The placement ladder's decisions, from numbers.

Rung needs come from component sizes written here (what safetensors headers would say);
the gate's choice runs the real MemoryGate on a GPU that reports given numbers
(FakeGpuProbe) next to a double of the model manager that holds given chat models: both
stand for a card and LLM workers that cannot exist on this machine. Real pipelines at
each rung are in tests/integration/test_pipeline_ladder.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from services.errors import InsufficientMemory
from services.generation.placement_ladder import (
    RUNGS,
    Context,
    RungLadder,
    RungOption,
    RungPlan,
    allowed_rungs,
    choose_rung,
    worth_unloading,
)
from services.generation.placement_sizes import ComponentSize, PipelineSizes, read_sizes
from services.generation.rung_needs import LadderRequest, build_ladder, rung_key
from services.generation.rung_speeds import RungSpeeds
from services.generation.sizing import RequestSize
from services.llm.records import UnloadResult
from services.memory.devices import UnloadCost
from services.memory.gate import MemoryGate
from services.memory.learning import LearnedMemory
from tests.helpers import FakeGpuProbe, placement_for

MB = 1024 * 1024
M = MB // 4  # float32 elements in one MB


def option(rung: str, need: float, step: float, host: float = 0.0, keep=()) -> RungOption:
    return RungOption(RungPlan(rung, tuple(keep)), need, host, step, step, "estimated", "prior")


LADDER = [
    option("full", 9000, 1.0),
    option("vae_tiling", 8500, 1.02),
    option("fp8", 6000, 1.1),
    option("offload_blocks", 5000, 1.05, host=3000, keep=("unet",)),
    option("offload_blocks", 2500, 1.5, host=7000),
    option("offload_model", 4000, 2.5, host=9000),
    option("sequential", 600, 6.0, host=9000),
]


# (usable MB, host RAM MB) -> the rung's label chosen, or None
@pytest.mark.parametrize(
    "usable, host, chosen",
    [
        (10_000, 64_000, "full"),
        (8_800, 64_000, "vae_tiling"),
        # offload_blocks keeping the UNet (1.05x) is faster than fp8 (1.1x) where it fits
        (6_500, 64_000, "offload_blocks (unet resident)"),
        (5_500, 64_000, "offload_blocks (unet resident)"),
        (6_500, 2_000, "fp8"),  # RAM holds none of the offloaded weights: fp8 needs none
        (4_500, 64_000, "offload_blocks (nothing resident)"),
        (2_000, 64_000, "sequential"),
        (2_000, 8_000, None),  # sequential's 9000 MB of RAM are not there
        (500, 64_000, None),
    ],
)
def test_the_fastest_rung_that_fits(usable, host, chosen) -> None:
    choice = choose_rung(LADDER, usable, host)
    assert (choice.option.label if choice.option else None) == chosen
    if chosen is None:
        assert choice.because.startswith("no rung fits: the smallest, sequential, needs 600 MB")
    else:
        assert "fastest rung that fits" in choice.because and "(estimated)" in choice.because


def test_a_measured_speed_reorders_the_choice() -> None:
    """On a card where the UNet-resident block offload measured 1.3x full's step time, fp8
    (1.1x, prior) is the faster of the two that fit."""
    measured = [*LADDER]
    measured[3] = option("offload_blocks", 5000, 1.3, host=3000, keep=("unet",))
    assert choose_rung(measured, 6_500, 64_000).option.rung == "fp8"


def test_pinning_needs_twice_the_offloaded_ram() -> None:
    pinned = choose_rung(LADDER, 4_500, 20_000).option
    assert pinned.plan.pinned
    unpinned = choose_rung(LADDER, 4_500, 10_000)
    assert unpinned.option.rung == "offload_blocks" and not unpinned.option.plan.pinned
    assert "unpinned: pinning needs 14000 MB of RAM" in unpinned.because


# (now, then, reload s) -> unload?  steps: 20
@pytest.mark.parametrize(
    "now, then, reload_s, go",
    [
        (None, LADDER[6], 60.0, True),  # nothing fits without unloading: always
        (LADDER[2], LADDER[0], 1.0, True),  # fp8 -> full: 20 x 0.1 s = 2 s saved > 1 s
        (LADDER[2], LADDER[0], 5.0, False),  # 2 s saved < 5 s reload
        (LADDER[6], LADDER[0], 60.0, True),  # sequential -> full: 100 s saved
        (LADDER[0], LADDER[0], 0.0, False),  # no faster rung to buy
        (LADDER[2], None, 0.0, False),
    ],
)
def test_unload_chat_only_when_the_faster_rung_is_worth_the_reload(now, then, reload_s, go):
    ok, why = worth_unloading(now, then, 20, reload_s, "1 chat model(s)")
    assert ok is go
    assert ("kept" in why) is (not go)


def sizes() -> PipelineSizes:
    """A UNet of 400 MB in four 75 MB blocks, a 100 MB text encoder, a 60 MB VAE."""
    return PipelineSizes(
        (
            ComponentSize("unet", 400 * M, (75 * M,) * 4, 20 * M, 40 * M),
            ComponentSize("text_encoder", 100 * M, (), 10 * M, 1 * M),
            ComponentSize("vae", 60 * M, (), 5 * M, 2 * M, group_offload=False),
        )
    )


GPU = Context(bytes_per=4, on_cpu=False, streams=True)


@pytest.mark.parametrize(
    "rung, keep, ctx, device_mb, host_mb",
    [
        ("full", (), GPU, 560, 0),
        ("vae_tiling", (), GPU, 560, 0),
        # the UNet's 400 MB but its 40 MB of norms in 1 byte per weight instead of 4
        ("fp8", (), GPU, 560 - 360 * 3 / 4, 0),
        # the VAE stays whole (its class refuses group offload), the UNet runs its 100 MB
        # outside the blocks and 2 blocks in flight (streams); the encoder 100 MB
        ("offload_blocks", (), GPU, 60 + max(100 + 2 * 75, 100), 500),
        ("offload_blocks", ("unet",), GPU, 60 + 400 + 100, 100),
        ("offload_blocks", (), Context(4, False, streams=False), 60 + 100 + 75, 500),
        ("offload_model", (), GPU, 400, 560),
        ("sequential", (), GPU, 60 + 2 * 20, 500),
        # on the CPU offloading to the CPU saves nothing: the weights all count
        ("offload_model", (), Context(4, True, False), 560, 0),
        ("sequential", (), Context(2, True, False), 280, 0),
    ],
)
def test_each_rung_needs_its_rule_of_the_weights(rung, keep, ctx, device_mb, host_mb) -> None:
    need = RUNGS[rung].need(RungPlan(rung, keep), sizes(), ctx)
    assert need.device_mb == pytest.approx(device_mb)
    assert need.host_mb == pytest.approx(host_mb)


def test_block_offload_keeps_the_denoiser_first_then_the_smaller() -> None:
    plans = RUNGS["offload_blocks"].plans(sizes())
    # The VAE's class refuses group offload: it stays whole in every plan.
    assert [p.keep for p in plans] == [("unet",), ()]


def _write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header = {k: {"dtype": "F32", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_sizes_from_safetensors_headers(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "X",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderOobleck"],
                "scheduler": ["diffusers", "X"],
            }
        )
    )
    _write_safetensors(
        tmp_path / "transformer" / "diffusion_pytorch_model.safetensors",
        {
            "x_embedder.weight": [8, 4],
            "transformer_blocks.0.attn.to_q.weight": [8, 8],
            "transformer_blocks.0.norm1.linear.weight": [8, 8],
            "transformer_blocks.1.attn.to_q.weight": [8, 8],
            "norm_out.linear.weight": [4, 8],
        },
    )
    _write_safetensors(tmp_path / "vae" / "model.safetensors", {"decoder.conv.weight": [3, 3]})
    found = read_sizes(tmp_path)
    den, vae = found.components
    assert den.name == "transformer" and den.denoiser and den.elements == 32 + 64 * 3 + 32
    assert den.blocks == (128, 64) and den.unmatched == 64 and den.largest_leaf == 64
    assert den.fp8_kept == 64 + 32  # the blocks' norm1 and norm_out
    assert vae.name == "vae" and vae.group_offload is False and vae.elements == 9


def test_allowed_rungs() -> None:
    every, _ = allowed_rungs("auto", "auto", on_cpu=False, unsupported={})
    assert every == ["full", "vae_tiling", "fp8", "offload_blocks", "offload_model", "sequential"]
    cpu, why = allowed_rungs("auto", "off", on_cpu=True, unsupported={})
    assert cpu == ["full", "vae_tiling"] and "fp8: off in config" in why
    skip, why = allowed_rungs("auto", "auto", on_cpu=False, unsupported={"fp8": "no"})
    assert "fp8" not in skip and "fp8: unsupported (no)" in why
    assert allowed_rungs("offload_model", "auto", on_cpu=True, unsupported={})[0] == [
        "offload_model"
    ]


def test_after_steps_down_and_skips_a_whole_unsupported_rung() -> None:
    ladder = RungLadder("cuda:0", tuple(LADDER), steps=20)
    assert ladder.after(LADDER[0]) is LADDER[1]
    assert ladder.after(LADDER[3]) is LADDER[4]
    assert ladder.after(LADDER[3], skip_rung=True) is LADDER[5]
    assert ladder.after(LADDER[6]) is None


def test_learning_is_per_rung_and_estimates_say_so(tmp_path: Path) -> None:
    learned = LearnedMemory(tmp_path, learn_after=2)
    speeds = RungSpeeds(tmp_path)
    base = "/p|float32|cuda:0"
    request = LadderRequest(
        device="cuda:0",
        base_key=base,
        size=RequestSize(4096, "latent elements", "width", "1 x 64x64 image"),
        steps=10,
        sizes=sizes(),
        ctx=GPU,
        prior_mb=100,
        placement="auto",
        fp8="auto",
        pin=True,
        loaded=None,
        unsupported={},
    )
    first = {o.label: o for o in build_ladder(learned, speeds, request).options}
    # Weights (560 MB) above the configured 100 MB: full's need is the weights, estimated.
    assert first["full"].need_mb == 560 and first["full"].source == "estimated"
    assert first["offload_model"].source == "estimated" and first["offload_model"].need_mb == 400
    # Two runs measured at offload_model teach that rung alone.
    key = rung_key(base, "offload_model")
    for size, working in ((2048, 30.0), (4096, 50.0)):
        learned.record_run(key, "latent elements", size, working, predicted_mb=None, resident_mb=0)
        speeds.record(key, size, 2.0)
    speeds.record(base, 4096, 0.8)
    after = {o.label: o for o in build_ladder(learned, speeds, request).options}
    assert after["offload_model"].source == "learned"
    assert after["offload_model"].need_mb == pytest.approx(400 + 50 * 1.1, abs=0.5)
    assert after["full"].source == "estimated" and after["full"].need_mb == 560
    assert after["offload_model"].speed == pytest.approx(2.5) and after["full"].speed == 1.0
    assert after["offload_model"].speed_source == "measured"
    assert learned.view(base) is None or learned.view(base).samples == 0
    speeds.save()
    assert RungSpeeds(tmp_path).step_s(key, 4096) == pytest.approx(2.0)


def test_unsupported_marks_are_kept_per_folder_and_diffusers_version(tmp_path, monkeypatch):
    from services.generation import rung_speeds

    folder = tmp_path / "sdxl"
    speeds = RungSpeeds(tmp_path)
    speeds.mark_unsupported(str(folder), "offload_blocks", "casts by weight device")
    speeds.save()
    kept = RungSpeeds(tmp_path)
    assert kept.unsupported_for(str(folder)) == {"offload_blocks": "casts by weight device"}
    assert kept.unsupported_for(str(tmp_path / "flux")) == {}  # another folder: none
    # A file from before the marks were kept loads with none, its speeds intact.
    (tmp_path / rung_speeds.STATE_FILE).write_text('{"version": 1, "step_s": {"k": [[1, 2]]}}')
    old = RungSpeeds(tmp_path)
    assert old.unsupported_for(str(folder)) == {} and old.step_s("k", 1) == 2
    # Another diffusers release may support the rung: its marks start empty.
    monkeypatch.setattr(rung_speeds, "_diffusers_release", lambda: "99.0")
    assert kept.unsupported_for(str(folder)) == {}


# ---- the gate's choice over a fake card ---------------------------------------------


class Chat:
    """LLM workers holding given MB of the fake card, each reloading in given seconds."""

    def __init__(self, probe: FakeGpuProbe, mb: float, reload_s: float) -> None:
        self.probe, self.mb, self.reload_s = probe, mb, reload_s
        self.calls: list[str] = []
        self.res: Any = None

    def attach(self, ledger: Any) -> None:
        if self.mb:
            self.res = ledger.reserve("cuda:0", self.mb, "model:medium", "model")
            self.ledger = ledger

    def heavy_slots(self) -> dict[str, str]:
        return {"cuda:0": "medium"} if self.res is not None else {}

    def unload_cost(self, device: str) -> UnloadCost:
        if self.res is None:
            return UnloadCost()
        return UnloadCost(False, 1, self.mb, self.reload_s)

    async def unload_heavy_slot(self, reason: str, device: str | None = None) -> UnloadResult:
        self.calls.append("heavy")
        self.probe.set_used(self.probe.used_mb - self.mb)
        self.ledger.release(self.res)
        self.res = None
        return UnloadResult(["medium"], 0, self.mb)

    async def unload_all(self, reason: str, device: str | None = None) -> UnloadResult:
        self.calls.append("all")
        return UnloadResult([], 0, 0)

    def restore_soon(self, tiers: list[str]) -> None:
        pass


# usable = 12288 - used - 1024 reserve; the chat model holds ``chat`` MB of ``used``.
# (used, chat MB, reload s) -> rung chosen, unload calls
@pytest.mark.parametrize(
    "used, chat, reload_s, rung, calls",
    [
        (1000, 0, 0.0, "full", []),
        # 6264 usable: block offload keeping the UNet (1.05x) beats fp8 (1.1x); full not
        (5000, 0, 0.0, "offload_blocks", []),
        (5000, 4000, 0.5, "full", ["heavy"]),  # 1 s saved over 20 steps > 0.5 s reload
        (5000, 4000, 30.0, "offload_blocks", []),  # 1 s saved < 30 s: the chat model stays
        (10_000, 4000, 30.0, "offload_blocks", ["heavy"]),  # 99 s saved over sequential
        (10_500, 0, 0.0, "sequential", []),
    ],
)
@pytest.mark.anyio
async def test_the_gate_chooses_the_rung(make_settings, used, chat, reload_s, rung, calls):
    probe = FakeGpuProbe(total_mb=12_288, used_mb=used)
    settings = make_settings(memory={"reserve_vram_mb": 1024})
    placement = placement_for(settings, probe)
    models = Chat(probe, chat, reload_s)
    models.attach(placement.ledger)
    gate = MemoryGate(settings, placement, models)
    ladder = RungLadder("cuda:0", tuple(LADDER), steps=20)
    async with gate.heavy_task(1, "image: t", kind="image", ladder_on=lambda d: ladder) as task:
        assert task.decision.rung == rung and task.rung.rung == rung
        assert task.required_mb == task.rung.need_mb
        held = [r.mb for r in placement.ledger.entries() if r.kind == "task"]
        assert held == [task.rung.need_mb]  # the reservation settled to the chosen need
    assert models.calls == calls
    line = task.decision.log_line()
    assert f"rung={rung} because" in line and "fastest rung that fits" in line
    if chat and not calls:
        assert any(a.startswith("kept 1 chat model") for a in task.decision.actions)


@pytest.mark.anyio
async def test_fitting_no_rung_is_refused_at_once_with_the_figures(make_settings) -> None:
    probe = FakeGpuProbe(total_mb=12_288, used_mb=11_800)
    settings = make_settings(memory={"reserve_vram_mb": 1024})
    placement = placement_for(settings, probe)
    models = Chat(probe, 0, 0.0)
    gate = MemoryGate(settings, placement, models)
    ladder = RungLadder("cuda:0", tuple(LADDER), steps=20)
    with pytest.raises(InsufficientMemory) as info:
        async with gate.heavy_task(1, "image: t", kind="image", ladder_on=lambda d: ladder):
            pytest.fail("must not run")
    message = info.value.message
    assert "no rung fits: the smallest, sequential, needs 600 MB" in message
    assert info.value.details["required_vram_mb"] == 600 and models.calls == []
    assert [r for r in placement.ledger.entries() if r.kind == "task"] == []
