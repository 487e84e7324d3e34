"""`loopfm freshness`: each event's row comes from the newest FM of its time; drift is measured."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import SMOKE
from loopfm.cli import main
from loopfm.rundir import RunDir
from loopfm.store.parquet import data_files, open_store


def store_rows(path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in data_files(path)], ignore_index=True).set_index("event_id")


@pytest.mark.timeout(900)
def test_drifting_store_takes_each_slice_from_its_fm_and_drifts_more(smoke_embedded, smoke_config, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(smoke_embedded[0].root, run.root)
    argv = ["freshness", "--config", str(SMOKE), "--out", str(run.root), "--slices", "2",
            "--set", "ray.progress_bars=false", "--set", "fm.num_workers=0"]
    assert main(argv) == 0

    table = json.loads((run.report / "freshness.json").read_text())
    fixed, drifting = table["rows"]
    assert (fixed["embeddings"], drifting["embeddings"]) == ("fixed", "drifting")
    assert drifting["centroid_drift"] > fixed["centroid_drift"]  # separate FMs, separate spaces
    assert fixed["auc"]["n"] == drifting["auc"]["n"] == smoke_config.experiment.seeds

    stores = {p.name: open_store(p) for p in (run.root / "store").iterdir() if not p.name.startswith(".")}
    [drift] = [m for m in stores.values() if m.fm_version.startswith("drift-")]
    early_fm, late_fm = drift.checkpoint_hash.split(",")
    by_fm = {m.fm_version: name for name, m in stores.items() if not m.fm_version.startswith("drift-")}
    rows = store_rows(run.store(drift.store_version))
    early, late = store_rows(run.store(by_fm[early_fm])), store_rows(run.store(by_fm[late_fm]))
    assert rows.index.is_unique and len(rows) == len(early) == len(late) == drift.rows

    from loopfm.datasets.splits import SplitInfo

    valid_start = SplitInfo.load(run).valid_start_ts
    old, new = rows["ts"] < valid_start, rows["ts"] >= valid_start  # 2 slices: FM_1 before, FM_2 after
    np.testing.assert_array_equal(rows.loc[old, "fm_logit"], early.loc[rows.index[old], "fm_logit"])
    np.testing.assert_array_equal(rows.loc[new, "fm_logit"], late.loc[rows.index[new], "fm_logit"])
    assert not np.allclose(early["fm_logit"], late.loc[early.index, "fm_logit"])  # two different FMs
