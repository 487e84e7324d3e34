"""The pieces VM and FM loops share: early stopping, the loop timer, the train-split cache choice."""

from __future__ import annotations

import json
import time

import pytest

from loopfm.training.loop import EarlyStopping, LoopTimer


def test_early_stopping_keeps_the_best_and_stops_after_patience_bad_epochs():
    stop = EarlyStopping(patience=2)
    assert stop.update(0, 0.60, {"auc": 0.60}) and not stop.should_stop
    assert stop.update(1, 0.65, {"auc": 0.65})
    assert not stop.update(2, 0.64, {}) and not stop.should_stop
    assert not stop.update(3, 0.65, {}) and stop.should_stop  # equal is not better
    assert (stop.best, stop.best_epoch, stop.best_metrics) == (0.65, 1, {"auc": 0.65})


def test_loop_timer_without_a_path_costs_nothing():
    batches = [{"label": [0, 1]}]
    timer = LoopTimer(None)
    assert timer.batches(batches) is batches
    timer.setup_done(), timer.evaluated(), timer.epoch_done(0)  # no file, no error


def test_loop_timer_splits_waiting_on_batches_from_work_between_them(tmp_path):
    log = tmp_path / "loop.jsonl"

    def slow_source():
        for _ in range(3):
            time.sleep(0.05)  # the data side
            yield {"label": [0] * 10}

    timer = LoopTimer(str(log))
    timer.setup_done()
    for _ in timer.batches(slow_source()):
        time.sleep(0.02)  # the model side
    timer.evaluated()
    timer.epoch_done(0)
    setup, epoch = [json.loads(line) for line in log.read_text().splitlines()]
    assert setup["kind"] == "setup" and setup["end"] >= setup["start"]
    assert epoch["kind"] == "epoch" and epoch["rows"] == 30
    # sleeps only ever overrun (a busy box): lower bounds, and the two parts within the wall time
    assert epoch["wait_s"] >= 0.15 and epoch["compute_s"] >= 0.06 and epoch["first_batch_s"] >= 0.05
    assert epoch["wait_s"] + epoch["compute_s"] <= epoch["train_end"] - epoch["start"] + 1e-3
    assert epoch["start"] <= epoch["train_end"] <= epoch["eval_end"] <= epoch["end"]


@pytest.mark.timeout(120)
def test_shards_are_kept_when_asked_or_small(smoke_trained):
    from loopfm.training.vm import keep_shards

    run, features, _ = smoke_trained
    assert keep_shards("memory", run, features) and not keep_shards("stream", run, features)
    assert keep_shards("auto", run, features)  # a few MB against GBs of memory


@pytest.mark.timeout(120)
def test_kept_shard_batches_hold_the_same_rows_every_epoch_reshuffled(smoke_trained, ray_session):

    import torch

    from loopfm.features.collate import VMBatchCollate
    from loopfm.features.reader import read_features
    from loopfm.training.batches import ShardBatches

    run, features, _ = smoke_trained
    collate = VMBatchCollate(features, width=4)

    def rows(batches) -> list[tuple]:
        return [(int(u), int(i), float(k)) for b in batches
                for u, i, k in zip(b["user"], b["item"], b["kd_logit"])]

    train = ShardBatches(read_features(run, features, "valid").iterator(), collate, 64, keep=True, shuffle_seed=7)
    first = rows(train.epoch(0))
    assert train.columns is not None and len(first) == features.rows["valid"]
    second, third = rows(train.epoch(1)), rows(train.epoch(2))  # from memory now
    assert sorted(second) == sorted(first) == sorted(third) and second != third  # same rows, new order
    assert next(iter(train.epoch(1)))["seq"].shape[1:] == (features.seq_len, 4)

    evaluation = ShardBatches(read_features(run, features, "valid").iterator(), collate, 64, keep=True)
    assert rows(evaluation.epoch()) and rows(evaluation.epoch()) == rows(evaluation.epoch())  # order kept

    # the shard is decoded once and batches gathered from it: each batch is the decode of its own rows
    assert list(evaluation.held.decoded) == [collate.key]
    for k, batch in enumerate(evaluation.epoch()):
        alone = collate.tensors({c: v[k * 64 : (k + 1) * 64] for c, v in evaluation.columns.items()})
        assert batch.keys() == alone.keys() and all(torch.equal(batch[c], alone[c]) for c in batch)

    streamed = ShardBatches(read_features(run, features, "valid").iterator(), collate, 64, keep=False)
    assert sorted(rows(streamed.epoch(0))) == sorted(first) and streamed.columns is None

    # epoch 0 is a full permutation of the rows: the same order whatever the blocks' layout
    for blocks in (1, 5):
        recut = ShardBatches(read_features(run, features, "valid").repartition(blocks).iterator(), collate, 64,
                             keep=True, shuffle_seed=7)
        assert rows(recut.epoch(0)) == first
    positions = {row: k for k, row in enumerate(rows(evaluation.epoch()))}
    first_batch = [positions[row] for row in first[:64]]
    assert max(first_batch) - min(first_batch) > len(first) // 2  # not a window of the stored order
