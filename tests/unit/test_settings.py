"""Config: the real files, each kind of invalid value, env overrides (the CLI's refusal of
a bad config, as a real process, is in integration/test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.config_reference import config_reference
from services.errors import ConfigError
from services.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: object, name: str = "edison.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_documented_default_is_valid_with_seed_numbers() -> None:
    s = load_settings(ROOT / "config" / "edison.yaml", check_paths=False)
    assert s.generation.image.required_vram_mb == 4000
    assert s.generation.video.required_vram_mb == 6000
    assert s.generation.music.required_vram_mb == 4000
    assert s.ladder.gpu_layers == [32, 20, 12, 4, 0]
    assert s.ladder.context == [4096, 2048, 1024]
    assert s.swarm.degraded_threshold_mb == 5000
    assert list(s.models.tiers()) == ["fast", "medium", "deep", "reasoning", "vision"]


def test_defaults_without_file_sections(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "{}"))
    assert s.server.port == 8000 and s.models.tiers() == {}


def test_relative_paths_are_resolved_against_the_file(tmp_path: Path, tiny_dir: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (tmp_path / "m.gguf").write_bytes((tiny_dir / "fast.gguf").read_bytes())
    s = load_settings(write(sub, {"models": {"fast": {"path": "../m.gguf"}}}))
    assert s.models.fast.path == (sub / "../m.gguf")
    assert s.models.fast.path.is_file()


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"server": {"port": 0}}, "server.port", "greater than or equal to 1"),
        ({"server": {"port": "http"}}, "server.port", "integer"),
        ({"memory": {"reserve_vram_mb": -1}}, "memory.reserve_vram_mb", "greater than or equal"),
        ({"memory": {"vram_budget_mb": 10}}, "memory.vram_budget_mb", "256"),
        ({"memory": {"probe_timeout_s": 0}}, "memory.probe_timeout_s", "greater than 0"),
        ({"memory": {"colour": "red"}}, "memory.colour", "unknown key"),
        ({"gpu": {}}, "gpu", "unknown key"),
        ({"ladder": {"gpu_layers": [32, -4]}}, "ladder", ">= 0"),
        ({"ladder": {"context": []}}, "ladder.context", "at least 1"),
        ({"swarm": {"fallback_tier": "huge"}}, "swarm.fallback_tier", "fast"),
        ({"queue": {"max_waiting": -1}}, "queue.max_waiting", "greater than or equal"),
        ({"models": {"fast": {"n_ctx": 4096}}}, "models.fast.path", "required"),
        ({"generation": {"video": {"max_frames": 0}}}, "generation.video.max_frames", "greater"),
        ({"server": {"log_level": "loud"}}, "server.log_level", "debug"),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, data: dict, key: str, words: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    msg = err.value.message
    assert str(path) in msg
    assert f"{key}:" in msg
    assert words in msg


def test_worker_backend_per_tier_and_its_slots(tmp_path: Path, tiny_dir: Path) -> None:
    m = str(tiny_dir / "fast.gguf")
    data = {
        "models": {
            "backend": "llama-server",
            "llama_server_binary": "bin/llama-server",
            "fast": {"path": m},
            "medium": {"path": m, "parallel": 8},
            "deep": {"path": m, "backend": "llama-cpp-python"},
        }
    }
    s = load_settings(write(tmp_path, data))
    models = s.models
    assert models.llama_server_binary == tmp_path / "bin" / "llama-server"  # resolved
    assert [models.backend_of(t) for t in (models.fast, models.medium, models.deep)] == [
        "llama-server",
        "llama-server",
        "llama-cpp-python",
    ]
    assert [models.parallel_of(t) for t in (models.fast, models.medium, models.deep)] == [4, 8, 1]
    assert load_settings(write(tmp_path, {})).models.backend == "auto"
    for bad, words in (
        (
            {"backend": "llama-cpp-python", "fast": {"path": m, "parallel": 2}},
            "needs backend llama-server",
        ),
        ({"fast": {"path": m, "backend": "vllm"}}, "llama-server"),
        ({"fast": {"path": m, "backend": "llama-server", "parallel": 0}}, "greater than"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings(write(tmp_path, {"models": bad}))
        assert "models" in err.value.message and words in err.value.message


def test_unreadable_model_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"models": {"medium": {"path": "nowhere.gguf"}}})
    with pytest.raises(ConfigError, match=r"models\.medium\.path: cannot read file"):
        load_settings(path)


def test_missing_pipeline_folder(tmp_path: Path) -> None:
    path = write(tmp_path, {"generation": {"music": {"pipeline": "no-such-dir"}}})
    with pytest.raises(ConfigError, match=r"generation\.music\.pipeline: no diffusers pipeline"):
        load_settings(path)


@pytest.mark.parametrize(
    "text, words", [("server: [1, 2", "not valid YAML"), ("- a\n- b\n", "mapping")]
)
def test_malformed_files(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml")


def test_env_overrides_file_and_env_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, {"memory": {"reserve_vram_mb": 512}, "server": {"port": 9000}})
    monkeypatch.setenv("EDISON_CONFIG", str(path))
    monkeypatch.setenv("EDISON__MEMORY__RESERVE_VRAM_MB", "2048")
    s = load_settings()
    assert s.memory.reserve_vram_mb == 2048
    assert s.server.port == 9000


def test_invalid_env_override_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDISON__QUEUE__MAX_WAIT_S", "-3")
    with pytest.raises(ConfigError, match=r"queue\.max_wait_s"):
        load_settings(write(tmp_path, {}))


def test_readme_config_reference_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config_reference() in readme, "run `edison config-reference` and paste it in README.md"
