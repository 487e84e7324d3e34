"""Time split: boundaries by time, every event in exactly one split, vocabularies from train only."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopfm.datasets.schema import EVENT_ID, LABEL, OOV_INDEX, SPLITS, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo, split_stage
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir, read_manifest


def table(path, columns=None):
    return pq.read_table(sorted(path.glob("*.parquet")), columns=columns)


@pytest.mark.timeout(300)
def test_no_test_event_precedes_a_train_event(smoke_splits):
    info = SplitInfo.load(smoke_splits)
    ts = {name: table(smoke_splits.splits / name, [TS])[TS].to_numpy() for name in SPLITS}
    assert ts["train"].max() < info.valid_start_ts <= ts["valid"].min()
    assert ts["valid"].max() < info.test_start_ts <= ts["test"].min()


@pytest.mark.timeout(300)
def test_every_event_lands_in_exactly_one_split(smoke_splits):
    info = SplitInfo.load(smoke_splits)
    events = table(smoke_splits.events, [EVENT_ID, LABEL])
    parts = {name: table(smoke_splits.splits / name, [EVENT_ID, LABEL]) for name in SPLITS}
    ids = np.concatenate([p[EVENT_ID].to_numpy() for p in parts.values()])
    assert len(ids) == len(np.unique(ids)) == events.num_rows
    assert set(ids) == set(events[EVENT_ID].to_numpy())
    for name, part in parts.items():
        assert info.rows[name] == part.num_rows
        assert info.label_rate[name] == pytest.approx(part[LABEL].to_numpy().mean())
    assert info.num_surfaces == read_manifest(smoke_splits.events)["num_surfaces"]
    columns = set(table(smoke_splits.splits / "valid").column_names)
    assert {idx(c) for c in (USER_ID, "item_id", "category", *info.categorical)} <= columns and "_split" not in columns


@pytest.mark.timeout(300)
def test_cutoffs_are_used_as_given_and_ids_unseen_in_train_map_to_oov(smoke_splits, smoke_config, tmp_path):
    shutil.copytree(smoke_splits.events, tmp_path / "data" / "events")
    run = RunDir(tmp_path)
    ts = table(run.events, [TS])[TS].to_numpy()
    valid_start, test_start = int(np.quantile(ts, 0.02)), int(np.quantile(ts, 0.9))  # a short train: unseen users
    cfg = smoke_config.updated({"data.split.method": "cutoff", "data.split.valid_start_ts": valid_start,
                                "data.split.test_start_ts": test_start})
    info = split_stage(cfg, run)
    assert (info.valid_start_ts, info.test_start_ts) == (valid_start, test_start)
    assert info.rows == {"train": int((ts < valid_start).sum()), "test": int((ts >= test_start).sum()),
                         "valid": int(((ts >= valid_start) & (ts < test_start)).sum())}

    vocab = info.vocab(run, USER_ID)
    train_users = np.unique(table(run.splits / "train", [USER_ID])[USER_ID].to_numpy())
    assert np.array_equal(vocab.keys, train_users) and info.vocab_sizes[USER_ID] == len(train_users) + 2
    test = table(run.splits / "test", [USER_ID, idx(USER_ID)])
    users, indices = test[USER_ID].to_numpy(), test[idx(USER_ID)].to_numpy()
    seen = np.isin(users, train_users)
    assert seen.any() and (~seen).any()
    assert (indices[~seen] == OOV_INDEX).all() and (vocab.keys[indices[seen] - 2] == users[seen]).all()

    late = cfg.updated({"data.split.valid_start_ts": int(ts.max()) + 1, "data.split.test_start_ts": int(ts.max()) + 2})
    with pytest.raises(MissingInputError, match=r"split \['valid', 'test'\] would be empty"):
        split_stage(late, run)
