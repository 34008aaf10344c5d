"""`edison make-demo`: the tiny models and pipelines the demo config and the tests use."""

from __future__ import annotations

from pathlib import Path

from services.demo.tiny_gguf import TinyShape, write_tiny_gguf
from services.demo.tiny_mmproj import TinyVisionShape, write_tiny_mmproj
from services.settings import KINDS

# Distinct files (and shapes) per tier, so the heavy slot and the estimator are visible.
DEMO_TIERS: dict[str, TinyShape] = {
    "fast": TinyShape(n_layer=2),
    "medium": TinyShape(n_layer=3),
    "deep": TinyShape(n_layer=4, n_ff=192),
    "reasoning": TinyShape(n_layer=4, n_embd=128, n_ff=256),
}
# The vision pair: a tiny llama language model and a projector into its embedding size.
DEMO_VISION = TinyShape(n_layer=2)
DEMO_PROJECTOR = TinyVisionShape(n_embd_text=DEMO_VISION.n_embd)
VISION_MODEL = "vision.gguf"
VISION_PROJECTOR = "vision-mmproj.gguf"


def write_vision_pair(out: Path, *, force: bool = True) -> list[Path]:
    """Write the vision language model and its projector under ``out`` (those missing,
    unless ``force``); return what was written."""
    made = []
    model, projector = out / VISION_MODEL, out / VISION_PROJECTOR
    if force or not model.is_file():
        made.append(write_tiny_gguf(model, DEMO_VISION, seed=len(DEMO_TIERS)))
    if force or not projector.is_file():
        made.append(write_tiny_mmproj(projector, DEMO_PROJECTOR, seed=len(DEMO_TIERS)))
    return made


def make_demo_assets(out: Path, *, force: bool = False) -> list[Path]:
    """Write whatever is missing under ``out``; return what was written."""
    made = []
    for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
        path = out / f"{tier}.gguf"
        if force or not path.is_file():
            made.append(write_tiny_gguf(path, shape, seed=i))
    made += write_vision_pair(out, force=force)
    for kind in KINDS:
        folder = out / "pipelines" / kind
        if force or not (folder / "model_index.json").is_file():
            from services.demo.tiny_pipelines import write_tiny_pipeline

            made.append(write_tiny_pipeline(kind, folder))
    return made
