"""Validation rules: one log with one defective file per rule, validated once per mode.

Each rule's test reads its count and first example from that run's report, so removing the rule
makes its test fail; the lenient run must keep exactly the rows no rule flags, the strict run
must fail with the count of every rule and write nothing.
"""

import json

import pyarrow.parquet as pq
import pytest

from loopfm.config import load_config
from loopfm.datasets.ingest import report_path, validate_stage
from loopfm.errors import DataValidationError
from loopfm.rundir import RunDir

HEADER = ("event_id", "user_id", "item_id", "ts", "label")

# file -> rows (event_id, user_id, item_id, ts, label, bad); files are read in name order.
LOG = {
    "1-good.csv": [(1, 10, 100, 1, 1, False), (2, 11, 101, 2, 0, False), (3, 12, 102, 3, 0, False)],
    "2-null.csv": [(20, 13, 103, 4, 1, False), (21, "", 104, 5, 0, True), (22, 14, 105, 6, 1, False)],
    "3-type.csv": [(30, 15, 106, 7, 0, False), (31, 16, "12.5", 8, 1, True), (32, 17, 107, "soon", 0, True)],
    "4-label.csv": [(40, 18, 108, 9, 3, True), (41, 19, 109, 10, 1, False)],
    "5-negative.csv": [(50, 20, 110, 11, 0, False), (51, 21, -7, 12, 1, True)],
    "6-duplicate.csv": [(60, 22, 111, 13, 1, False), (61, 23, 112, 14, 0, False), (1, 24, 113, 15, 1, True)],
    "7-order.csv": [(70, 25, 114, 10, 0, False), (71, 26, 115, 30, 1, False), (72, 27, 116, 20, 0, True)],
}
BROKEN_FILES = {
    "8-missing.csv": "event_id,user_id,item_id,ts\n80,28,117,16\n",
    "9-unreadable.csv": "event_id,user_id,item_id,ts,label\n90,29,118,17,0\n91,30,119\n",
}
# rule -> (file, count, example row, text in the example's problem)
EXPECTED = {
    "null_required": ("2-null.csv", 1, 1, "null user_id"),
    "wrong_type": ("3-type.csv", 2, 1, "item_id='12.5' is not an integer"),
    "label_out_of_range": ("4-label.csv", 1, 0, "label=3 is not 0 or 1"),
    "negative_id": ("5-negative.csv", 1, 1, "item_id=-7 is negative"),
    "duplicate_event_id": ("6-duplicate.csv", 1, 2, "event_id 1 already at 1-good.csv row 0"),
    "out_of_order": ("7-order.csv", 1, 2, "ts=20 is earlier than ts=30"),
    "missing_column": ("8-missing.csv", 1, 0, "missing label; the file has event_id, user_id, item_id, ts"),
    "unreadable_file": ("9-unreadable.csv", 1, 0, "Expected 5 columns, got 3"),
}
_runs: dict = {}


def write_log(root):
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in LOG.items():
        lines = [",".join(HEADER)] + [",".join(str(v) for v in row[:5]) for row in rows]
        (root / name).write_text("\n".join(lines) + "\n")
    for name, text in BROKEN_FILES.items():
        (root / name).write_text(text)
    return root


def config(log, *overrides):
    return load_config(None, ["data.source=events", f"data.path={log}", "data.sorted_by_ts=true",
                              "ray.progress_bars=false", *overrides])


@pytest.fixture
def lenient(ray_session, tmp_path_factory):
    """The defect log validated once in lenient mode: (run directory, report)."""
    if "lenient" not in _runs:
        base = tmp_path_factory.mktemp("defects")
        run = RunDir(base / "run")
        validate_stage(config(write_log(base / "log")), run)
        _runs["lenient"] = (run, json.loads(report_path(run).read_text()))
    return _runs["lenient"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rule", list(EXPECTED))
def test_rule_counts_and_shows_its_defect(lenient, rule):
    _, report = lenient
    file, count, row, problem = EXPECTED[rule]
    found = report["rules"][rule]
    assert found["count"] == count
    example = found["examples"][0]
    assert (example["file"], example["row"]) == (file, row)
    assert problem in example["problem"]


@pytest.mark.timeout(120)
def test_lenient_keeps_exactly_the_rows_no_rule_flags(lenient):
    run, report = lenient
    kept = pq.read_table(list(run.events.glob("*.parquet")), columns=list(HEADER)).to_pylist()
    expected = [row[:5] for rows in LOG.values() for row in rows if not row[5]]
    assert sorted(tuple(r.values()) for r in kept) == sorted(expected)
    row_defects = sum(report["rules"][r]["count"] for r in EXPECTED if report["rules"][r]["unit"] == "rows")
    read = sum(len(rows) for rows in LOG.values())
    assert report["rows_read"] == read and report["rows_kept"] == read - row_defects == len(expected)
    manifest = json.loads((run.events / "manifest.json").read_text())
    assert manifest["invalid"] == {rule: report["rules"][rule]["count"] for rule in report["rules"]}


@pytest.mark.timeout(120)
def test_strict_fails_with_every_count_and_writes_no_events(ray_session, tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataValidationError) as err:
        validate_stage(config(write_log(tmp_path / "log"), "data.validation.strict=true"), run)
    message = str(err.value)
    for rule, (_, count, _, _) in EXPECTED.items():
        assert f"{rule}: {count} " in message
    assert "strict mode" in message and str(report_path(run)) in message
    assert not run.events.exists()
    assert json.loads(report_path(run).read_text())["passed"] is False


@pytest.mark.timeout(120)
def test_nothing_valid_left_fails_in_lenient_mode(ray_session, tmp_path):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "all-bad.csv").write_text("user_id,item_id,ts,label\n1,2,3,7\n4,5,x,1\n")
    with pytest.raises(DataValidationError, match="no valid rows left") as err:
        validate_stage(config(tmp_path / "log"), RunDir(tmp_path / "run"))
    assert "label_out_of_range: 1 rows" in str(err.value) and "wrong_type: 1 rows" in str(err.value)


@pytest.mark.timeout(120)
def test_empty_log_fails(ray_session, tmp_path):
    (tmp_path / "empty.csv").write_text("user_id,item_id,ts,label\n")
    with pytest.raises(DataValidationError, match="empty: 1 files hold no rows"):
        validate_stage(config(tmp_path / "empty.csv"), RunDir(tmp_path / "run"))
