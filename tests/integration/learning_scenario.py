"""Run by test_memory_learning in a fresh process: a warm-up, then four image sizes
through the real registry, each predicted then run and measured. The resident high-water mark is
process-wide, so a clean process keeps other tests' threads and heaps out of the peaks.

    python -m tests.integration.learning_scenario PIPELINE_FOLDER STATE_DIR  (prints JSON)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Pixels per side: three to learn from, the fourth predicted. Sizes whose working memory is
# tens of MB, so that a few MB of allocator noise is a small share of it.
SIZES = (160, 208, 256, 288)


async def scenario(folder: str, state_dir: str) -> dict:
    from services.generation.params import GenerationParams
    from services.generation.registry import PipelineRegistry
    from services.memory.learning import fit_line
    from services.memory.ledger import MemoryLedger
    from services.memory.placement import Placement
    from services.memory.probe import MemoryProbe
    from services.settings import Settings

    settings = Settings(
        generation={"image": {"pipeline": folder, "required_ram_mb": 64}},
        memory={"learn_after": 3, "state_dir": state_dir, "reserve_ram_mb": 0},
    )
    placement = Placement(
        settings, MemoryProbe(), MemoryLedger(reserve_vram_mb=0, reserve_ram_mb=0)
    )
    registry = PipelineRegistry(settings, placement)
    shape = await registry.shape("image")
    runs = []
    try:
        # A first run after a load also pays one-time work (kernels, caches): run it
        # unmeasured, so the fit sees the pipeline's steady working memory.
        await registry.run("image", "cpu", GenerationParams("warm", steps=1, width=96, height=96))
        for px in SIZES:
            params = GenerationParams("a cat", steps=1, width=px, height=px, seed=1)
            predicted = registry.predict("image", "cpu", params, shape)
            result = await registry.run("image", "cpu", params, predicted=predicted)
            runs.append(
                {
                    "px": px,
                    "source": predicted.prediction.source,
                    "size": predicted.prediction.size,
                    "predicted_working_mb": predicted.prediction.working_mb,
                    "need_mb": predicted.need.mb,
                    "resident_mb": predicted.prediction.resident_mb,
                    "peak_mb": result.peak.working_mb,
                    "peak_sane": result.peak.sane,
                    "method": result.peak.method,
                }
            )
        model = registry.learned.pipelines[predicted.key]
        fit = fit_line([(x.size, x.working_mb) for x in model.samples[:3]], 1.05)
        view = registry.learned.view(predicted.key)
        out = {
            "runs": runs,
            "vae_scale": shape.vae_scale,
            "latent_channels": shape.latent_channels,
            "fit_working_at_last": fit.working_mb(runs[-1]["size"]),
            "margin_at_last": fit.margin_at(runs[-1]["size"]),
            "samples": view.samples,
            "last_measured_mb": view.last_measured_mb,
        }
    finally:
        await registry.shutdown()
    out["ledger_after"] = len(placement.ledger.entries())
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(scenario(sys.argv[1], sys.argv[2]))))
