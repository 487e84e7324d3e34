"""The loop reaches serving (issue 9): new events for a user land as a store delta, the running
feature lookup reloads, and that user's scores change with no failed request; the short soak
(issue 20): the same while a reload rolls the model, each answer naming the one model/store pair
that scored it; and `logs append` killed at its worst point while the lookup refreshes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import test_serve
from test_serve import free_port

from conftest import SMOKE, held_process
from loopfm.datasets.append import appended_batches, log_paths, logs_append_stage
from loopfm.training.checkpoint import VMManifest

served_run = test_serve.served_run  # a module fixture: this module gets its own copy of the run

pytestmark = pytest.mark.timeout(600)
SLA_S = 3600.0
CLIENTS = 4


@pytest.fixture(scope="module")
def live(served_run, smoke_config):
    """test_serve's run (its own copy: this module writes into it), served with a 1 s refresh
    interval and a staleness SLA."""
    import httpx
    from ray import serve

    from loopfm.serve_apps.stage import deploy

    run, _, _ = served_run
    cfg = smoke_config.updated({"serve.refresh_interval_s": 1.0, "serve.staleness_sla_s": SLA_S})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(cfg, run)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield cfg, run, client
    client.close()
    serve.shutdown()


def _new_events_file(run, user: int, path, n: int = 6) -> int:
    """n new events of `user` (copies of its latest ones, clicked, after the log's end, appended
    batches included); returns their max ts."""
    files = [str(f) for p in log_paths(run) for f in sorted(p.glob("*.parquet"))]
    log = pads.dataset(files, format="parquet").to_table()
    end, top = pc.max(log["ts"]).as_py(), pc.max(log["event_id"]).as_py()
    mine = log.filter(pc.equal(log["user_id"], user)).sort_by("ts")
    mine = mine.slice(mine.num_rows - n)
    new = mine.set_column(mine.schema.get_field_index("ts"), "ts", pa.array(end + 3600 * np.arange(1, n + 1)))
    new = new.set_column(new.schema.get_field_index("event_id"), "event_id", pa.array(top + 1 + np.arange(n)))
    new = new.set_column(new.schema.get_field_index("label"), "label", pa.array(np.ones(n, np.int8)))
    pq.write_table(new, path)
    return end + 3600 * n


def answers_during(client, bodies, clients: int) -> tuple[list, threading.Event, list]:
    """`clients` threads posting `bodies` in turn until the event is set; each answer is (sent at,
    body, status, (model_version, store_version, store_head, log_head), logits), or (sent at, body,
    status, error) for a failure."""
    import httpx

    answers, stop = [], threading.Event()

    def fire(k: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            while not stop.is_set():
                b, k, sent = k % len(bodies), k + 1, time.monotonic()
                try:
                    r = c.post("/v1/score", json=bodies[b])
                except Exception as exc:  # a dropped connection counts as a failure
                    answers.append((sent, b, -1, repr(exc)))
                    continue
                if r.status_code != 200:
                    answers.append((sent, b, r.status_code, r.text[:300]))
                    continue
                j = r.json()
                answers.append((sent, b, 200, (j["model_version"], j["store_version"], j["store_head"], j["log_head"]),
                                np.array(j["logits"])))

    threads = [threading.Thread(target=fire, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return answers, stop, threads


def test_soak_a_delta_a_refresh_and_a_reload_under_load_fail_no_request(live, tmp_path):
    """The soak, short (benchmarks/soak.py runs it long): 4 clients score two users while new events
    land as a store delta (`logs append` + `embed --incremental`), a refresh loads them (`serve
    refresh`) and a reload rolls the model to a new checkpoint. Every request succeeds; every answer
    names the model and the store and log state that scored it and equals every other answer to the
    same request naming the same (one model/store pair per answer, never a mix); the user with new
    events scores differently after the delta, the other user identically until the model rolls."""
    from loopfm.fm.incremental import incremental_embed
    from loopfm.serve_apps.bundle import latest_vm
    from loopfm.serve_apps.stage import refresh, reload

    cfg, run, client = live
    store = pads.dataset(str(run.root / "store"), format="parquet", exclude_invalid_files=True).to_table(
        columns=["user_id"])
    users, counts = np.unique(store["user_id"].to_numpy(), return_counts=True)
    user, other = (int(u) for u in users[np.argsort(-counts)[:2]])
    bodies = [{"user_id": u, "items": [1, 2, 3, 5, 8]} for u in (user, other)]  # no ts: now, the whole history
    before = [client.post("/v1/score", json=b).json() for b in bodies]
    start = (before[0]["model_version"], before[0]["store_version"], before[0]["store_head"], before[0]["log_head"])
    assert start[2] == start[1] and start[3] is None  # the store alone, the split log alone
    health = client.get("/healthz").json()
    assert health["status"] == "degraded" and health["staleness_s"] > SLA_S  # synthetic ts: decades old

    answers, stop, threads = answers_during(client, bodies, CLIENTS)
    try:
        time.sleep(1.0)
        newest = _new_events_file(run, user, tmp_path / "new.parquet")
        logs_append_stage(cfg, run, [str(tmp_path / "new.parquet")], "parquet")
        delta = incremental_embed(cfg, run)
        assert delta.rows == 6
        state = refresh()  # `loopfm serve refresh`
        assert state["store_head"] == delta.store_version and state["store_deltas"] == 1, state
        refreshed = time.monotonic()
        rolled = test_serve.perturbed_vm(run, latest_vm(run, test_serve.ARM, test_serve.SEED), "soak0001")
        new_model = VMManifest.read(rolled).model_version
        reload(cfg, run)  # `loopfm serve reload`: a rolling update to the newest checkpoint
        deadline = time.time() + 60
        while time.time() < deadline and not any(a[2] == 200 and a[3][0] == new_model for a in answers[-8:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()

    failed = [a for a in answers if a[2] != 200]
    assert len(answers) > 50 and not failed, f"{len(failed)} failed of {len(answers)}: {failed[:3]}"
    batch = appended_batches(run)[0].name
    after_delta = (start[0], start[1], delta.store_version, batch)
    rolled_pair = (new_model, start[1], delta.store_version, batch)
    pairs = {a[3] for a in answers}
    allowed = {start, (start[0], start[1], start[2], batch), after_delta, rolled_pair}  # the batch may load first
    assert after_delta in pairs and rolled_pair in pairs and pairs <= allowed, pairs
    assert all(a[3] in (after_delta, rolled_pair) for a in answers if a[0] > refreshed)  # never an older state
    scores = {}
    for _, b, _, pair, logits in answers:  # the same request under the same pair: the same scores
        seen = scores.setdefault((b, pair), logits)
        assert np.abs(logits - seen).max() < 1e-5, (b, pair, logits, seen)
    assert np.abs(scores[0, after_delta] - np.array(before[0]["logits"])).max() > 1e-4  # new events: new scores
    np.testing.assert_allclose(scores[1, after_delta], before[1]["logits"], atol=1e-6)  # nobody else's moved
    assert np.abs(scores[1, rolled_pair] - scores[1, after_delta]).max() > 1e-4  # the new model scores
    info = client.get("/v1/models").json()["models"][0]
    assert info["model_version"] == new_model and info["store_head"] == delta.store_version
    assert info["store_deltas"] == 1 and info["appended_batches"] == 1 and info["newest_event_ts"] == newest
    assert abs(info["staleness_s"] - (time.time() - newest)) < 120
    print(f"soak: {len(answers)} requests from {CLIENTS} clients, {len(failed)} failed, {len(pairs)} model/store "
          f"states, each request answered identically within its state")


def test_a_broken_delta_keeps_the_old_table_serving_and_says_why(live):
    """A delta whose chain does not link is refused on reload; the lookup keeps its table."""
    import asyncio
    import json

    from loopfm.serve_apps.bundle import Bundle, latest_vm
    from loopfm.serve_apps.lookup import LiveTable
    from loopfm.store.deltas import delta_paths

    cfg, run, _ = live
    vm_dir = latest_vm(run, test_serve.ARM, test_serve.SEED)
    lookup = LiveTable(Bundle.open(run.root, vm_dir), 0)  # what the scoring replica holds, in process
    before = asyncio.run(lookup.describe())
    good = delta_paths(run, before["store_version"])[-1]
    bad = good.parent / "9999-broken"
    shutil.copytree(good, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "parent": "not-the-previous-one"}))
    try:
        after = asyncio.run(lookup.refresh())
        assert "VersionMismatchError" in after["refresh_error"] and "9999-broken" in after["refresh_error"]
        assert after["store_rows"] == before["store_rows"] and after["loaded_at"] == before["loaded_at"]
        user = int(lookup.table.store_users.users[0])
        assert asyncio.run(lookup.features(user, [1], {}))["store_version"] == before["store_version"]
    finally:
        shutil.rmtree(bad)


# `logs append` stopped at the worst point: the batch validated and checked under its hidden name,
# the append lock held, the rename into `data/appended/` not yet done.
HELD_APPEND = """
import sys, time
from argparse import Namespace
from pathlib import Path
from loopfm.config import load_config
from loopfm.datasets import append
from loopfm.rundir import RunDir
run, gate, batch = RunDir(sys.argv[1]), Path(sys.argv[2]), sys.argv[4]
check = append._conflict

def held(old, new, files):
    problem = check(old, new, files)
    gate.write_text(problem or "passed")
    while True:
        time.sleep(1)

append._conflict = held
append.logs_append_stage(load_config(sys.argv[3], ["ray.progress_bars=false"]), run,
                         [batch], "parquet")
"""


def test_a_refresh_never_sees_a_batch_that_is_not_appended_whole(live, tmp_path):
    """`serve refresh` (the lookup's reload) while `logs append` is at its worst point, then after it
    is SIGKILLed there, then while a real append lands: every table the lookup loads holds the log
    without the batch or with all of it, and the killed append's staging is reaped by the next one
    (before issue 20 the batch had its final name during the check: a refresh then loaded it, and a
    kill left it in the log unchecked)."""
    from loopfm.serve_apps.bundle import Bundle, latest_vm
    from loopfm.serve_apps.lookup import LiveTable

    cfg, run, _ = live
    lookup = LiveTable(Bundle.open(run.root, latest_vm(run, test_serve.ARM, test_serve.SEED)), 0)
    before = asyncio.run(lookup.describe())
    user = int(lookup.table.users.users[0])
    _new_events_file(run, user, tmp_path / "batch.parquet", n=8)
    loaded = []

    def refresh():
        state = asyncio.run(lookup.refresh())
        loaded.append((state["events"], state["appended_batches"]))

    held, verdict = held_process(HELD_APPEND, run.root, tmp_path / "held.ready", SMOKE, tmp_path / "batch.parquet",
                                 gate=tmp_path / "held.ready")
    try:
        assert verdict == "passed"  # a good batch: only the rename is left
        for _ in range(3):
            refresh()
        os.kill(held.pid, signal.SIGKILL)
        held.wait(30)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait(30)
    refresh()
    assert set(loaded) == {(before["events"], before["appended_batches"])}, loaded
    assert [p.name for p in run.appended.iterdir() if ".staged-" in p.name], "the kill left no staging to reap"

    stop = threading.Event()

    def keep_refreshing():
        while not stop.is_set():
            refresh()

    reader = threading.Thread(target=keep_refreshing)
    reader.start()
    try:
        logs_append_stage(cfg, run, [str(tmp_path / "batch.parquet")], "parquet")
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join()
    refresh()
    whole = (before["events"] + 8, before["appended_batches"] + 1)
    assert set(loaded) <= {(before["events"], before["appended_batches"]), whole} and loaded[-1] == whole, loaded
    assert not [p.name for p in run.appended.iterdir() if ".staged-" in p.name or ".tmp-" in p.name]
    assert len(appended_batches(run)) == before["appended_batches"] + 1
    print(f"append beside refresh: {len(loaded)} refreshes, {loaded.count(whole)} with the whole batch, none partial")
