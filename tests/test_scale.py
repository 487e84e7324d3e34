"""`loopfm scale`: the FM capacity study's sizes are validated, its FMs differ in size as configured,
base and rawseq are trained once, and the report carries TR with CIs; the synthetic knob it may
use leaves the default log exactly as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import SMOKE
from loopfm.cli import main
from loopfm.config import FM_PRESETS, ConfigError, FMConfig, LoopFMConfig, load_config
from loopfm.datasets import synthetic
from loopfm.evaluation.scale import build_scale
from loopfm.fm.checkpoint import FMManifest
from loopfm.models.fm import CausalFM
from loopfm.rundir import RunDir
from loopfm.training.scale import size_configs


def expected_parameters(shape: dict, window: int, vocab: dict, surfaces: int) -> int:
    """The FM's parameters by hand from models/fm.py's layers: what the study must count."""
    d, ff, h = shape["d_model"], shape["d_ff"], shape["n_heads"]
    embeddings = (vocab["item_id"] + vocab["category"] + surfaces + 3) * d
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + h * window + 2 * d + (d * ff + ff) + (ff * d + d)
    return embeddings + shape["n_layers"] * block + 2 * d + d + 1


# ---------------------------------------------------------------- config

def test_sizes_validate_presets_and_shapes():
    cfg = load_config(overrides=["scale.fm_sizes=[xs, {d_model: 24, n_layers: 1, n_heads: 3, d_ff: 48}]"])
    assert [s.name for s in cfg.scale.fm_sizes] == ["xs", "d24xL1"]
    assert cfg.scale.fm_sizes[0].shape == FM_PRESETS["xs"]
    bad = {
        "divisible": "[{d_model: 30, n_layers: 1, n_heads: 4, d_ff: 8}, xs]",
        "unknown FM size preset": "[xs, huge]",
        "repeats a shape": "[xs, {name: other, d_model: 16, n_layers: 1, n_heads: 2, d_ff: 32}]",
        "at least 2": "[xs]",
        "fm_sizes.0.d_model": "[{d_model: 0, n_layers: 1, n_heads: 1, d_ff: 8}, xs]",
    }
    for message, sizes in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[f"scale.fm_sizes={sizes}"])


def test_a_size_that_does_not_fit_the_config_fails_before_anything_runs():
    deep = "{name: deep, d_model: 16, n_layers: 5, n_heads: 2, d_ff: 32}"  # 5 x (32 - 1) > chunk_len 128
    with pytest.raises(ConfigError, match="(?s)'deep'.*chunk_len"):
        size_configs(load_config(overrides=[f"scale.fm_sizes=[xs, {deep}]"]))
    with pytest.raises(ConfigError, match="(?s)'xs'.*embed.layers"):
        size_configs(load_config(overrides=["scale.fm_sizes=[xs, s]", "embed.layers=[2]"]))
    sized = size_configs(LoopFMConfig())
    assert [c.fm.d_model for _, c in sized] == [s.d_model for s in LoopFMConfig().scale.fm_sizes]
    assert all(c.fm.window == FMConfig().window for _, c in sized)  # only the shape keys change


def test_default_sizes_span_30x_on_the_default_log():
    cfg = LoopFMConfig()
    syn = cfg.data.synthetic
    vocab = {"item_id": syn.num_items + 2, "category": syn.num_categories + 2}  # + padding and OOV
    counts = [sum(p.numel() for p in CausalFM(c.fm, vocab, syn.num_surfaces).parameters())
              for _, c in size_configs(cfg)]
    assert len(counts) >= 4 and counts == sorted(counts) and counts[-1] / counts[0] >= 30, counts
    assert counts == [expected_parameters(s.shape, cfg.fm.window, vocab, syn.num_surfaces) for s in cfg.scale.fm_sizes]


# ---------------------------------------------------------------- the synthetic knob

def _digest(cfg) -> str:
    import hashlib

    h = hashlib.sha256()
    world = synthetic.make_world(cfg)
    for c in range(synthetic.num_chunks(cfg)):
        t = synthetic.generate_chunk(cfg, world, c)
        for name in t.column_names:
            h.update(name.encode())
            h.update(np.ascontiguousarray(t[name].to_numpy()).tobytes())
    return h.hexdigest()[:16]


def test_taste_off_leaves_the_log_and_its_fingerprint_as_before_the_knob(smoke_config):
    cfg = smoke_config.data.synthetic
    assert cfg.taste_weight == 0
    # Taken from the generator before taste_weight existed: same log, same fingerprint, so run
    # directories generated then stay current.
    assert _digest(cfg) == "b59277944a999086"
    assert synthetic.generator_fingerprint(cfg) == "bc6d8f27ed84"
    assert synthetic.generator_fingerprint(LoopFMConfig().data.synthetic) == "9cb206f11abb"
    assert synthetic.generator_fingerprint(cfg.model_copy(update={"taste_dim": 8})) == "bc6d8f27ed84"


def test_taste_changes_only_the_clicks():
    cfg = load_config(SMOKE).data.synthetic.model_copy(update={"num_users": 150})
    on = cfg.model_copy(update={"taste_weight": 1.0})
    world, world_on = synthetic.make_world(cfg), synthetic.make_world(on)
    plain, tasted = synthetic.generate_chunk(cfg, world, 0), synthetic.generate_chunk(on, world_on, 0)
    for name in plain.column_names:
        same = plain[name].equals(tasted[name])
        assert same == (name != "label"), name  # exposure, ids and times untouched; the clicks move
    assert synthetic.generator_fingerprint(on) != synthetic.generator_fingerprint(cfg)


# ---------------------------------------------------------------- the report, on fabricated runs

def _fabricated(fm_gain: float = 0.02) -> list[dict]:
    """Four sizes; KD carries a shrinking share of a growing FM advantage, LoopFM a fixed one."""
    rng = np.random.default_rng(0)
    sizes = []
    for i, params in enumerate((10_000, 40_000, 150_000, 600_000)):
        fm_auc = 0.60 + fm_gain * (1 + i)
        arms = {}
        for arm, share in (("base", 0.0), ("kd", 0.6 - 0.15 * i), ("loopfm", 0.6), ("kd_loopfm", 0.8)):
            arms[arm] = []
            for k in range(4):
                auc = 0.60 + 0.001 * k + share * (fm_auc - 0.60) + rng.normal(0, 2e-4) * (arm != "base")
                arms[arm].append({"auc": auc, "gauc": auc, "logloss": 0.5, "ne": 1.6 - auc, "seed": k, "fm_seed": 0})
        sizes.append({"name": f"s{i}", "d_model": 8 << i, "n_layers": 1, "n_heads": 2, "d_ff": 16, "parameters": params,
                      "embedding_parameters": params // 2, "arms": arms,
                      "fm": [{"auc": fm_auc, "gauc": fm_auc, "logloss": 0.5, "ne": 1.6 - fm_auc, "fm_seed": 0}]})
    return sizes


def test_trend_claims_follow_the_evidence_and_are_gated_on_the_fm_gap():
    r = build_scale(_fabricated(), {})
    claims = {c["claim"].split(" (")[0]: c["verdict"] for c in r["claims"]}
    assert claims["TR(+KD) on NE falls as the FM grows"] == "holds"
    assert claims["TR(+LoopFM) on NE falls less than TR(+KD) as the FM grows"] == "holds"
    assert r["trend"]["tr"]["loopfm"]["ne"]["p"] > 0.05  # LoopFM's share is flat: no trend claimed
    row = r["sizes"][0]["tr_per_pair"]["kd"]["ne"]
    assert row["n"] == 4 and len(row["ci95"]) == 2 and row["ci95"][0] < row["mean"] < row["ci95"][1]
    json.loads(json.dumps(r, default=str))
    worse = build_scale(_fabricated(fm_gain=-0.01), {})  # the FM never beats the base VM
    assert {c["verdict"] for c in worse["claims"] if c["claim"].startswith("TR(")} == {"not computed"}


# ---------------------------------------------------------------- end to end

@pytest.mark.timeout(600)
def test_scale_study_end_to_end_fms_differ_as_configured(smoke_trained, smoke_config, tmp_path):
    """Two sizes, one seed, three arms on the smoke run: the first size is the smoke FM itself (its
    FM, store, features and kd_loopfm VM are current), so one new FM trains."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(smoke_trained[0].root, run.root)
    fm = smoke_config.fm
    sizes = [{"name": "smoke", "d_model": fm.d_model, "n_layers": fm.n_layers, "n_heads": fm.n_heads, "d_ff": fm.d_ff},
             {"name": "tiny", "d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16}]
    argv = ["scale", "--config", str(SMOKE), "--out", str(run.root), "--set", "ray.progress_bars=false",
            "--set", "experiment.seeds=1", "--set", "experiment.arms=[base, rawseq, kd_loopfm]",
            "--set", f"scale.fm_sizes={json.dumps(sizes)}"]
    assert main(argv) == 0

    for ext in ("json", "md", "png"):
        assert (run.report / f"scale.{ext}").stat().st_size > 0
    report = json.loads((run.report / "scale.json").read_text())
    rows = {row["name"]: row for row in report["sizes"]}
    assert list(rows) == ["tiny", "smoke"]  # ordered by parameters
    for size in sizes:
        row = rows[size["name"]]
        [version] = row["fm_versions"]
        [fm_dir] = [p for p in (run.root / "fm").iterdir() if (p / "manifest.json").is_file()
                    and FMManifest.read(p).fm_version == version]
        manifest = FMManifest.read(fm_dir)
        assert {k: manifest.fm[k] for k in size if k != "name"} == {k: v for k, v in size.items() if k != "name"}
        assert row["parameters"] == expected_parameters(size, fm.window, manifest.vocab_sizes, manifest.num_surfaces)
    assert rows["smoke"]["parameters"] > rows["tiny"]["parameters"]
    assert rows["smoke"]["store_versions"] != rows["tiny"]["store_versions"]

    # base and rawseq read nothing the FM writes: trained once, shared by both sizes
    assert report["meta"]["fm_free_arms_shared"] is True
    for arm in ("base", "rawseq"):
        assert len([p for p in (run.root / "vm" / arm).iterdir() if not p.name.startswith(".")]) == 1
        assert rows["tiny"]["arms"][arm]["auc"]["values"] == rows["smoke"]["arms"][arm]["auc"]["values"]
    for row in rows.values():
        for ch in ("rawseq", "kd_loopfm"):
            ps = row["tr_per_pair"][ch]["ne"]
            assert {"mean", "ci95", "n"} <= set(ps) and len(ps["ci95"]) == 2 and ps["n"] == 1
        assert {"mean", "ci95", "p"} <= set(row["fm_vs_base"]["auc"])
    trend = report["trend"]["tr"]["kd_loopfm"]["ne"]
    assert {"mean", "ci95", "p", "n", "slopes"} <= set(trend) and trend["slopes"][0] is not None
    assert "## What came out" in (run.report / "scale.md").read_text()
