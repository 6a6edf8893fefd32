"""Config loading: YAML + dotted overrides, typed validation, and helpful errors for mistyped keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memtrain.config import Config, ConfigError, apply_overrides, load_config, parse_override, save_config


def test_defaults_follow_the_paper() -> None:
    cfg = load_config()
    assert (cfg.rl.group_size, cfg.rl.imr_group_size, cfg.rl.imr_lambda) == (8, 8, 0.5)
    assert (cfg.rl.clip_low, cfg.rl.clip_high, cfg.rl.kl_coef) == (0.2, 0.2, 1e-3)
    assert (cfg.agent.chunk_tokens, cfg.agent.memory_tokens, cfg.agent.max_chunks) == (5120, 1024, 8)
    assert cfg.rl.loss_agg == "seq_mean_token_mean"


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        ("rl.group_size=8", ["rl", "group_size"], 8),
        ("optim.lr=1e-6", ["optim", "lr"], 1e-6),
        ("model.name=Qwen/Qwen3-4B-Instruct-2507", ["model", "name"], "Qwen/Qwen3-4B-Instruct-2507"),
        ("rl.dynamic_filter=false", ["rl", "dynamic_filter"], False),
        ("optim.betas=[0.9, 0.95]", ["optim", "betas"], [0.9, 0.95]),
        ("data.path=", ["data", "path"], ""),
    ],
)
def test_parse_override(item: str, path: list[str], value: object) -> None:
    assert parse_override(item) == (path, value)


@pytest.mark.parametrize("bad", ["rl.group_size", "=3", "rl.x=[1,"])
def test_parse_override_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"rl": {"group_size": 4, "imr_group_size": 2}, "train": {"steps": 5}}))
    cfg = load_config(f, ["rl.group_size=6", "agent.chunk_tokens=256"])
    assert cfg.rl.group_size == 6 and cfg.rl.imr_group_size == 2
    assert cfg.train.steps == 5 and cfg.agent.chunk_tokens == 256


def test_overrides_do_not_mutate_input() -> None:
    raw = {"rl": {"group_size": 4}}
    out = apply_overrides(raw, ["rl.group_size=2"])
    assert raw == {"rl": {"group_size": 4}} and out["rl"]["group_size"] == 2


def test_unknown_key_names_key_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["rl.grup_size=8"])
    msg = str(exc.value)
    assert "rl.grup_size" in msg and "did you mean 'rl.group_size'" in msg


def test_unknown_section_suggests(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optimm:\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert str(f) in str(exc.value) and "did you mean 'optim'" in str(exc.value)


def test_wrong_type_is_reported_with_value() -> None:
    with pytest.raises(ConfigError, match=r"rl\.group_size.*'many'"):
        load_config(None, ["rl.group_size=many"])
    with pytest.raises(ConfigError, match=r"rl\.loss_agg"):
        load_config(None, ["rl.loss_agg=sum"])


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(f, ["rl.group_size.x=1"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("rl: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_save_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["rl.group_size=3", "model.name=x"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")))
def test_shipped_configs_validate(path: Path) -> None:
    if "verl" in path.parts:
        pytest.skip("verl configs are validated by the verl backend tests")
    load_config(path)
