"""The loop reaches serving (issue 9): new events for a user land as a store delta, the running
feature lookup reloads in the background, and that user's scores change with no failed request.
"""

from __future__ import annotations

import shutil
import threading
import time
from argparse import Namespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import test_serve
from test_serve import free_port

served_run = test_serve.served_run  # a module fixture: this module gets its own copy of the run

pytestmark = pytest.mark.timeout(600)
SLA_S = 3600.0


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
    """n new events of `user` (copies of its latest ones, clicked, after the log's end); returns their max ts."""
    log = pads.dataset([str(f) for f in sorted(run.events.glob("*.parquet"))], format="parquet").to_table()
    end, top = pc.max(log["ts"]).as_py(), pc.max(log["event_id"]).as_py()
    mine = log.filter(pc.equal(log["user_id"], user)).sort_by("ts")
    mine = mine.slice(mine.num_rows - n)
    new = mine.set_column(mine.schema.get_field_index("ts"), "ts", pa.array(end + 3600 * np.arange(1, n + 1)))
    new = new.set_column(new.schema.get_field_index("event_id"), "event_id", pa.array(top + 1 + np.arange(n)))
    new = new.set_column(new.schema.get_field_index("label"), "label", pa.array(np.ones(n, np.int8)))
    pq.write_table(new, path)
    return end + 3600 * n


def test_scores_change_after_an_incremental_embed_lands_with_no_failed_request(live, tmp_path):
    from loopfm.datasets.append import logs_append_stage
    from loopfm.fm.incremental import incremental_embed

    cfg, run, client = live
    store = pads.dataset(str(run.root / "store"), format="parquet", exclude_invalid_files=True).to_table(columns=["user_id"])
    users, counts = np.unique(store["user_id"].to_numpy(), return_counts=True)
    user, other = (int(u) for u in users[np.argsort(-counts)[:2]])
    body = {"user_id": user, "items": [1, 2, 3, 5, 8]}  # no ts: now, i.e. the whole history
    before = client.post("/v1/score", json=body).json()
    other_before = client.post("/v1/score", json={**body, "user_id": other}).json()
    health = client.get("/healthz").json()
    assert health["status"] == "degraded" and health["staleness_s"] > SLA_S  # synthetic ts: decades old

    statuses, stop = [], threading.Event()

    def fire():
        while not stop.is_set():
            statuses.append(client.post("/v1/score", json=body).status_code)

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        newest = _new_events_file(run, user, tmp_path / "new.parquet")
        logs_append_stage(cfg, run, Namespace(files=[str(tmp_path / "new.parquet")], format="parquet"))
        delta = incremental_embed(cfg, run)
        assert delta.rows == 6
        deadline = time.time() + 120
        while client.get("/v1/models").json()["models"][0]["store_deltas"] < 1:
            assert time.time() < deadline, f"the lookup never reloaded: {client.get('/v1/models').json()}"
            time.sleep(1)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed of {len(statuses)}"

    after = client.post("/v1/score", json=body).json()
    assert after["store_version"] == before["store_version"]  # same embedding space: a delta, not a new store
    assert np.abs(np.array(after["logits"]) - np.array(before["logits"])).max() > 1e-4
    other_after = client.post("/v1/score", json={**body, "user_id": other}).json()
    assert other_after["logits"] == other_before["logits"]  # nobody else's history moved
    info = client.get("/v1/models").json()["models"][0]
    assert info["store_deltas"] == 1 and info["appended_batches"] == 1 and info["newest_event_ts"] == newest
    assert abs(info["staleness_s"] - (time.time() - newest)) < 120


def test_a_broken_delta_keeps_the_old_table_serving_and_says_why(live):
    """A delta whose chain does not link is refused on reload; the lookup keeps its table."""
    import asyncio
    import json

    from loopfm.serve_apps.bundle import latest_vm
    from loopfm.serve_apps.lookup import FeatureLookup
    from loopfm.store.deltas import delta_paths

    cfg, run, _ = live
    vm_dir = latest_vm(run, test_serve.ARM, test_serve.SEED)
    lookup = FeatureLookup.func_or_class(str(run.root), str(vm_dir), None, 0)  # the deployment's class, in process
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
