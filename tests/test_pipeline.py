"""`loopfm run` end to end on the smoke config: every stage, ending in the report."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SMOKE, copy_features_run
from loopfm.cli import main
from loopfm.config import DEFAULT_ARMS as ARMS
from loopfm.training.checkpoint import VMManifest


@pytest.mark.timeout(900)
def test_run_writes_the_report_with_every_arm_seed_and_claim(smoke_trained, smoke_config, tmp_path,
                                                             capsys):
    # data, FM, store and features are current: skipped (the session's VM left out: every VM trains here)
    run = copy_features_run(smoke_trained, tmp_path / "run")
    assert main(["run", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false"]) == 0
    out = capsys.readouterr().out
    for stage in ("data validate", "data split", "fm train", "embed"):
        assert f"{stage}" in out
    assert "fm train: " in out and "is current, skipped" in out

    report = json.loads((run.report / "report.json").read_text())
    assert set(report["arms"]) == set(ARMS)
    for arm in ARMS:
        for metric in ("auc", "gauc", "logloss", "ne"):
            assert report["arms"][arm][metric]["n"] == smoke_config.experiment.seeds
    assert set(report["fm"]) >= {"auc", "ne"}
    assert set(report["tr"]) == {"kd", "rawseq", "loopfm", "kd_loopfm"} and set(report["tr"]["kd"]) >= {"ne", "auc"}
    assert set(report["decomposition"]["auc"]) == {"gain_kd", "gain_loopfm", "gain_both", "interaction"}
    assert {"kd_vs_base", "loopfm_vs_base", "kd_loopfm_vs_kd", "loopfm_vs_rawseq"} <= set(report["comparisons"])
    assert set(report["fm_knowledge"]) == {"loopfm_vs_rawseq", "kd_loopfm_vs_rawseq"}
    assert len(report["claims"]) >= 7 and all(c["verdict"] in ("holds", "not shown", "reversed")
                                              for c in report["claims"])
    for name in ("report.md", "arms.png", "transfer.png"):
        assert (run.report / name).stat().st_size > 1000
    assert len(list((run.root / "vm").glob("*/seed*"))) == len(ARMS) * smoke_config.experiment.seeds

    # the report trains its VMs in one Train run (`train_vms`); each is the VM it would be alone:
    # the session's VM of the served arm, trained by itself, has the very same weights
    alone = smoke_trained[2]
    [together] = (run.root / "vm" / alone.arm).glob(f"seed{alone.seed}-*")
    assert VMManifest.read(together).model_version == alone.model_version

    # `loopfm report` alone finds every VM current and only re-evaluates
    assert main(["report", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false"]) == 0
    assert capsys.readouterr().out.count("is current, skipped") >= len(ARMS) * smoke_config.experiment.seeds

    # every VM trained again from scratch gives the same report, number for number
    shutil.rmtree(run.root / "vm")
    assert main(["report", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false"]) == 0
    again = json.loads((run.report / "report.json").read_text())
    assert again["arms"] == report["arms"] and again["comparisons"] == report["comparisons"]


@pytest.mark.timeout(600)
def test_ablate_trains_the_arm_for_each_value_and_writes_the_table(smoke_trained, smoke_config, tmp_path, capsys):
    run = copy_features_run(smoke_trained, tmp_path / "run")
    argv = ["ablate", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false",
            "--param", "vm.pooling", "--values", "mean,attention"]
    assert main(argv) == 0
    table = json.loads((run.report / "ablation_vm_pooling.json").read_text())
    assert [row["vm.pooling"] for row in table["rows"]] == ["mean", "attention"]
    assert all(row["auc"]["n"] == smoke_config.experiment.seeds for row in table["rows"])
    assert (run.report / "ablation_vm_pooling.png").stat().st_size > 1000
    assert len(list((run.root / "vm" / "loopfm").iterdir())) == 2 * smoke_config.experiment.seeds

    assert main([*argv[:-4], "--param", "vm.poolin", "--values", "mean"]) == 1
    assert "vm.poolin: unknown key" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_fm_replicates_each_get_their_fm_store_and_features(smoke_trained, tmp_path):
    """`experiment.fm_seeds`: one FM, store and feature set per replicate, every VM seed trained under each."""
    run = copy_features_run(smoke_trained, tmp_path / "run")
    argv = ["report", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false",
            "--set", "experiment.fm_seeds=[0,1]", "--set", "experiment.arms=[base,loopfm]",
            "--set", "experiment.seeds=1", "--set", "train.epochs=1"]  # VM epochs: not what is checked
    assert main(argv) == 0
    report = json.loads((run.report / "report.json").read_text())
    assert len(list((run.root / "fm").iterdir())) == 2  # replicate 0's FM was current, replicate 1's trained
    assert len(set(report["meta"]["store_versions"])) == 2 and len(set(report["meta"]["features"])) == 2
    assert report["fm"]["auc"]["n"] == 2 and report["arms"]["loopfm"]["auc"]["n"] == 2
    assert report["comparisons"]["loopfm_vs_base"]["auc"]["n"] == 2  # paired within each replicate
