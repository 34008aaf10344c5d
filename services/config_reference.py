"""The config reference, generated from the settings' own descriptions."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from services.settings import Settings, TierSettings, VisionTierSettings


def _type_name(annotation: Any) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and args and get_origin(annotation) is not list:
        if all(isinstance(a, str) for a in args):
            return " \\| ".join(f"`{a}`" for a in args)
        return " or ".join(_type_name(a) for a in args) + (
            " or null" if len(args) < len(get_args(annotation)) else ""
        )
    if get_origin(annotation) is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    return f"`{value}`"


def _bounds(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        for attr, sym in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("min_length", "len >="),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        sub = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        key = f"{prefix}{name}"
        if sub:
            rows.extend(_rows(sub[0], f"{key}."))
            continue
        rows.append(
            f"| `{key}` | {_type_name(ann)} | {_default(info)} | {_bounds(info)} "
            f"| {info.description or ''} |"
        )
    return rows


def config_reference() -> str:
    """Markdown tables of every setting: key, type, default, bounds, description."""
    head = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    lines = head + [r for r in _rows(Settings, "") if not r.startswith("| `models.")]
    lines += [
        "",
        "Each tier under `models` (`fast`, `medium`, `deep`, `reasoning`, `vision`) "
        "takes these keys; `vision` also takes the `models.vision` keys after them (a key "
        "listed again there has vision's own default):",
        "",
    ]
    tier_rows = _rows(TierSettings, "models.<tier>.")
    base = TierSettings.model_fields
    vision_keys = [
        name
        for name, info in VisionTierSettings.model_fields.items()
        if name not in base or info.get_default() != base[name].get_default()
    ]
    tier_rows += [
        r
        for r in _rows(VisionTierSettings, "models.vision.")
        if any(r.startswith(f"| `models.vision.{name}`") for name in vision_keys)
    ]
    lines += head + tier_rows
    lines += ["", "Other `models` keys:", "", *head]
    lines += [
        r
        for r in _rows(Settings, "")
        if r.startswith("| `models.")
        and "models.fast" not in r
        and not any(f"models.{t}." in r for t in ("medium", "deep", "reasoning", "vision"))
    ]
    return "\n".join(lines)
