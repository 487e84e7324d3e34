"""`loopfm tune` pieces without Ray: the space translation, the objective, the output writers."""

from __future__ import annotations

import csv
import json
import math

import optuna
import pytest

from conftest import SMOKE
from loopfm.config import ConfigError, ParamSpec, load_config
from loopfm.tune.results import TrialRow, best_row, importances, pareto_front, write_outputs
from loopfm.tune.space import decode, encode_choice, optuna_space, serving_bytes, validate_space
from loopfm.tune.trial import Objective, config_for, trial_config

pytestmark = pytest.mark.timeout(60)


def test_default_space_translates_to_optuna_distributions_and_back():
    cfg = load_config()
    space = cfg.tune.space
    dists = optuna_space(space)
    assert set(dists) == set(space)
    assert dists["train.lr"] == optuna.distributions.FloatDistribution(5e-4, 5e-3, log=True)
    assert dists["train.kd_lambda"] == optuna.distributions.FloatDistribution(0.0, 2.0)
    assert dists["train.aux_head"].choices == (False, True)
    # list choices are sampled by their JSON label and decoded back into the list
    assert dists["embed.layers"].choices == ("[1]", "[2]", "[1, 2]")
    sampled = {k: d.to_external_repr(d.to_internal_repr(d.choices[-1] if hasattr(d, "choices") else d.high))
               for k, d in dists.items()}
    back = decode(sampled, space)
    assert back["embed.layers"] == [1, 2] and back["vm.pooling"] == "attention" and back["train.aux_head"] is True
    validate_space(cfg)
    variant = trial_config(cfg, sampled)
    assert variant.embed.layers == [1, 2] and variant.train.lr == pytest.approx(5e-3)
    assert variant.train.use_kd and variant.train.use_loopfm  # the default arm: kd_loopfm


def test_int_and_every_distribution_round_trip_through_an_optuna_study():
    space = {"features.seq_len": ParamSpec(type="int", low=4, high=16),
             "embed.layers": ParamSpec(type="categorical", choices=[[1], [1, 2]]),
             "vm.loopfm_width": ParamSpec(type="categorical", choices=[None, 8]),
             "train.lr": ParamSpec(type="loguniform", low=1e-4, high=1e-2)}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen = []
    for _ in range(8):
        t = study.ask(fixed_distributions=optuna_space(space))
        values = decode(t.params, space)
        assert isinstance(values["features.seq_len"], int) and 4 <= values["features.seq_len"] <= 16
        assert values["embed.layers"] in ([1], [1, 2]) and values["vm.loopfm_width"] in (None, 8)
        study.tell(t, float(values["features.seq_len"]))
        seen.append(values["embed.layers"])
    assert encode_choice([1, 2]) == "[1, 2]" and encode_choice(None) is None


def test_bad_spaces_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="low < high"):
        load_config(SMOKE, ["tune.space={train.lr: {type: float, low: 1, high: 1}}"])
    with pytest.raises(ConfigError, match="choices"):
        load_config(SMOKE, ["tune.space={vm.pooling: {type: categorical, choices: []}}"])
    cfg = load_config(SMOKE, ["tune.space={vm.nope: {type: categorical, choices: [1, 2]}}"])
    with pytest.raises(ValueError, match="vm.nope"):
        validate_space(cfg)
    cfg = load_config(SMOKE, ["tune.space={vm.pooling: {type: categorical, choices: [mean, max]}}"])
    with pytest.raises(ValueError, match="vm.pooling='max'"):
        validate_space(cfg)
    with pytest.raises(ValueError, match="whole bounds"):
        optuna_space({"features.seq_len": ParamSpec(type="int", low=1.5, high=4)})
    with pytest.raises(ValueError, match="low > 0"):
        optuna_space({"train.lr": ParamSpec(type="loguniform", low=0.0, high=1.0)})
    with pytest.raises(ValueError, match="not one of the choices"):
        decode({"vm.pooling": "max"}, {"vm.pooling": ParamSpec(type="categorical", choices=["mean"])})


def test_objective_is_the_metric_at_the_best_auc_epoch_and_serving_bytes_is_l_times_width():
    cfg = load_config(SMOKE)
    assert serving_bytes(cfg) == 8 * 16 // 2  # L=8 x width 16 at int4 (half a byte each)
    assert serving_bytes(cfg.updated({"vm.loopfm_width": 8, "embed.compress.dtype": "fp16"})) == 8 * 8 * 2
    epochs = [{"epoch": 0, "valid/auc": 0.60, "valid/ne": 0.95, "valid/logloss": 0.50},
              {"epoch": 1, "valid/auc": 0.58, "valid/ne": 0.90, "valid/logloss": 0.45},  # NE better, AUC worse
              {"epoch": 2, "valid/auc": float("nan"), "valid/ne": 0.80, "valid/logloss": float("nan")}]
    by_auc = Objective("ne", serving_bytes=64, select_by="auc")
    a, b, c = (by_auc(m) for m in epochs)
    assert a["objective"] == b["objective"] == c["objective"] == 0.95  # the kept epoch is 0 (best AUC)
    assert b["best_epoch"] == 1 and b["best_valid_auc"] == 0.60 and b["serving_bytes"] == 64
    assert b["valid/ne"] == 0.90  # the epoch's own metrics pass through
    by_logloss = Objective("ne", serving_bytes=64, select_by="logloss")  # as train_vm keeps it
    assert [by_logloss(m)["objective"] for m in epochs] == [0.95, 0.90, 0.90]
    assert config_for(cfg, {}).train.num_workers == 1  # Train's local mode cannot run in a Tune trial


def _rows():
    rows = []
    for i, (obj, sb, pool, layers) in enumerate([(0.61, 64, "mean", [1]), (0.65, 128, "attention", [1, 2]),
                                                 (0.63, 32, "mean", [2]), (0.64, 256, "attention", [1])]):
        rows.append(TrialRow(trial_id=f"abc_{i:05d}", status="TERMINATED", epochs=2,
                             params={"train.kd_lambda": 0.1 * i, "vm.pooling": pool, "embed.layers": layers},
                             objective=obj, serving_bytes=sb, best_epoch=2,
                             metrics={"best_valid_auc": obj, "best_valid_ne": 1 - obj}, seconds=10.0))
    rows.append(TrialRow(trial_id="abc_00004", status="ERROR", epochs=0, params={"vm.pooling": "mean"},
                         objective=None, error="RuntimeError: boom"))
    return rows


def test_best_and_pareto_front():
    rows = _rows()
    assert best_row(rows, "auc").trial_id == "abc_00001"
    assert [r.trial_id for r in pareto_front(rows, "auc")] == ["abc_00002", "abc_00001"]
    assert best_row(rows, "ne").trial_id == "abc_00000"  # NE: lower is better
    assert [r.trial_id for r in pareto_front(rows, "ne")] == ["abc_00002", "abc_00000"]


def test_writer_outputs_one_row_per_trial_a_loadable_best_config_and_importances(tmp_path):
    cfg = load_config(SMOKE, ["tune.second_objective=serving_bytes",
                              "tune.space={train.kd_lambda: {type: float, low: 0, high: 1}, vm.pooling: "
                              "{type: categorical, choices: [mean, attention]}, embed.layers: "
                              "{type: categorical, choices: [[1], [2], [1, 2]]}}"])
    rows = _rows()
    manifest = write_outputs(rows, cfg, tmp_path)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r.trial_id for r in rows]
    assert table[1]["embed.layers"] == "[1, 2]" and table[4]["status"] == "ERROR" and table[4]["objective"] == ""
    md = (tmp_path / "results.md").read_text()
    assert md.count("| abc_") + md.count("| **abc_") == len(rows) and "**abc_00001**" in md
    best = load_config(tmp_path / "best_config.yaml")
    assert best.vm.pooling == "attention" and best.embed.layers == [1, 2]
    assert best.train.kd_lambda == pytest.approx(0.1) and best.train.use_kd and best.train.use_loopfm
    imp = json.loads((tmp_path / "importances.json").read_text())
    assert set(imp["importances"]) == set(cfg.tune.space) and imp["trials"] == 4
    assert math.isclose(sum(imp["importances"].values()), 1.0, rel_tol=1e-6)
    for png in ("objective.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["best"]["trial_id"] == "abc_00001" and manifest["pareto_front"] == ["abc_00002", "abc_00001"]


def test_importances_degrade_to_a_note_instead_of_failing():
    cfg = load_config(SMOKE)
    rows = _rows()[:1]
    assert importances(rows, cfg)["note"].startswith("needs at least 2")
    same = [TrialRow(trial_id=f"t_{i}", status="TERMINATED", epochs=1, params={"vm.pooling": "mean",
                     "train.kd_lambda": 0.5}, objective=0.6) for i in range(3)]
    assert "no parameter" in importances(same, cfg)["note"]
