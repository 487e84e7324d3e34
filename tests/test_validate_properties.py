"""Property-based validation (issue 7, item 5): generated malformed event logs, in CSV and parquet.

Hypothesis writes logs of 1-3 files whose cells are valid values, nulls, negative ids, fractional
numbers, text, integral floats and out-of-range labels, and whose files may lack or misname a
required column, hold no rows, be empty (0 bytes), cut short or ragged. An independent oracle
(`expect`) says, per row, which rules of docs/DATA.md it breaks. Every generated log must then give
exactly the documented result:

- lenient: the report's count per rule equals the oracle's, `rows_kept + rows_dropped == rows_read`
  (the rows of readable files), and the rows written are exactly the rows no rule flags;
- strict, or nothing valid left, or no rows at all: a `DataValidationError` whose message names
  each rule that fired with its count (or says the log is empty); never another exception.

The property loop runs the real per-file reader (`EventFileDatasource._read_stream`), the real
`check_batch`, `tally`, `audit` (duplicate and time-order scans included), `fail_if_invalid` and
`keep_batch`, without Ray: only the distributed sort in `_sorted_scan` is replaced by an in-memory
sort that yields tiny batches (so the scans' carry-over between batches is exercised too), and
`ray.get` by the identity. One Ray-level test then runs the same oracle against `validate_stage`
(Ray Data end to end), and one runs `loopfm data validate` as a user does and checks that a strict
failure prints the report and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loopfm.config import ColumnMapping, load_config
from loopfm.datasets import validate
from loopfm.datasets.readers import Contract, EventFileDatasource, generic_layout, open_source, stable_hash_ids
from loopfm.datasets.schema import event_schema
from loopfm.errors import DataValidationError

IDS = ("event_id", "user_id", "item_id")
REQUIRED = ("user_id", "item_id", "ts", "label")
COLUMNS = ("event_id", "user_id", "item_id", "ts", "label", "surface")
MAX_EXAMPLES = 3

# -- generated logs ---------------------------------------------------------------------------
# A cell is (kind, value): int (a typed integer, possibly negative or an out-of-range label),
# null, frac (a fractional number), text (hashed in id columns, a wrong type elsewhere), intfloat
# (an integral float, "3.0": the integer 3).


def good_cells(column: str):
    value = {"label": st.integers(0, 1), "ts": st.integers(0, 40), "surface": st.integers(0, 3)}.get(
        column, st.integers(0, 12))  # small ids: duplicates are common
    kinds = [st.tuples(st.just("int"), value), st.tuples(st.just("intfloat"), value)]
    if column in IDS:
        kinds.append(st.tuples(st.just("text"), st.sampled_from(["u1", "alice", "x9"])))  # hashed: a valid id
    return st.one_of(*kinds)


def cells(column: str):
    good = {"label": st.integers(0, 1), "ts": st.integers(0, 40), "surface": st.integers(0, 3)}.get(
        column, st.integers(0, 12))
    bad_int = {"label": st.sampled_from([-1, 2, 7]), "ts": st.integers(-5, -1)}.get(column, st.integers(-9, -1))
    kinds = [
        st.tuples(st.just("int"), good),
        st.tuples(st.just("int"), good),
        st.tuples(st.just("int"), good),
        st.tuples(st.just("int"), bad_int),
        st.tuples(st.just("null"), st.none()),
        st.tuples(st.just("frac"), st.sampled_from([0.5, 2.5, -1.25])),
        st.tuples(st.just("text"), st.sampled_from(["u1", "abc", "x9"])),
        st.tuples(st.just("intfloat"), st.integers(0, 1) if column == "label" else st.integers(0, 12)),
    ]
    return st.one_of(*kinds)


@st.composite
def files(draw, columns: tuple[str, ...]):
    """(kind, rows); kind: ok, missing:<col>, renamed:<col>, twice:<col>, header_only, zero_bytes, broken."""
    kind = draw(st.sampled_from(["ok"] * 5 + ["missing", "renamed", "twice", "header_only", "zero_bytes", "broken"]))
    n = 0 if kind in ("header_only", "zero_bytes") else draw(st.integers(1, 6))
    rows = [tuple(draw((good_cells if clean else cells)(c)) for c in columns)
            for clean in draw(st.lists(st.booleans(), min_size=n, max_size=n))]
    if kind in ("missing", "renamed", "twice"):
        kind += ":" + draw(st.sampled_from(REQUIRED))
    return kind, rows


@st.composite
def logs(draw):
    columns = tuple(c for c in COLUMNS if c in REQUIRED or draw(st.booleans()))
    return {
        "fmt": draw(st.sampled_from(["csv", "parquet"])),
        "columns": columns,
        "files": draw(st.lists(files(columns), min_size=1, max_size=3)),
        "sorted_by_ts": draw(st.booleans()),
    }


def text_of(cell) -> str | None:
    kind, v = cell
    return None if kind == "null" else f"{v}.0" if kind == "intfloat" else str(v)


def parquet_column(column_cells) -> pa.Array:
    """The narrowest arrow type that holds the cells, as a real log would store them."""
    kinds = {k for k, _ in column_cells}
    if kinds <= {"int", "null"}:
        return pa.array([v for _, v in column_cells], pa.int64())
    if kinds <= {"int", "null", "frac", "intfloat"}:
        return pa.array([None if v is None else float(v) for _, v in column_cells], pa.float64())
    return pa.array([text_of(c) for c in column_cells], pa.string())


def write_log(root: Path, log: dict) -> list[str]:
    """The log's files, named in read order."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (kind, rows) in enumerate(log["files"]):
        header = list(log["columns"])
        if kind.startswith("missing:"):
            header[header.index(kind.split(":")[1])] = None
        elif kind.startswith("renamed:"):
            col = kind.split(":")[1]
            header[header.index(col)] = col.upper() + "_"
        keep = [j for j, h in enumerate(header) if h is not None]
        if kind.startswith("twice:"):  # the column again, at the end
            keep.append(header.index(kind.split(":")[1]))
        path = root / f"{i}-{kind.replace(':', '-')}.{log['fmt']}"
        names.append(path.name)
        if kind == "zero_bytes":
            path.write_bytes(b"")
        elif log["fmt"] == "csv":
            lines = [",".join(header[j] for j in keep)]
            lines += [",".join(text_of(row[j]) or "" for j in keep) for row in rows]
            if kind == "broken":
                lines.insert(len(lines) // 2 + 1, "1,2")  # a ragged line: too few fields
            path.write_text("\n".join(lines) + "\n")
        else:
            table = pa.Table.from_arrays(
                [parquet_column([row[j] for row in rows]) if rows else pa.array([], pa.int64()) for j in keep],
                names=[header[j] for j in keep])
            pq.write_table(table, path)
            if kind == "broken":  # cut short: the footer is gone
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
    return names


# -- the oracle -------------------------------------------------------------------------------


def typed(cell, column: str):
    """("v", int) | ("null",) | ("bad",): what the contract makes of one cell."""
    kind, v = cell
    if kind == "null":
        return ("null",)
    if kind in ("int", "intfloat"):
        return ("v", int(v))
    if kind == "text" and column in IDS:
        return ("v", int(stable_hash_ids(np.array([v], dtype=object))[0]))
    return ("bad",)


def expect(log: dict, names: list[str]) -> dict:
    """Counts per rule, rows read per file, kept rows, per rule the (file, row) it flags (files: row 0),
    and for each duplicate the (file, row) of its id's first copy."""
    counts = {r.name: 0 for r in validate.RULES}
    flagged = {r.name: set() for r in validate.RULES}
    file_rows, valid = [], []  # valid: (file index, row, event tuple) with no row defect
    for i, ((kind, rows), name) in enumerate(zip(log["files"], names)):
        if kind in ("zero_bytes", "broken") or kind.startswith("twice:"):
            counts["unreadable_file"] += 1
            flagged["unreadable_file"].add((name, 0))
            file_rows.append(0)
            continue
        if kind.startswith(("missing", "renamed")):
            counts["missing_column"] += 1
            flagged["missing_column"].add((name, 0))
            file_rows.append(0)
            continue
        file_rows.append(len(rows))
        for r, row in enumerate(rows):
            t = {c: typed(cell, c) for c, cell in zip(log["columns"], row)}
            value = {c: x[1] for c, x in t.items() if x[0] == "v"}
            broken = set()
            if any(x[0] == "bad" for x in t.values()):
                broken.add("wrong_type")
            if any(t[c][0] == "null" for c in (*REQUIRED, "event_id") if c in t):
                broken.add("null_required")
            if "label" in value and value["label"] not in (0, 1):
                broken.add("label_out_of_range")
            if any(value.get(c, 0) < 0 for c in (*IDS, "surface")):
                broken.add("negative_id")
            for rule in broken:
                counts[rule] += 1
                flagged[rule].add((name, r))
            if not broken:
                event_id = value["event_id"] if "event_id" in t else (i << 40) + r
                event = (event_id, value["user_id"], value["item_id"], value["ts"], value["label"],
                         value.get("surface", 0))
                valid.append((i, r, event))
    drop = set()
    seen, first_copy = {}, {}
    for i, r, event in valid:  # file order
        if event[0] in seen:
            drop.add((i, r))
            flagged["duplicate_event_id"].add((names[i], r))
            first_copy[(names[i], r)] = seen[event[0]]
        seen.setdefault(event[0], (names[i], r))
    counts["duplicate_event_id"] = len(flagged["duplicate_event_id"])
    if log["sorted_by_ts"]:
        top = {}
        for i, r, event in valid:
            if event[3] < top.get(i, event[3]):
                drop.add((i, r))
                flagged["out_of_order"].add((names[i], r))
            top[i] = max(top.get(i, event[3]), event[3])
        counts["out_of_order"] = len(flagged["out_of_order"])
    kept = sorted(event for i, r, event in valid if (i, r) not in drop)
    return {"counts": counts, "flagged": flagged, "file_rows": file_rows, "kept": kept, "first_copy": first_copy}


def check(log: dict, names: list[str], strict: bool, report: dict, error: Exception | None, kept_rows):
    """The documented outcome: the report equals the oracle's, and the run fails exactly when it should."""
    want = expect(log, names)
    got = {rule: r["count"] for rule, r in report["rules"].items()}
    assert got == want["counts"], (got, want["counts"])
    assert report["rows_read"] == sum(want["file_rows"])
    assert report["rows_kept"] + report["rows_dropped"] == report["rows_read"]
    assert report["rows_kept"] == len(want["kept"])
    order = {name: i for i, name in enumerate(names)}
    for rule, r in report["rules"].items():
        assert len(r["examples"]) == min(r["count"], MAX_EXAMPLES), rule
        shown = [(e["file"], e["row"]) for e in r["examples"]]
        first = sorted(want["flagged"][rule], key=lambda fr: (order[fr[0]], fr[1]))[:MAX_EXAMPLES]
        assert shown == first, (rule, shown, first)  # the first offending rows (or files) in file order
    for e in report["rules"]["duplicate_event_id"]["examples"]:
        assert "already at {} row {}".format(*want["first_copy"][(e["file"], e["row"])]) in e["problem"], e
    defects = sum(want["counts"].values())
    if sum(want["file_rows"]) == 0 and defects == 0:
        assert isinstance(error, DataValidationError) and "is empty" in str(error)
    elif want["kept"] and (defects == 0 or not strict):
        assert error is None, error
        assert report["passed"] is True
        assert sorted(kept_rows) == want["kept"]
    else:
        assert isinstance(error, DataValidationError), error
        message = str(error)
        assert ("strict mode" if want["kept"] else "no valid rows left") in message
        for rule, n in want["counts"].items():
            if n:
                assert f"  {rule}: {n} " in message, (rule, message)
        assert report["passed"] is False


# -- the validation core, without Ray ---------------------------------------------------------


def read_file(source, f) -> list[pa.Table]:
    """One file through the real `EventFileDatasource._read_stream` (Ray's file opening aside)."""
    reader = object.__new__(EventFileDatasource)  # its __init__ would start Ray
    reader._by_path = {os.path.abspath(f.path): f}
    reader._fmt = source.fmt
    reader._contract = Contract(source.layout)
    reader._wanted = source.layout.source_columns()
    opened = pa.OSFile(f.path) if source.fmt == "parquet" else pa.input_stream(f.path, compression="detect")
    with opened as stream:
        return list(reader._read_stream(stream, f.path))


def table_scan(batch_rows: int):
    def scan(checked: pa.Table, columns, key):
        keys = [key] if isinstance(key, str) else key
        valid = checked.filter(pa.compute.equal(checked[validate.DEFECTS], 0)).select(columns)
        valid = valid.sort_by([(k, "ascending") for k in keys])
        for start in range(0, valid.num_rows, batch_rows):
            part = valid.slice(start, batch_rows)
            yield {c: part[c].to_numpy() for c in columns}
    return scan


def validate_core(root: Path, fmt: str, sorted_by_ts: bool, strict: bool, scan_rows: int = 2):
    """(report JSON, error or None, kept rows as tuples): `ingest.validate_stage` minus Ray."""
    source = open_source(str(root), fmt, generic_layout(ColumnMapping(), sorted_by_ts=sorted_by_ts))
    names = [f.name for f in source.files]
    blocks, tallies = [], []
    for f in source.usable():
        for chunk in read_file(source, f):
            block = validate.check_batch(chunk, files=names, categorical=[], max_examples=MAX_EXAMPLES)
            blocks.append(block)
            tallies.append(validate.tally(block))
    checked = pa.concat_tables(blocks) if blocks else None
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(validate, "_sorted_scan", table_scan(scan_rows)))
        stack.enter_context(mock.patch.object(validate, "ray", SimpleNamespace(get=lambda ref: ref)))
        report, drop = validate.audit(tallies, checked, source, strict, MAX_EXAMPLES)
        error, kept = None, []
        try:
            validate.fail_if_invalid(report, root / "validation.json")
        except DataValidationError as err:
            error = err
        else:
            table = validate.keep_batch(checked, drop_ref=drop, columns=event_schema().names)
            assert table.schema.equals(event_schema())
            kept = [(r["event_id"], r["user_id"], r["item_id"], r["ts"], r["label"], r["surface"])
                    for r in table.to_pylist()]
    return report.to_json(), error, kept


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])
# Hand-written cases kept as regression examples: each is one of the defects of docs/DATA.md.
NULL_AND_TYPES = {"fmt": "csv", "columns": ("event_id", "user_id", "item_id", "ts", "label"), "sorted_by_ts": True,
                  "files": [("ok", [(("int", 1), ("null", None), ("int", 2), ("text", "soon"), ("int", 1)),
                                    (("int", 1), ("int", 3), ("frac", 2.5), ("int", 4), ("int", 9)),
                                    (("int", 2), ("int", 3), ("int", 4), ("int", 9), ("intfloat", 1)),
                                    (("int", 2), ("int", -3), ("text", "u1"), ("int", 1), ("int", 0)),
                                    (("int", 2), ("text", "alice"), ("int", 5), ("int", 2), ("int", 0)),
                                    (("int", 4), ("int", 5), ("int", 6), ("int", 12), ("int", 1))])]}
ALL_FILES_BAD = {"fmt": "parquet", "columns": ("user_id", "item_id", "ts", "label"), "sorted_by_ts": False,
                 "files": [("missing:label", [(("int", 1), ("int", 2), ("int", 3), ("int", 0))]),
                           ("zero_bytes", []), ("broken", [(("int", 1), ("int", 2), ("int", 3), ("int", 0))])]}
# Found by probing: a parquet file naming a mapped column twice raised KeyError('Field "user_id" exists 2
# times in schema') inside the read task (a traceback from deep inside Ray); a CSV one silently used the
# first copy. Both are now an unreadable_file with "ambiguous header: user_id appears 2 times".
TWICE = {"fmt": "parquet", "columns": ("event_id", "user_id", "item_id", "ts", "label"), "sorted_by_ts": False,
         "files": [("twice:user_id", [(("int", 1), ("int", 2), ("int", 3), ("int", 4), ("int", 0))]),
                   ("ok", [(("int", 2), ("int", 2), ("int", 3), ("int", 4), ("int", 1))])]}
# Duplicates are found by a scan in id order; their examples must still be the first in file order.
DUPLICATES = {"fmt": "csv", "columns": ("event_id", "user_id", "item_id", "ts", "label"), "sorted_by_ts": False,
              "files": [("ok", [(("int", e), ("int", 1), ("int", 2), ("int", 3), ("int", 0))
                                for e in (9, 9, 1, 1, 5, 5, 0, 0)])]}
EMPTY = {"fmt": "csv", "columns": ("user_id", "item_id", "ts", "label"), "sorted_by_ts": False,
         "files": [("header_only", [])]}


@pytest.mark.timeout(300)
@SETTINGS
@example(log=NULL_AND_TYPES, strict=False)
@example(log=NULL_AND_TYPES, strict=True)
@example(log=ALL_FILES_BAD, strict=False)
@example(log=EMPTY, strict=True)
@example(log=TWICE, strict=False)
@example(log=dict(TWICE, fmt="csv"), strict=False)
@example(log=DUPLICATES, strict=False)
@given(log=logs(), strict=st.booleans())
def test_any_malformed_log_gives_the_documented_report_or_error(tmp_path_factory, log, strict):
    root = tmp_path_factory.mktemp("log")
    names = write_log(root, log)
    report, error, kept = validate_core(root, log["fmt"], log["sorted_by_ts"], strict)
    check(log, names, strict, report, error, kept)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_column_named_twice_is_an_unreadable_file_not_a_crash(tmp_path, fmt):
    log = dict(TWICE, fmt=fmt)
    names = write_log(tmp_path, log)
    report, error, kept = validate_core(tmp_path, fmt, False, False)
    check(log, names, False, report, error, kept)
    [problem] = report["rules"]["unreadable_file"]["examples"]
    assert problem["file"] == names[0] and "ambiguous header: user_id appears 2 times" in problem["problem"]


# -- the same oracle against Ray Data, and the CLI --------------------------------------------


@pytest.mark.timeout(300)
@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@example(log=NULL_AND_TYPES)
@example(log=TWICE)
@example(log=EMPTY)
@given(log=logs())
def test_validate_stage_on_ray_matches_the_oracle(ray_session, tmp_path_factory, log):
    from loopfm.datasets.ingest import report_path, validate_stage
    from loopfm.rundir import RunDir

    base = tmp_path_factory.mktemp("ray")
    names = write_log(base / "log", log)
    cfg = load_config(None, ["data.source=events", f"data.path={base / 'log'}", f"data.format={log['fmt']}",
                             f"data.sorted_by_ts={str(log['sorted_by_ts']).lower()}", "ray.progress_bars=false",
                             f"data.validation.max_examples={MAX_EXAMPLES}"])
    run = RunDir(base / "run")
    error, kept = None, []
    try:
        validate_stage(cfg, run)
    except DataValidationError as err:
        error = err
    else:
        table = pq.read_table(sorted(run.events.glob("*.parquet")))
        kept = [(r["event_id"], r["user_id"], r["item_id"], r["ts"], r["label"], r["surface"])
                for r in table.to_pylist()]
    check(log, names, False, json.loads(report_path(run).read_text()), error, kept)


@pytest.mark.timeout(300)
def test_cli_strict_failure_prints_the_report_and_no_traceback(ray_session, tmp_path):
    write_log(tmp_path / "log", NULL_AND_TYPES)
    log = dict(ALL_FILES_BAD, fmt="csv")
    write_log(tmp_path / "more", log)
    for p in (tmp_path / "more").iterdir():
        p.rename(tmp_path / "log" / ("z" + p.name))
    script = Path(sys.executable).parent / "loopfm"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [str(script), "data", "validate", "--out", str(tmp_path / "R"), "--set", "data.source=events",
         "--set", f"data.path={tmp_path / 'log'}", "--set", "data.validation.strict=true",
         "--set", "data.sorted_by_ts=true", "--set", "ray.progress_bars=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "loopfm data validate: error: event log" in done.stderr and "strict mode" in done.stderr
    for line in ("unreadable_file: 2 files", "missing_column: 1 files", "null_required: 1 rows", "wrong_type: 2 rows",
                 "label_out_of_range: 1 rows", "negative_id: 1 rows", "duplicate_event_id: 1 rows",
                 "out_of_order: 1 rows"):
        assert line in done.stderr, (line, done.stderr[-3000:])
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "R" / "data" / "events").exists()
    assert json.loads((tmp_path / "R" / "data" / "validation.json").read_text())["passed"] is False
