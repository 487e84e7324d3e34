"""One FM, many verticals: `data.vertical` as an int or a list, the fingerprints a single vertical
keeps, the report over several verticals, and a two-vertical run from one store (Ray).

The single-vertical fingerprints are checked against the expressions origin/main computed them
with, so the runs and committed results made before lists existed stay current.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMOKE
from loopfm.config import ConfigError, DataConfig, LoopFMConfig, load_config, stable_hash
from loopfm.datasets.splits import split_fingerprint, split_stage, surfaces_present
from loopfm.evaluation.report import build_report, build_verticals_report, write_report, write_verticals_report
from loopfm.features.stage import features_fingerprint
from loopfm.rundir import RunDir, write_manifest
from loopfm.training.ablation import ablate_stage
from loopfm.training.scale import scale_stage
from loopfm.training.vm import vm_fingerprint

# origin/main's split fingerprint, `stable_hash(events fingerprint, data.split, data.vertical)`, of
# events fingerprint "events-fp" under the default split and vertical 0
MAIN_SPLIT_FINGERPRINT = "73a3bb34c060"


def smoke(*overrides: str) -> LoopFMConfig:
    return load_config(SMOKE, ["ray.progress_bars=false", *overrides])


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("value, want, verticals", [
    ("0", 0, (0,)), ("2", 2, (2,)), ("[1]", 1, (1,)), ("[0,1]", [0, 1], (0, 1)), ("[2,0,1]", [2, 0, 1], (2, 0, 1))])
def test_vertical_is_one_surface_or_a_list(value, want, verticals):
    data = smoke(f"data.vertical={value}").data
    assert data.vertical == want and type(data.vertical) is type(want)  # a one-element list is that surface
    assert data.verticals == verticals


@pytest.mark.parametrize("value, says", [
    ("[]", "non-empty list"), ("[0,1,0]", "surfaces [0] appear more than once"), ("-1", "int >= 0"),
    ("[0,-1]", "int >= 0"), ("x", "int >= 0"), ("1.5", "int >= 0"), ("true", "int >= 0")])
def test_a_bad_vertical_is_refused_naming_the_field(value, says):
    with pytest.raises(ConfigError, match="data.vertical") as err:
        smoke(f"data.vertical={value}")
    assert says in str(err.value)


def test_a_vertical_without_events_is_refused_naming_value_and_surfaces():
    DataConfig(vertical=[2, 0]).check_verticals([0, 1, 2, 2])
    with pytest.raises(ConfigError) as err:
        DataConfig(vertical=[0, 4]).check_verticals(np.array([2, 0, 1]))
    assert str(err.value) == ("data.vertical: [0, 4] names surface(s) [4] with no events in the log; "
                              "the surfaces present are [0, 1, 2]")


def test_the_split_stage_refuses_an_absent_vertical_before_any_work(tmp_path):
    run = RunDir(tmp_path / "run")
    run.events.mkdir(parents=True)
    pq.write_table(pa.table({"surface": pa.array([0, 1, 1, 3], pa.int32())}), run.events / "part-0.parquet")
    write_manifest(run.events, {"fingerprint": "events-fp", "num_surfaces": 4})  # a JSON file beside the parquet
    assert surfaces_present(run.events) == [0, 1, 3]
    with pytest.raises(ConfigError, match=r"names surface\(s\) \[2\] .* surfaces present are \[0, 1, 3\]"):
        split_stage(smoke("data.vertical=[1,2]"), run)
    assert not run.splits.exists()


@pytest.mark.parametrize("stage", [
    lambda cfg, run: ablate_stage(cfg, run, "vm.pooling", "mean"), scale_stage])
def test_one_vertical_studies_refuse_a_list_by_name(stage, tmp_path):
    with pytest.raises(ConfigError, match=r"data.vertical: loopfm \w+ works on one vertical, got \[0, 1\]"):
        stage(smoke("data.vertical=[0,1]"), RunDir(tmp_path))


def test_per_vertical_configs_name_one_vertical_each():
    cfg = smoke("data.vertical=[1,0]")
    per = cfg.per_vertical()
    assert list(per) == [1, 0] and [c.data.vertical for c in per.values()] == [1, 0]
    assert per[0].model_dump() == smoke().model_dump()  # vertical 0 of the list is the single-vertical config
    single = smoke()
    assert single.per_vertical() == {0: single}


# ---------------------------------------------------------------- fingerprints

def test_a_single_vertical_keeps_the_split_fingerprint_of_origin_main():
    assert stable_hash("events-fp", DataConfig().split, 0) == MAIN_SPLIT_FINGERPRINT  # the expression on main
    assert split_fingerprint("events-fp", DataConfig()) == MAIN_SPLIT_FINGERPRINT
    assert split_fingerprint("events-fp", smoke().data) == MAIN_SPLIT_FINGERPRINT
    # a list hashes its first vertical: [0, 1] keeps vertical 0's splits (so its FM and store)
    assert split_fingerprint("events-fp", smoke("data.vertical=[0,1]").data) == MAIN_SPLIT_FINGERPRINT
    assert split_fingerprint("events-fp", smoke("data.vertical=[1,0]").data) == split_fingerprint(
        "events-fp", smoke("data.vertical=1").data) == stable_hash("events-fp", DataConfig().split, 1)
    assert split_fingerprint("events-fp", smoke("data.split.valid_quantile=0.6").data) != MAIN_SPLIT_FINGERPRINT


def test_each_vertical_of_a_list_has_the_features_and_vm_fingerprints_of_that_vertical_alone():
    info, store = SimpleNamespace(fingerprint="split-fp"), SimpleNamespace(store_version="store-v")
    single, per = smoke(), smoke("data.vertical=[0,1]").per_vertical()
    main = stable_hash("store-v", "split-fp", single.features, 0)  # the expression on origin/main
    assert features_fingerprint(single, info, store) == features_fingerprint(per[0], info, store) == main
    assert features_fingerprint(per[1], info, store) == features_fingerprint(smoke("data.vertical=1"), info, store)
    assert features_fingerprint(per[1], info, store) != main
    with pytest.raises(ConfigError, match="data.vertical"):
        features_fingerprint(smoke("data.vertical=[0,1]"), info, store)
    features = SimpleNamespace(fingerprint=main)
    assert vm_fingerprint(per[0], features) == vm_fingerprint(single, features)
    # the report's config hash: `[0]` is the config `0` was, to the byte
    assert stable_hash(smoke("data.vertical=[0]")) == stable_hash(single)
    assert single.data.model_dump(mode="json")["vertical"] == 0


# ---------------------------------------------------------------- the report over verticals

def _runs(auc: dict[str, list[float]]) -> dict[str, list[dict]]:
    """Per-seed test metrics of each arm from its AUCs; NE falls as AUC rises (NE = 1.6 - AUC)."""
    return {a: [{"seed": s, "fm_seed": 0, "auc": v, "gauc": v - 0.05, "logloss": 0.8 - v, "ne": 1.6 - v}
                for s, v in enumerate(values)] for a, values in auc.items()}


FM = {"auc": 0.78, "gauc": 0.72, "logloss": 0.02, "ne": 0.82, "fm_seed": 0}


def test_a_report_over_two_verticals_has_a_summary_row_and_a_section_each(tmp_path):
    v0 = _runs({"base": [.700, .702, .698], "loopfm": [.720, .724, .716], "kd": [.710, .713, .707],
                "kd_loopfm": [.735, .740, .730]})
    v1 = _runs({"base": [.650, .652, .648], "loopfm": [.650, .651, .652]})
    reports = {v: build_report(runs, [FM], {"test_examples": n, "vertical": v})
               for v, runs, n in ((0, v0, 1200), (1, v1, 800))}
    report = build_verticals_report(reports, {"verticals": [0, 1], "store_versions": ["s1"]})
    s0, s1 = report["summary"]
    assert (s0["vertical"], s0["test_examples"], s1["vertical"], s1["test_examples"]) == (0, 1200, 1, 800)
    assert s0["auc"]["loopfm"] == pytest.approx(0.720) and s1["auc"] == pytest.approx({"base": 0.650, "loopfm": 0.651})
    # loopfm - base per seed: .020, .022, .018 -> mean .02, sd .002, t = 17.32 (df 2), p = .00332
    assert s0["comparisons"]["loopfm_vs_base"]["mean"] == pytest.approx(0.02)
    assert s0["comparisons"]["loopfm_vs_base"]["p"] == pytest.approx(0.0033165, rel=1e-3)
    assert s1["comparisons"]["loopfm_vs_base"]["mean"] == pytest.approx(0.001)
    assert s1["comparisons"]["loopfm_vs_base"]["p"] > 0.05
    assert s0["tr_ne"]["kd_loopfm"] == pytest.approx((0.9 - 0.865) / (0.9 - 0.82))  # NE: .9 base, .865 both, .82 FM
    assert s1["tr_ne"] == {} and s0["fm_auc"] == pytest.approx(0.78)
    assert s0["claims_holding"] == sum(c["holds"] for c in reports[0]["claims"]) > 0

    paths = write_verticals_report(report, tmp_path / "report")
    names = {p.relative_to(tmp_path / "report").as_posix() for p in paths}
    assert {"report.json", "report.md", "verticals.png", "vertical0/report.md", "vertical0/arms.png",
            "vertical0/transfer.png", "vertical1/report.json", "vertical1/arms.png"} <= names
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![paired ΔAUC per vertical](verticals.png)" in md
    assert (tmp_path / "report" / "verticals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.count("\n## Vertical ") == 2 and md.index("## Vertical 0") < md.index("## Vertical 1")
    assert md.count("### Test metrics") == 2 and md.count("### Transfer ratio") == 2
    assert md.count("### Gain decomposition") == 1  # vertical 1 ran two arms: no decomposition
    row1 = next(line for line in md.splitlines() if line.startswith("| 1 | 800 |"))
    assert "0.6500" in row1 and "0.6510" in row1
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(saved["verticals"]) == {"0", "1"} and len(saved["summary"]) == 2
    assert json.loads((tmp_path / "report" / "vertical1" / "report.json").read_text())["meta"]["vertical"] == 1
    # a single vertical's report is written as before: no summary, no sections per vertical
    single = write_report(build_report(v0, [FM], {"test_examples": 1200}), tmp_path / "single")
    assert "Vertical" not in single[1].read_text() and "summary" not in json.loads(single[0].read_text())


# ---------------------------------------------------------------- two verticals, one store (Ray)

@pytest.mark.timeout(300)
def test_two_verticals_get_one_vm_each_from_one_store_version(smoke_trained, tmp_path):
    """The session's smoke run (its FM, store, vertical 0's features and kd_loopfm VM) under
    `data.vertical: [0, 1]`: the FM and store are reused (the splits hash the first vertical),
    vertical 1 gets its features and VM, and the report has a section per vertical."""
    from loopfm.features.reader import FeaturesManifest
    from loopfm.training.checkpoint import VMManifest
    from loopfm.training.experiment import report_stage

    src, features0, vm0 = smoke_trained
    run = RunDir(tmp_path / "run")
    shutil.copytree(src.root, run.root)
    stores_before = sorted(p.name for p in (run.root / "store").iterdir())
    cfg = smoke("data.vertical=[0,1]", "experiment.arms=[kd_loopfm]", "experiment.seeds=1")
    report = report_stage(cfg, run)

    assert sorted(p.name for p in (run.root / "store").iterdir()) == stores_before  # no new FM, no new store
    assert len(list((run.root / "fm").iterdir())) == 1
    vms = [VMManifest.read(p) for p in sorted((run.root / "vm" / "kd_loopfm").iterdir())]
    assert sorted(m.vertical for m in vms) == [0, 1] and len({m.fingerprint for m in vms}) == 2
    assert {m.store_version for m in vms} == {features0.store_version}
    by_vertical = {m.vertical: m for m in vms}
    assert by_vertical[0].fingerprint == vm0.fingerprint  # vertical 0's VM was current: the same run's
    features1 = FeaturesManifest.read(run.features(by_vertical[1].features_fingerprint))
    assert (features1.vertical, features1.store_version) == (1, features0.store_version)
    assert features1.rows != features0.rows  # another surface's events

    assert report["meta"]["verticals"] == [0, 1] and report["meta"]["store_versions"] == [features0.store_version]
    assert [row["vertical"] for row in report["summary"]] == [0, 1]
    assert [row["test_examples"] for row in report["summary"]] == [features0.rows["test"], features1.rows["test"]]
    for v in (0, 1):
        section = report["verticals"][v]
        assert section["arms"]["kd_loopfm"]["auc"]["mean"] == pytest.approx(by_vertical[v].metrics["test"]["auc"])
        assert (run.report / f"vertical{v}" / "arms.png").is_file()
    md = (run.report / "report.md").read_text()
    assert "## Vertical 0" in md and "## Vertical 1" in md and "## Across verticals" in md

    # one app serves both verticals' VMs from that store: each request's `vertical` picks its VM
    import httpx
    from ray import serve
    from test_serve import free_port, offline, request_of

    from loopfm.serve_apps.app import app_args, build_app

    args = app_args(cfg.updated({"serve.arm": "kd_loopfm", "serve.verticals": [0, 1]}), run)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="verticals", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for v, vm_dir in args["vm_dirs"].items():
                rows, logits, _ = offline(run, vm_dir, n=3)
                answers = [client.post("/v1/score", json={**request_of(rows, i), "vertical": v}) for i in range(3)]
                assert [a.status_code for a in answers] == [200] * 3, answers[0].text
                assert {a.json()["vertical"] for a in answers} == {v}
                assert np.abs(np.array([a.json()["logits"][0] for a in answers]) - logits).max() < 1e-5
    finally:
        serve.shutdown()
