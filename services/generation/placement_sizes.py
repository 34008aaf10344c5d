"""What each component of a pipeline folder weighs, read from its safetensors headers.

The placement ladder (``placement_ladder.py``) estimates a rung's resident weights from
these figures before the rung has been measured: the whole component (full residency),
one block at a time (group offload at block level: a block is an element of a top-level
``ModuleList``/``Sequential``, which is how diffusers groups them), the largest leaf
module (leaf-level offload), or the denoiser stored in fp8 (layerwise casting keeps the
layers its skip patterns name in the load dtype). Headers only: nothing is loaded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.generation.sizing import tensor_elements

log = logging.getLogger("edison.generation")

MB = 1024 * 1024
DENOISERS = ("transformer", "unet")
# diffusers' DEFAULT_SKIP_MODULES_PATTERN (hooks/layerwise_casting.py): layers kept in the
# compute dtype when the denoiser's weights are stored in fp8.
FP8_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
_BLOCK = re.compile(r"^([^.]+)\.(\d+)\.")


@dataclass(frozen=True)
class ComponentSize:
    """One torch component of a pipeline folder (unet, transformer, vae, text_encoder...)."""

    name: str
    elements: int
    blocks: tuple[int, ...]  # elements of each block, in order
    largest_leaf: int  # elements of the largest leaf module
    fp8_kept: int  # elements layerwise casting leaves in the load dtype
    group_offload: bool = True  # the class allows diffusers' group offload

    @property
    def denoiser(self) -> bool:
        return self.name in DENOISERS

    @property
    def unmatched(self) -> int:
        """Elements outside every block: onloaded together while the component runs."""
        return self.elements - sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


@dataclass(frozen=True)
class PipelineSizes:
    """Every torch component of a folder, the denoiser first."""

    components: tuple[ComponentSize, ...]

    @property
    def elements(self) -> int:
        return sum(c.elements for c in self.components)

    @property
    def denoiser(self) -> ComponentSize | None:
        return next((c for c in self.components if c.denoiser), None)

    def mb(self, elements: float, bytes_per: float) -> float:
        return elements * bytes_per / MB


def component_size(name: str, tensors: dict[str, int], group_offload: bool = True) -> ComponentSize:
    """Blocks, leaves and fp8-kept elements of one component, from its tensor names."""
    blocks: dict[tuple[str, int], int] = {}
    leaves: dict[str, int] = {}
    kept = 0
    for key, n in tensors.items():
        m = _BLOCK.match(key)
        if m is not None:
            block = (m.group(1), int(m.group(2)))
            blocks[block] = blocks.get(block, 0) + n
        module = key.rsplit(".", 1)[0]
        leaves[module] = leaves.get(module, 0) + n
        if any(re.search(p, module) for p in FP8_SKIP):
            kept += n
    return ComponentSize(
        name=name,
        elements=sum(tensors.values()),
        blocks=tuple(blocks[k] for k in sorted(blocks)),
        largest_leaf=max(leaves.values(), default=0),
        fp8_kept=kept,
        group_offload=group_offload,
    )


def read_sizes(folder: Path) -> PipelineSizes:
    """The torch components of a pipeline folder (``model_index.json`` names them)."""
    try:
        index: dict[str, Any] = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    comps = []
    for name, spec in index.items():
        if name.startswith("_") or not (folder / name).is_dir():
            continue
        tensors = tensor_elements(folder / name)
        if tensors:
            comps.append(component_size(name, tensors, _allows_group_offload(spec)))
    comps.sort(key=lambda c: (not c.denoiser, c.elements))
    return PipelineSizes(tuple(comps))


def _allows_group_offload(spec: Any) -> bool:
    """False for a diffusers class that says its forward cannot be group-offloaded
    (``_supports_group_offloading = False``, e.g. AutoencoderOobleck). Reads the class
    attribute only; the start-up has imported diffusers already."""
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == "diffusers"):
        return True
    try:
        import diffusers

        cls = getattr(diffusers, str(spec[1]), None)
    except Exception as exc:  # noqa: BLE001 - an estimate must not fail a request
        log.debug("Could not read %s's group-offload support: %s", spec, exc)
        return True
    return bool(getattr(cls, "_supports_group_offloading", True))
