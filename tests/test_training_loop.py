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
def test_the_train_split_is_cached_when_asked_or_small(smoke_config, smoke_trained, ray_session):
    from loopfm.training.vm import cache_train_split

    run, features, _ = smoke_trained
    assert cache_train_split("memory", run, features) and not cache_train_split("stream", run, features)
    assert cache_train_split("auto", run, features)  # a few MB against an object store of GBs
