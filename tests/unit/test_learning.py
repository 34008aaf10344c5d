"""Learned memory from numbers: the fit, the prior, out-of-memory floors, persistence,
impossible measurements, worker overheads, and request sizing from a folder's config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from services.generation.params import GenerationParams
from services.generation.sizing import read_shape, request_size
from services.memory.learning import MIN_MARGIN, STATE_VERSION, LearnedMemory, fit_line
from services.memory.peak import PeakReading

KEY = "/p/image|float32|cpu"
UNIT = "latent elements"


def learned(tmp_path: Path, **kw) -> LearnedMemory:
    return LearnedMemory(tmp_path / "state", learn_after=3, margin_factor=1.05, **kw)


def feed(mem: LearnedMemory, points: list[tuple[float, float]], key: str = KEY) -> None:
    for size, working in points:
        assert mem.record_run(key, UNIT, size, working, predicted_mb=None, resident_mb=10.0)


def test_fit_line_finds_the_line_and_never_a_margin_below_the_floor() -> None:
    fit = fit_line([(1000, 12.0), (2000, 22.0), (3000, 32.0)], 1.05)
    assert fit.a_mb == pytest.approx(2.0) and fit.b_mb_per_unit == pytest.approx(0.01)
    assert fit.margin == MIN_MARGIN  # an exact line: 1.0 x 1.05 < 1.1
    assert fit.working_mb(2500) == pytest.approx(27.0 * MIN_MARGIN)
    # Beyond the largest size measured the margin widens: 4000 is a third beyond 3000.
    assert fit.working_mb(4000) == pytest.approx(42.0 * MIN_MARGIN * (1 + 0.25 / 3))


def test_fit_line_margin_follows_the_worst_sample() -> None:
    fit = fit_line([(1000, 10.0), (2000, 30.0), (3000, 30.0)], 1.05)
    worst = max(y / fit.fitted_mb(x) for x, y in [(1000, 10.0), (2000, 30.0), (3000, 30.0)])
    assert fit.margin == pytest.approx(worst * 1.05)
    for x, y in [(1000, 10.0), (2000, 30.0), (3000, 30.0)]:
        assert fit.working_mb(x) >= y  # the margin covers every measured peak


def test_fit_line_never_lets_memory_shrink_with_size() -> None:
    fit = fit_line([(1000, 30.0), (2000, 20.0), (3000, 10.0)], 1.05)
    assert fit.b_mb_per_unit == 0 and fit.a_mb == pytest.approx(20.0)


def test_the_prior_stands_until_learn_after_runs(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    feed(mem, [(1000, 12.0), (2000, 22.0)])
    p = mem.predict(KEY, UNIT, 4000, prior_mb=4000, resident_mb=10)
    assert (p.source, p.need_mb, p.working_mb) == ("prior", 4000, None)
    feed(mem, [(3000, 32.0)])
    p = mem.predict(KEY, UNIT, 2500, prior_mb=4000, resident_mb=10)
    assert p.source == "learned"
    assert p.need_mb == pytest.approx(10 + 27.0 * MIN_MARGIN, abs=0.1)
    assert mem.predict(KEY, UNIT, 2500, prior_mb=4000, resident_mb=0).need_mb < p.need_mb


def test_an_oom_at_a_size_raises_that_size_and_above_only(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    feed(mem, [(1000, 12.0), (2000, 22.0), (3000, 32.0)])
    sizes = (1000, 3000, 9000)
    before = {s: mem.predict(KEY, UNIT, s, prior_mb=1, resident_mb=0).need_mb for s in sizes}
    reserved = before[3000]  # the run at 3000 ran out of memory with this much reserved
    mem.record_oom(KEY, UNIT, 3000, reserved)
    after = {s // 1000: mem.predict(KEY, UNIT, s, prior_mb=1, resident_mb=0) for s in sizes}
    assert after[3].need_mb == pytest.approx(reserved * 1.25, abs=0.1)
    assert after[3].need_mb > before[3000]
    assert after[3].oom_floor_mb == pytest.approx(reserved * 1.25)
    assert after[9].need_mb >= reserved * 1.25
    assert after[1].oom_floor_mb is None  # smaller requests keep their prediction


def test_impossible_measurements_are_dropped_and_logged(tmp_path: Path, caplog) -> None:
    mem = learned(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edison.memory"):
        assert not mem.record_run(KEY, UNIT, 1000, float("nan"), predicted_mb=None, resident_mb=1)
        assert not mem.record_run(KEY, UNIT, 1000, -5.0, predicted_mb=None, resident_mb=1)
        assert not mem.record_run(KEY, UNIT, 0, 5.0, predicted_mb=None, resident_mb=1)
    assert "dropped an impossible measurement" in caplog.text
    view = mem.view(KEY)
    assert view is not None and view.samples == 0 and view.dropped == 3


def test_a_peak_reading_below_its_baseline_is_not_sane() -> None:
    assert PeakReading(5.0, 0.0, 100.0, 105.0, "rss-hwm").sane
    assert not PeakReading(float("nan"), 0.0, 100.0, 90.0, "rss-hwm").sane
    assert not PeakReading(5.0, 0.0, 100.0, 90.0, "cuda-allocator").sane
    assert not PeakReading(-1.0, 0.0, 100.0, 105.0, "rss-hwm").sane


def test_two_pipelines_never_mix_their_samples(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    feed(mem, [(1000, 12.0), (2000, 22.0), (3000, 32.0)])
    feed(mem, [(10.0, 500.0)], key="/p/music|float32|cpu")
    assert mem.view(KEY).samples == 3 and mem.view("/p/music|float32|cpu").samples == 1
    music = mem.predict("/p/music|float32|cpu", UNIT, 10.0, prior_mb=2000, resident_mb=0)
    assert music.source == "prior"


def test_learned_models_survive_a_restart(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    feed(mem, [(1000, 12.0), (2000, 22.0), (3000, 32.0)])
    mem.record_oom(KEY, UNIT, 5000, 60.0)
    assert mem.record_worker_load("cuda:0", 1000.0, 1522.0)
    mem.save()
    again = learned(tmp_path)
    for size in (500, 3000, 6000):
        a = mem.predict(KEY, UNIT, size, prior_mb=1, resident_mb=5)
        b = again.predict(KEY, UNIT, size, prior_mb=1, resident_mb=5)
        assert a == b
    assert again.worker_overhead_mb("cuda:0") == 522.0
    assert again.view(KEY).resident_mb == 10.0


@pytest.mark.parametrize("text", ["{not json", '{"pipelines": 3}', "[]", ""])
def test_a_corrupt_state_file_is_logged_and_ignored(tmp_path: Path, caplog, text: str) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "memory-models.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="edison.memory"):
        mem = learned(tmp_path)
    assert "Ignoring the learned memory models" in caplog.text
    assert mem.pipelines == {} and mem.overheads == {}
    feed(mem, [(1000, 12.0)])
    mem.save()  # and the next save replaces it with a good file
    assert (
        json.loads((tmp_path / "state" / "memory-models.json").read_text())["version"]
        == STATE_VERSION
    )


def test_worker_overhead_is_the_prior_until_a_load_is_measured(tmp_path: Path) -> None:
    mem = learned(tmp_path, overhead_prior_mb=512)
    assert mem.worker_overhead_mb("cuda:0") == 512
    assert mem.record_worker_load("cuda:0", 2618.0, 2740.0)  # the H100 figures of LAB-NOTES
    assert mem.worker_overhead_mb("cuda:0") == pytest.approx(122.0)
    assert mem.record_worker_load("cuda:0", 100.0, 622.0)
    assert mem.worker_overhead_mb("cuda:0") == pytest.approx((122.0 + 522.0) / 2)
    assert mem.worker_overhead_mb("cpu") == 512  # per device
    assert not mem.record_worker_load("cuda:0", 100.0, float("nan"))


def write_folder(root: Path, kind: str) -> Path:
    """A pipeline folder's config files only: what sizing reads."""
    (root / "vae").mkdir(parents=True)
    if kind == "music":
        vae = {"sampling_rate": 16000, "audio_channels": 2, "downsampling_ratios": [2, 4, 4, 4]}
        (root / "transformer").mkdir()
        (root / "transformer" / "config.json").write_text(json.dumps({"sample_size": 2048}))
    else:
        vae = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    (root / "vae" / "config.json").write_text(json.dumps(vae))
    return root


def test_request_size_from_the_folder_config(tmp_path: Path) -> None:
    image = read_shape("image", write_folder(tmp_path / "i", "image"))
    assert (image.vae_scale, image.latent_channels, image.default_px) == (8, 4, 512)
    one = request_size(image, GenerationParams("x", width=512, height=512))
    four = request_size(image, GenerationParams("x", width=1024, height=1024, num_images=4))
    assert one.value == 4 * 64 * 64 and one.field == "width" and one.unit == UNIT
    assert four.value == 16 * one.value and four.field == "num_images"  # 4 images, 4x pixels
    assert request_size(image, GenerationParams("x")).value == one.value  # the default size
    video = read_shape("video", write_folder(tmp_path / "v", "video"))
    clip = request_size(video, GenerationParams("x", width=256, height=256, num_frames=16))
    assert clip.value == 16 * 4 * 32 * 32 and clip.field == "num_frames"
    music = read_shape("music", write_folder(tmp_path / "m", "music"))
    assert music.default_duration_s == pytest.approx(2048 * 128 / 16000)
    ten = request_size(music, GenerationParams("x", duration_s=10))
    assert ten.value == 10 * 16000 * 2 and ten.unit == "audio samples"
