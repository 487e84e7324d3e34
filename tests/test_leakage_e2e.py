"""End to end, no example sees its own moment: a planted store row that spells the label at the
event's own timestamp must not raise test AUC; the same row one second earlier (which the join
rightly admits) must, so the VM and the pipeline would catch a leak if the join let one in.

`features.retention = 1` keeps only rows from exactly one second before each event, so a planted
row can reach no example but its own event's: the comparison isolates the `ts < t` boundary.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loopfm.datasets.schema import SPLITS
from loopfm.features.stage import features_stage
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.parquet import data_files, seal
from loopfm.store.schema import ROW_SCHEMA, StoreManifest
from loopfm.training.vm import arm_config, train_vm

PLANTED_ID = 1 << 60  # far from every real event id


def plant(run: RunDir, store: StoreManifest, shift: int) -> None:
    """Add, for each vertical event, a row of the same user at ts - shift whose z spells its label."""
    events = pd.concat([pd.read_parquet(run.splits / s) for s in SPLITS], ignore_index=True)
    events = events[events["surface"] == 0]
    n = len(events)
    z = np.where(events["label"].to_numpy()[:, None] == 1, 0.95, -0.95) * np.ones((n, store.width))
    table = pa.Table.from_arrays([
        pa.array(PLANTED_ID + np.arange(n), pa.int64()), pa.array(events["user_id"], pa.int64()),
        pa.array(events["ts"].to_numpy() - shift, pa.int64()), pa.array(np.ones(n), pa.int32()),
        pa.array(np.zeros(n), pa.float32()), codec.rows_to_binary(codec.encode(z, store.dtype)),
    ], schema=ROW_SCHEMA)
    path = run.store(store.store_version)
    pq.write_table(table, path / "planted.parquet")
    seal(path, StoreManifest.read(path), expected_rows=store.rows + n)


def loopfm_test_auc(run: RunDir, cfg) -> float:
    features = features_stage(cfg, run)
    return train_vm(arm_config(cfg, "loopfm", seed=0), run, features).metrics["test"]["auc"]


@pytest.fixture(scope="module")
def cfg(smoke_config):
    return smoke_config.updated({"features.retention": 1, "train.epochs": 5, "train.lr": 5e-3})


@pytest.fixture(scope="module")
def clean_auc(smoke_embedded, cfg, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("clean") / "run")
    shutil.copytree(smoke_embedded[0].root, run.root)
    return loopfm_test_auc(run, cfg)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shift, leaks", [(0, False), (1, True)])
def test_a_label_planted_at_the_events_own_time_never_reaches_it(smoke_embedded, cfg, clean_auc, tmp_path,
                                                                  shift, leaks):
    run = RunDir(tmp_path / "run")
    shutil.copytree(smoke_embedded[0].root, run.root)
    store = smoke_embedded[2]
    assert len(data_files(run.store(store.store_version))) >= 1
    plant(run, store, shift)
    auc = loopfm_test_auc(run, cfg)
    if leaks:  # admitted (ts < t): the VM reads the label off the sequence
        assert auc > 0.9 > clean_auc + 0.1
    else:  # same ts: the join keeps it out, test AUC stays where it was
        assert abs(auc - clean_auc) < 0.02
