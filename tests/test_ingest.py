"""`loopfm data validate` as a stage: the synthetic log in, normalized events and manifest out, reruns skipped."""

import shutil

import pyarrow.parquet as pq
import pytest

from loopfm.datasets.ingest import validate_stage
from loopfm.datasets.schema import event_schema
from loopfm.errors import MissingInputError
from loopfm.rundir import RunDir, read_manifest


@pytest.mark.timeout(300)
def test_synthetic_log_becomes_events_in_the_contract_schema(smoke_splits, smoke_config):
    source, events = read_manifest(smoke_splits.source), read_manifest(smoke_splits.events)
    assert events["rows"] == events["rows_read"] == source["rows"]
    assert events["categorical"] == source["categorical"] == ["user_segment"]
    assert events["num_surfaces"] == smoke_config.data.synthetic.num_surfaces
    assert set(events["invalid"].values()) == {0} and events["ts_unit"] == "seconds"
    on_disk = pq.read_table(sorted(smoke_splits.events.glob("*.parquet")))
    assert on_disk.schema.equals(event_schema(events["categorical"])) and on_disk.num_rows == events["rows"]


@pytest.mark.timeout(300)
def test_current_output_is_skipped_and_a_config_change_reruns(smoke_splits, smoke_config, tmp_path):
    for part in ("source", "events"):
        shutil.copytree(smoke_splits.root / "data" / part, tmp_path / "data" / part)
    run = RunDir(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in run.events.iterdir()}
    assert validate_stage(smoke_config, run) == read_manifest(run.events)
    assert {p.name: p.stat().st_mtime_ns for p in run.events.iterdir()} == before
    strict = smoke_config.updated({"data.validation.strict": True})
    rerun = validate_stage(strict, run)
    assert rerun["fingerprint"] != read_manifest(smoke_splits.events)["fingerprint"]
    assert rerun["rows"] == read_manifest(smoke_splits.events)["rows"]
    assert set(p.name for p in run.events.glob("*.parquet")).isdisjoint(before)


def test_synthetic_source_must_be_generated_first(smoke_config, tmp_path):
    with pytest.raises(MissingInputError, match="run `loopfm data generate` first"):
        validate_stage(smoke_config, RunDir(tmp_path))
