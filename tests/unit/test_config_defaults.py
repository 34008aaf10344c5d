"""Config checks of defaults and limits: a default above its own maximum is refused when
the config is read (naming both keys), not by a 422 on every request that omits the field;
the retention limits; the demo config preloads the image pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.errors import ConfigError
from services.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, data: dict) -> object:
    path = tmp_path / "edison.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(path, check_paths=False)


@pytest.mark.parametrize(
    ("kind", "section", "default", "limit"),
    [
        (
            "music",
            {"default_duration_s": 10, "max_duration_s": 2},
            "default_duration_s",
            "max_duration_s",
        ),
        ("image", {"default_steps": 30, "max_steps": 20}, "default_steps", "max_steps"),
        ("video", {"default_steps": 51}, "default_steps", "max_steps"),
    ],
    ids=["music-duration", "image-steps", "video-steps-over-the-default-max"],
)
def test_a_default_above_its_maximum_is_refused_at_load_naming_both_keys(
    tmp_path: Path, kind: str, section: dict, default: str, limit: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"generation": {kind: section}})
    message = err.value.message
    assert f"generation.{kind}" in message and default in message and limit in message


def test_defaults_at_their_maximum_load(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        {
            "generation": {
                "music": {"default_duration_s": 2, "max_duration_s": 2},
                "image": {"default_steps": 20, "max_steps": 20},
            }
        },
    )
    assert settings.generation.music.default_duration_s == 2  # type: ignore[attr-defined]
    assert settings.generation.image.default_steps == 20  # type: ignore[attr-defined]


def test_retention_limits_are_bounded_and_can_be_switched_off(tmp_path: Path) -> None:
    default = load(tmp_path, {})
    assert default.server.outputs_max_age_h == 168  # type: ignore[attr-defined]
    assert default.server.outputs_max_mb == 10240  # type: ignore[attr-defined]
    off = load(tmp_path, {"server": {"outputs_max_age_h": None, "outputs_max_mb": None}})
    assert off.server.outputs_max_age_h is None and off.server.outputs_max_mb is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="server.outputs_max_mb"):
        load(tmp_path, {"server": {"outputs_max_mb": 0}})


def test_the_demo_config_preloads_the_image_pipeline() -> None:
    """`make run`'s first image would otherwise pay the pipeline's load (8 s against 0.7 s
    for the second, measured when the issue was filed)."""
    demo = load_settings(ROOT / "config" / "demo.yaml", check_paths=False)
    assert demo.generation.image.preload is True
