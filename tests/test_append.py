"""`logs append` publishes only what passed: a batch it refuses is never visible under data/appended/.

Readers of the log (serving's refresh, `embed --incremental`) list `data/appended/` at any moment,
so the checks against the log (late events, reused ids) must run before the batch has its final
name, not after.
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from loopfm.datasets import append
from loopfm.datasets.append import appended_batches, logs_append_stage
from loopfm.errors import DataValidationError
from loopfm.rundir import RunDir

DAY = 86_400


@pytest.fixture(scope="module")
def log_run(tmp_path_factory, smoke_splits):
    """A run holding the smoke log's validated events, and the tail of its source as new events."""
    root = tmp_path_factory.mktemp("append")
    run = RunDir(root / "run")
    shutil.copytree(smoke_splits.events, run.events)
    source = pa.concat_tables([pq.read_table(f) for f in sorted(smoke_splits.source.glob("*.parquet"))])
    return run, source.slice(source.num_rows - 300)


def _visible(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.appended.iterdir() if not p.name.startswith("."))


@pytest.mark.timeout(180)
def test_a_refused_batch_is_never_visible_and_a_good_one_lands_whole(log_run, smoke_config, tmp_path, monkeypatch):
    run, tail = log_run
    seen = []
    check = append._conflict

    def observed(old, new, files):  # calls the real check; records what a reader could list meanwhile
        seen.append([p.name for p in appended_batches(run)])
        return check(old, new, files)

    monkeypatch.setattr(append, "_conflict", observed)
    newest = int(pc.max(tail["ts"]).as_py())
    later = tail.set_column(tail.schema.get_field_index("ts"), "ts",
                            pc.add(tail["ts"], pa.scalar(10 * DAY, tail["ts"].type)))
    reused = tmp_path / "reused.parquet"
    pq.write_table(later, reused)  # newer events, but the log already holds their event ids
    with pytest.raises(DataValidationError, match=r"300 event_id values in reused.parquet are already in the log"):
        logs_append_stage(smoke_config, run, [str(reused)], "auto")
    assert seen == [[]]  # the check ran while no batch was visible
    assert _visible(run) == [] or all(n.endswith(".validation.json") for n in _visible(run))

    ids = later["event_id"]
    fresh = tmp_path / "fresh.parquet"
    pq.write_table(later.set_column(later.schema.get_field_index("event_id"), "event_id",
                                    pc.add(ids, pa.scalar(1 << 40, ids.type))), fresh)
    manifest = logs_append_stage(smoke_config, run, [str(fresh)], "auto")
    assert seen[-1] == [] and manifest["rows"] == 300
    batches = appended_batches(run)
    assert len(batches) == 1 and min(append._columns(batches, ["ts"])["ts"]) > newest
    assert not [p for p in run.appended.iterdir() if ".staged-" in p.name or ".tmp-" in p.name]
