"""The typed config: defaults, YAML, overrides and errors that name the key path."""

import pytest
import yaml

from conftest import REPO, SMOKE
from loopfm.config import ConfigError, LoopFMConfig, load_config


def test_defaults_validate_and_match_configs_default_yaml():
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert shipped == LoopFMConfig().model_dump(mode="json")


def test_smoke_config_loads():
    cfg = load_config(SMOKE)
    assert cfg.name == "smoke" and cfg.data.synthetic.num_users < LoopFMConfig().data.synthetic.num_users


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("vm:\n  poolin: mean\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "vm.poolin: unknown key" in msg and "pooling" in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["vm.pooling=max"])
    assert "vm.pooling" in str(err.value) and "'attention'" in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="fm"):
        load_config(overrides=["fm.d_model=30", "fm.n_heads=4"])
    with pytest.raises(ConfigError, match="prefix_widths"):
        load_config(overrides=["embed.compress.width=8", "embed.compress.prefix_widths=[4, 16]"])
    with pytest.raises(ConfigError, match="valid_quantile"):
        load_config(overrides=["data.split.valid_quantile=0.9", "data.split.test_quantile=0.8"])


def test_overrides_parse_yaml_values_and_updated_revalidates():
    cfg = load_config(overrides=["train.kd_lambda=0.25", "embed.layers=[1, 2]"])
    assert cfg.train.kd_lambda == 0.25 and cfg.embed.layers == [1, 2]
    assert cfg.updated({"vm.pooling": "sum"}).vm.pooling == "sum"
    with pytest.raises(ConfigError):
        cfg.updated({"vm.pooling": "bogus"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
