"""`loopfm freshness`: the stale, fixed and drifting stores embed each event with the FM they name,
older FMs' z mapped into today's FM's space by a map fitted on train events only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import SMOKE
from loopfm.cli import main
from loopfm.config import load_config
from loopfm.datasets.splits import SplitInfo
from loopfm.fm.checkpoint import FMManifest
from loopfm.fm.freshness import ALIGNMENT_FILE, apply_alignment, fit_alignment
from loopfm.fm.train import fm_fingerprint
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.parquet import data_files, open_store


def store_rows(path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in data_files(path)], ignore_index=True).set_index("event_id")


def decoded(rows: pd.DataFrame, manifest) -> np.ndarray:
    raw = np.stack([np.frombuffer(v, np.uint8) for v in rows["z"]])
    return codec.decode(raw, manifest.dtype, manifest.width)


def test_fewer_than_two_slices_is_refused_naming_the_flag(tmp_path, capsys):
    assert main(["freshness", "--config", str(SMOKE), "--out", str(tmp_path), "--slices", "1"]) == 1
    assert "at least 2 slices" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_each_arm_embeds_every_event_with_the_fm_it_names(smoke_embedded, tmp_path):
    """On the session's smoke run under its own FM settings: today's FM and its store are the run's
    (current, not trained again); the older slice's FM is trained and embedded here."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(smoke_embedded[0].root, run.root)
    argv = ["freshness", "--config", str(SMOKE), "--out", str(run.root), "--slices", "2",
            "--set", "ray.progress_bars=false", "--set", "experiment.seeds=1",
            "--set", "train.epochs=1"]  # the VMs' epochs: not what is checked (nor any FM or store setting)
    assert main(argv) == 0

    table = json.loads((run.report / "freshness.json").read_text())
    arms = {row["embeddings"]: row for row in table["rows"]}
    assert list(arms) == ["stale", "fixed", "drifting"]
    for row in arms.values():
        assert row["auc"]["n"] == 1 and 0.0 <= row["classifier_auc"] <= 1.0
    assert arms["drifting"]["alignment_r2"] is not None and arms["fixed"]["alignment_r2"] is None
    # seed-paired differences, positive when the first is better (lower NE is better)
    assert set(table["comparisons"]) == {"fixed_vs_stale", "drifting_vs_fixed", "drifting_vs_stale"}
    for key, ev in table["comparisons"].items():
        better, worse = (arms[name] for name in key.split("_vs_"))
        assert ev["auc"]["mean"] == pytest.approx(better["auc"]["values"][0] - worse["auc"]["values"][0])
        assert ev["ne"]["mean"] == pytest.approx(worse["ne"]["values"][0] - better["ne"]["values"][0])

    stores = {m.store_version: m for m in (open_store(p) for p in (run.root / "store").iterdir()
                                           if not p.name.startswith("."))}
    stale, fixed, drifting = (stores[arms[name]["store_version"]] for name in ("stale", "fixed", "drifting"))
    cfg = load_config(SMOKE, argv[argv.index("--set"):][1::2])
    own_fm = FMManifest.read(run.fm(fm_fingerprint(cfg, SplitInfo.load(run)))).fm_version
    assert fixed.fm_version == own_fm == smoke_embedded[1].fm_version  # today's FM: the run's own
    early_fm, late_fm = drifting.checkpoint_hash.split(",")
    assert (stale.fm_version, fixed.fm_version) == (early_fm, late_fm) and early_fm != late_fm
    [aligned] = [m for m in stores.values() if m.fm_version.startswith("aligned-")]
    assert aligned.checkpoint_hash == early_fm and aligned.compressor_hash == fixed.compressor_hash

    early, late = store_rows(run.store(stale.store_version)), store_rows(run.store(fixed.store_version))
    mapped, mixed = store_rows(run.store(aligned.store_version)), store_rows(run.store(drifting.store_version))
    assert len(mixed) == len(early) == len(late) == len(mapped) == drifting.rows and mixed.index.is_unique
    info = SplitInfo.load(run)

    # the aligned store: FM_1's events and logits, its z through the saved map, fitted on train only
    saved = np.load(run.store(aligned.store_version) / ALIGNMENT_FILE)
    train = early.index[early["ts"] < info.valid_start_ts]
    weight, bias = fit_alignment(decoded(early.loc[train], stale), decoded(late.loc[train], fixed))
    np.testing.assert_allclose(saved["weight"], weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mapped["fm_logit"], early.loc[mapped.index, "fm_logit"])
    expected = codec.encode(apply_alignment(decoded(early.loc[mapped.index], stale), saved["weight"], saved["bias"]),
                            fixed.dtype)
    np.testing.assert_array_equal(np.stack([np.frombuffer(v, np.uint8) for v in mapped["z"]]), expected)

    # the drifting store, per event: before c_2 (= the valid boundary with 2 slices) FM_1 in FM_2's
    # space, after it FM_2 itself
    old, new = mixed.index[mixed["ts"] < info.valid_start_ts], mixed.index[mixed["ts"] >= info.valid_start_ts]
    assert len(old) and len(new)
    for col in ("fm_logit", "z"):
        assert list(mixed.loc[old, col]) == list(mapped.loc[old, col]), col
        assert list(mixed.loc[new, col]) == list(late.loc[new, col]), col
    assert not np.allclose(early["fm_logit"], late.loc[early.index, "fm_logit"])  # two different FMs
