"""The event contract's validation rules, checked batch-wise in Ray Data, and the report.

Row rules are checked per block (`check_batch`, a `map_batches` function) and recorded as a
bitmask per row plus a few example rows per rule; `audit` then adds them up. Duplicate event ids
and time order span blocks, so they are found by one distributed sort and a streaming pass
(`find_duplicates`, `find_out_of_order`): the driver holds one batch and the offending rows,
never the log. File rules (unreadable, missing column) are known from the headers (readers.py).

Strict mode fails on any defect; lenient mode drops the defective rows (for duplicates, every
copy after the first in file order) and reports them. Both fail when nothing valid is left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.expressions import col

from loopfm.datasets.readers import ERROR, FILE_SHIFT, SRC, UNTYPED, Source
from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, REQUIRED, SURFACE, TS, USER_ID, event_schema
from loopfm.errors import DataValidationError
from loopfm.location import as_path


@dataclass(frozen=True)
class Rule:
    name: str
    unit: str  # what `count` counts: rows or files
    meaning: str


RULES = (
    Rule("unreadable_file", "files",
         "a file that cannot be opened, stops parsing part-way, or names a mapped column twice"),
    Rule("missing_column", "files", "a file without a required column (its rows are not read)"),
    Rule("null_required", "rows", "a null user_id, item_id, ts or label (or event_id, where the log has one)"),
    Rule("wrong_type", "rows", "a value that is not an integer: text in ts/label/surface, or a fractional number"),
    Rule("label_out_of_range", "rows", "a label other than 0 or 1"),
    Rule("negative_id", "rows", "a negative user_id, item_id, event_id or surface"),
    Rule("duplicate_event_id", "rows", "an event id seen earlier in file order (the first copy is kept)"),
    Rule("out_of_order", "rows", "a ts below an earlier row's in its file, where the log promises ts order"),
)
BIT = {rule.name: np.int32(1 << i) for i, rule in enumerate(RULES)}
DEFECTS = "_defects"
EXAMPLE = "_example"
ROW_MASK = (1 << FILE_SHIFT) - 1
SCAN_BATCH_ROWS = 1 << 20


# -- per-block rules --------------------------------------------------------------------------


def check_batch(table: pa.Table, *, files: list[str], categorical: list[str], max_examples: int) -> pa.Table:
    """map_batches fn: normalized event columns plus `_src`, `_defects` and `_example`."""
    n = table.num_rows
    defects = np.zeros(n, np.int32)
    found: dict[str, tuple[np.ndarray, list[str]]] = {}

    def flag(rule: str, rows: np.ndarray, problem) -> None:
        defects[rows] |= BIT[rule]
        first = rows[:max_examples]
        found[rule] = (first, [problem(int(r)) for r in first])

    values = {c: table[c].combine_chunks() for c in (EVENT_ID, USER_ID, ITEM_ID, CATEGORY, SURFACE, TS, LABEL)}
    is_null = {c: ~v.is_valid().to_numpy(zero_copy_only=False) for c, v in values.items()}
    filled = {c: v.fill_null(0).to_numpy() for c, v in values.items()}

    marker = table[ERROR].is_valid().to_numpy(zero_copy_only=False)
    errors = table[ERROR].to_pylist() if marker.any() else None
    if marker.any():
        flag("unreadable_file", np.flatnonzero(marker), lambda r: errors[r])

    untyped = _untyped_cells(table[UNTYPED])
    if untyped:
        rows = np.array(sorted(untyped))
        flag("wrong_type", rows, lambda r: "; ".join(f"{c}={v!r} is not an integer" for c, v in untyped[r].items()))

    null = np.zeros(n, bool)
    for column in (*REQUIRED, EVENT_ID):
        mask = is_null[column] & ~marker
        for r, cells in untyped.items():
            mask[r] &= column not in cells  # present but untyped: a wrong_type, not a null
        null |= mask
    if null.any():
        flag("null_required", np.flatnonzero(null), lambda r: "null " + ", ".join(
            c for c in (*REQUIRED, EVENT_ID) if is_null[c][r] and c not in untyped.get(r, {})))

    label = filled[LABEL]
    out_of_range = ~is_null[LABEL] & (label != 0) & (label != 1)
    if out_of_range.any():
        flag("label_out_of_range", np.flatnonzero(out_of_range), lambda r: f"label={label[r]} is not 0 or 1")

    id_columns = (USER_ID, ITEM_ID, EVENT_ID, SURFACE)
    negative = np.logical_or.reduce([~is_null[c] & (filled[c] < 0) for c in id_columns])
    if negative.any():
        flag("negative_id", np.flatnonzero(negative), lambda r: ", ".join(
            f"{c}={filled[c][r]}" for c in id_columns if not is_null[c][r] and filled[c][r] < 0) + " is negative")

    src = table[SRC].to_numpy()
    good = defects == 0
    out = {c: pa.array(np.where(good, filled[c], 0)) for c in (EVENT_ID, USER_ID, ITEM_ID, CATEGORY, TS)}
    out[SURFACE] = pa.array(np.where(good, filled[SURFACE], 0).astype(np.int32))
    out[LABEL] = pa.array(np.where(good, label, 0).astype(np.int8))
    for c in categorical:
        out[c] = table[c].combine_chunks().fill_null(0)
    out[SRC] = pa.array(src)
    out[DEFECTS] = pa.array(defects)
    out[EXAMPLE] = _examples(found, n, src, files, table)
    schema = event_schema(categorical)
    return pa.table({name: out[name] for name in schema.names} | {k: out[k] for k in (SRC, DEFECTS, EXAMPLE)})


def _untyped_cells(column) -> dict[int, dict[str, str]]:
    mask = column.is_valid().to_numpy(zero_copy_only=False)
    if not mask.any():
        return {}
    text = column.to_pylist()
    return {int(r): json.loads(text[r]) for r in np.flatnonzero(mask)}


def _examples(found: dict, n: int, src: np.ndarray, files: list[str], table: pa.Table) -> pa.Array:
    """JSON list of {rule, file, row, problem, values} on the rows chosen as examples, else null."""
    per_row: dict[int, list[dict]] = {}
    for rule, (rows, problems) in found.items():
        for r, problem in zip(rows, problems):
            per_row.setdefault(int(r), []).append({"rule": rule, **where(int(src[r]), files), "problem": problem})
    text = [None] * n
    for r, items in per_row.items():
        row = table.slice(r, 1).to_pylist()[0]
        values = {c: v for c, v in row.items() if v is not None and c not in (SRC, UNTYPED, ERROR)}
        values |= json.loads(row[UNTYPED]) if row[UNTYPED] else {}
        text[r] = json.dumps([{**item, "values": values} for item in items])
    return pa.array(text, pa.string())


def where(src: int, files: list[str]) -> dict:
    """{"file", "row"} of a row position; rows count from 0, the header not included."""
    return {"file": files[src >> FILE_SHIFT], "row": src & ROW_MASK}


# -- adding it up -----------------------------------------------------------------------------


def tally(table: pa.Table) -> dict:
    """Counts, examples and kept-row statistics of some checked rows."""
    defects = table[DEFECTS].to_numpy()
    kept = defects == 0
    read = (defects & BIT["unreadable_file"]) == 0  # marker rows stand for files, not rows
    ids = np.unique(table[EVENT_ID].to_numpy()[kept])
    surface = table[SURFACE].to_numpy()[kept]
    return {
        "counts": {rule: int(((defects & bit) != 0).sum()) for rule, bit in BIT.items()},
        "examples": [e for text in table[EXAMPLE].drop_null().to_pylist() for e in json.loads(text)],
        "rows": int(read.sum()),
        "kept": int(kept.sum()),
        "max_surface": int(surface.max()) if len(surface) else -1,
        "file_rows": np.bincount(table[SRC].to_numpy()[read] >> FILE_SHIFT).tolist(),
        "id_range": (int(ids[0]), int(ids[-1])) if len(ids) else None,
        "ids_repeat": len(ids) < int(kept.sum()),
    }


class CheckedSink(Datasink):
    """Writes checked rows as parquet and hands each write task's `tally` back to the driver.

    One file per write task, named by the task's index, so a retried task rewrites its own file.
    """

    def __init__(self, path: Path):
        self.path = as_path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.tallies: list[dict] = []

    def write(self, blocks, ctx) -> dict:
        table = pa.concat_tables(list(blocks))
        pq.write_table(table, str(self.path / f"part-{ctx.task_idx:05d}.parquet"))  # a path or a URI
        return tally(table)

    def on_write_complete(self, write_result) -> None:
        self.tallies = list(write_result.write_returns)


def ids_may_repeat(tallies: list[dict]) -> bool:
    """False when every write task's kept ids are distinct and their ranges do not overlap."""
    ranges = sorted(t["id_range"] for t in tallies if t["id_range"])
    return any(t["ids_repeat"] for t in tallies) or any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


@dataclass
class Report:
    """What validation found: a count and example rows per rule (written as validation.json)."""

    source: str
    strict: bool
    files: list[str]
    rows_read: int = 0
    rows_kept: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {r.name: 0 for r in RULES})
    examples: dict[str, list[dict]] = field(default_factory=lambda: {r.name: [] for r in RULES})
    max_surface: int = -1
    file_rows: list[int] = field(default_factory=list)

    @property
    def defects(self) -> int:
        return sum(self.counts.values())

    def add(self, rule: str, count: int, examples: list[dict], max_examples: int) -> None:
        self.counts[rule] += count
        self.examples[rule] = (self.examples[rule] + examples)[:max_examples]

    def merge(self, tally: dict) -> None:
        self.rows_read += tally["rows"]
        self.rows_kept += tally["kept"]
        self.max_surface = max(self.max_surface, tally["max_surface"])
        for i, n in enumerate(tally["file_rows"]):
            self.file_rows[i] += n
        for rule, n in tally["counts"].items():
            self.counts[rule] += n
        for e in tally["examples"]:
            self.examples[e["rule"]].append(e)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "mode": "strict" if self.strict else "lenient",
            "passed": self.defects == 0 or (not self.strict and self.rows_kept > 0),
            "files": len(self.files),
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_read - self.rows_kept,
            "rules": {
                r.name: {
                    "count": self.counts[r.name], "unit": r.unit, "meaning": r.meaning,
                    "examples": self.examples[r.name],
                }
                for r in RULES
            },
        }

    def summary(self) -> list[str]:
        """One line per rule that fired, with its first example."""
        lines = []
        for r in RULES:
            if self.counts[r.name]:
                e = self.examples[r.name][0] if self.examples[r.name] else None
                at = f", e.g. {e['file']} row {e['row']}: {e['problem']}" if e else ""
                lines.append(f"  {r.name}: {self.counts[r.name]} {r.unit}{at}")
        return lines


def audit(tallies: list[dict], checked, source: Source, strict: bool, max_examples: int) -> tuple[Report, np.ndarray]:
    """The report and the rows to drop: per-task tallies added up, then the cross-block rules."""
    files = [f.name for f in source.files]
    report = Report(source=source.root, strict=strict, files=files, file_rows=[0] * len(files))
    _add_file_rules(report, source, max_examples)
    for t in tallies:
        report.merge(t)
    order = {name: i for i, name in enumerate(files)}
    for rule in BIT:  # the first examples in file order, whichever task finished first
        report.examples[rule] = sorted(report.examples[rule], key=lambda e: (order[e["file"]], e["row"]))[:max_examples]
    drop = np.empty(0, np.int64)
    if checked is None:  # nothing was read
        return report, drop
    finders = []
    if source.layout.sorted_by_ts:
        finders.append(("out_of_order", find_out_of_order))
    if source.has_event_ids() and ids_may_repeat(tallies):
        finders.append(("duplicate_event_id", find_duplicates))
    for rule, finder in finders:
        rows, examples = finder(checked, files, max_examples)
        report.add(rule, len(rows), examples, max_examples)
        drop = np.union1d(drop, rows)
    report.rows_kept -= len(drop)
    return report, drop


def _add_file_rules(report: Report, source: Source, max_examples: int) -> None:
    for f in source.files:
        if f.error:
            rule, problem = "unreadable_file", f.error
        elif f.missing:
            rule, problem = "missing_column", f"missing {', '.join(f.missing)}; the file has {', '.join(f.columns)}"
        else:
            continue
        report.add(rule, 1, [{"rule": rule, "file": f.name, "row": 0, "problem": problem}], max_examples)


def fail_if_invalid(report: Report, report_path) -> None:
    """Strict mode: any defect fails. Both modes: nothing valid left, or nothing at all, fails."""
    if report.rows_read == 0 and report.defects == 0:
        raise DataValidationError(f"event log {report.source} is empty: {len(report.files)} files hold no rows")
    if report.rows_kept > 0 and (report.defects == 0 or not report.strict):
        return
    why = "strict mode" if report.rows_kept > 0 else "no valid rows left"
    head = (f"event log {report.source} failed validation ({why}): "
            f"{report.rows_read} rows read, {report.rows_kept} valid")
    raise DataValidationError("\n".join([head, *report.summary(), f"full report: {report_path}"]))


# -- cross-block rules: one distributed sort, one streaming pass ------------------------------


def _sorted_scan(checked, columns: list[str], key) -> Iterator[dict]:
    """The valid rows' `columns`, sorted by `key` across the cluster, to the driver a batch at a time."""
    valid = checked.filter(expr=col(DEFECTS) == 0).select_columns(columns)
    return valid.sort(key).iter_batches(batch_format="numpy", batch_size=SCAN_BATCH_ROWS)


def find_duplicates(checked, files: list[str], max_examples: int) -> tuple[np.ndarray, list[dict]]:
    """`_src` of every copy of an event id after its first (in file order), and the first examples in file order."""
    drop: list[np.ndarray] = []
    firsts_of: list[np.ndarray] = []
    ids_of: list[np.ndarray] = []
    last_id, first_src = None, None
    for batch in _sorted_scan(checked, [EVENT_ID, SRC], key=[EVENT_ID, SRC]):
        ids, srcs = batch[EVENT_ID], batch[SRC]
        previous = np.concatenate([[ids[0] - 1 if last_id is None else last_id], ids[:-1]])
        repeat = ids == previous
        if repeat.any():
            run_start = np.maximum.accumulate(np.where(~repeat, np.arange(len(ids)), -1))
            firsts = np.where(run_start >= 0, srcs[np.maximum(run_start, 0)], first_src)
            drop.append(srcs[repeat])
            firsts_of.append(firsts[repeat])
            ids_of.append(ids[repeat])
        if (~repeat).any():
            first_src = srcs[np.flatnonzero(~repeat)[-1]]
        last_id = ids[-1]
    if not drop:
        return np.empty(0, np.int64), []
    srcs, firsts, ids = (np.concatenate(parts) for parts in (drop, firsts_of, ids_of))
    examples = []
    for r in np.argsort(srcs, kind="stable")[:max_examples]:  # the scan ran in id order; examples go in file order
        first = where(int(firsts[r]), files)
        examples.append({"rule": "duplicate_event_id", **where(int(srcs[r]), files),
                         "problem": f"event_id {ids[r]} already at {first['file']} row {first['row']}"})
    return srcs, examples


def find_out_of_order(checked, files: list[str], max_examples: int) -> tuple[np.ndarray, list[dict]]:
    """`_src` of every row whose ts is below the largest ts before it in its file, and examples."""
    bad: list[np.ndarray] = []
    examples: list[dict] = []
    carry_file, carry_max = -1, np.iinfo(np.int64).min
    for batch in _sorted_scan(checked, [SRC, TS], key=SRC):
        srcs, ts = batch[SRC], batch[TS]
        file_of = srcs >> FILE_SHIFT
        before = np.empty_like(ts)  # largest ts at earlier rows of the same file
        for f in np.unique(file_of):
            rows = np.flatnonzero(file_of == f)
            start = carry_max if f == carry_file else np.iinfo(np.int64).min
            running = np.maximum.accumulate(np.concatenate([[start], ts[rows]]))
            before[rows] = running[:-1]
            carry_file, carry_max = int(f), int(running[-1])
        late = ts < before
        for r in np.flatnonzero(late)[: max(0, max_examples - len(examples))]:
            examples.append({"rule": "out_of_order", **where(int(srcs[r]), files),
                             "problem": f"ts={ts[r]} is earlier than ts={before[r]} at a previous row"})
        bad.append(srcs[late])
    return (np.concatenate(bad) if bad else np.empty(0, np.int64)), examples


def keep_batch(table: pa.Table, *, drop_ref, columns: list[str]) -> pa.Table:
    """map_batches fn: the rows that passed every rule, in the event schema."""
    drop = ray.get(drop_ref)
    keep = pc.equal(table[DEFECTS], 0).to_numpy(zero_copy_only=False)
    if len(drop):
        keep &= ~np.isin(table[SRC].to_numpy(), drop)
    return table.select(columns).filter(pa.array(keep))


def num_surfaces(report: Report) -> int:
    return max(report.max_surface, 0) + 1
