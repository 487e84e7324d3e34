"""The data commands through the real CLI, as a user (or `ray job submit`) runs them.

The subprocesses join the test session's Ray through RAY_ADDRESS, the way `ray job submit`
hands a cluster to a command, instead of each starting a Ray of its own.
"""

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import loopfm_in_process, run_loopfm
from loopfm.rundir import read_manifest


def corrupt_copy(source: Path, target: Path) -> None:
    """The generated log with 3 labels set to 2 and 2 user ids removed, in its first file."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("manifest.json"))
    first = sorted(target.glob("*.parquet"))[0]
    table = pq.read_table(first)
    label = table["label"].to_pylist()
    label[10:13] = [2, 2, 2]
    user = table["user_id"].to_pylist()
    user[20:22] = [None, None]
    table = table.set_column(table.schema.get_field_index("label"), "label", pc.cast(label, "int8"))
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pc.cast(user, "int64"))
    pq.write_table(table, first)


@pytest.mark.timeout(600)
def test_generate_validate_split_then_a_corrupted_copy_fails_cleanly(ray_session, tmp_path, capsys):
    """The three data commands through the CLI's entry (in this process), then the failing one as
    a user sees it: its own process, exit code 1, the report on stderr, no traceback."""
    run = tmp_path / "D"
    for command in (["data", "generate"], ["data", "validate"], ["data", "split"]):
        code, output = loopfm_in_process(*command, "--out", str(run), capsys=capsys)
        assert code == 0, output[-3000:]
    assert "label rate" in output and "boundaries valid_start_ts=" in output
    events, splits = read_manifest(run / "data" / "events"), read_manifest(run / "data" / "splits")
    assert events["rows"] == read_manifest(run / "data" / "source")["rows"] == sum(splits["rows"].values())

    corrupt_copy(run / "data" / "source", tmp_path / "copy")
    done = run_loopfm("data", "validate", "--out", str(tmp_path / "E"), "--set", "data.source=events",
                  "--set", f"data.path={tmp_path / 'copy'}", "--set", "data.columns.categorical=[user_segment]",
                  "--set", "data.validation.strict=true", cwd=tmp_path)
    assert done.returncode == 1
    assert "loopfm data validate: error: event log" in done.stderr
    assert "label_out_of_range: 3 rows" in done.stderr and "null_required: 2 rows" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "E" / "data" / "events").exists()
