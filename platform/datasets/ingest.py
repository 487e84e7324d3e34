"""`loopfm data validate`: read the configured log, check the contract, write normalized events.

The log is read through Ray Data (readers.py, bars.py), every block is checked by the rules in
validate.py, and the checked rows are staged as parquet inside the output's temp directory by a
sink that hands each write task's counts and examples back. Rules that span blocks (duplicate
ids, time order) then read back two columns of the staged rows; the final pass writes the
surviving rows in the event schema. Strict mode
fails on any defect; lenient mode drops and reports. Either way `<out>/data/validation.json`
says what was found.

Output (`<out>/data/events/`): parquet in `schema.event_schema(categorical)` and `manifest.json`
with the fingerprint, row counts, the count per rule, the categorical columns, the number of
surfaces, what ts means, and the files (with the ts each one starts at, where ts is an order).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import ray

from loopfm.config import DataConfig, LoopFMConfig, stable_hash
from loopfm.datasets import bars, movielens
from loopfm.datasets.readers import FILE_SHIFT, Source, generic_layout, open_source
from loopfm.datasets.schema import event_schema
from loopfm.datasets.validate import BIT, CheckedSink, audit, check_batch, fail_if_invalid, keep_batch, num_surfaces
from loopfm.errors import MissingInputError
from loopfm.location import remove_tree
from loopfm.rundir import RunDir, atomic_write_text, committed, read_manifest
from loopfm.runtime import init_ray, log
from loopfm.skeleton import current, publish


def report_path(run: RunDir) -> Path:
    return run.events.parent / "validation.json"


def open_configured_source(data: DataConfig, run: RunDir) -> tuple[Source, object]:
    """The configured log and what identifies its content (for the fingerprint)."""
    if data.source == "synthetic":
        generated = read_manifest(run.source)
        if generated is None:
            raise MissingInputError(f"no log in {run.source}: run `loopfm data generate` first")
        layout = generic_layout(data.columns, generated.get("categorical", []), bool(data.sorted_by_ts))
        return open_source(str(committed(run.source)), "parquet", layout), generated["fingerprint"]
    if data.source == movielens.SOURCE:  # converted once into run.source, then read as parquet
        return movielens.open_movielens(data, run.source)
    if data.source == "events":
        source = open_source(data.path, data.format, generic_layout(data.columns, sorted_by_ts=bool(data.sorted_by_ts)))
    else:
        layout = bars.LAYOUTS[data.source]
        if data.sorted_by_ts is not None:
            layout = dataclasses.replace(layout, sorted_by_ts=data.sorted_by_ts)
        source = open_source(data.path, "csv", layout, files=bars.release_files(data.path))
    content = [(f.path, os.path.getsize(f.path), os.path.getmtime(f.path)) for f in source.files]
    return source, content


def validate_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    """`loopfm data validate`."""
    data = cfg.data
    source, content = open_configured_source(data, run)
    fingerprint = stable_hash(content, data.model_dump(exclude={"synthetic", "split", "vertical"}))
    done = current("data validate", run.events, fingerprint, read_manifest)
    if done is not None:
        return done
    init_ray(cfg.ray)
    manifest = validate_source(cfg, source, run.events, report_path(run), {"fingerprint": fingerprint,
                                                                            "source": data.source})
    log.info(
        "data validate: %d of %d rows kept (%d dropped), %d surfaces -> %s",
        manifest["rows"], manifest["rows_read"], manifest["rows_read"] - manifest["rows"], manifest["num_surfaces"],
        run.events,
    )
    return manifest


def validate_source(cfg: LoopFMConfig, source: Source, out: Path, report: Path, extra: dict) -> dict:
    """Check every row of `source` and write the kept ones to `out` (atomically) in the event schema.

    `report` receives the per-rule counts and examples; strict mode raises after writing it. The
    manifest of `out` holds `extra` plus the counts, columns, surfaces and files. Used by
    `loopfm data validate` (the log) and `loopfm logs append` (a batch of new events).
    """
    data = cfg.data
    usable = source.usable()
    categorical = list(source.layout.categorical)
    log.info("validate: %d %s files (%d usable) from %s", len(source.files), source.fmt, len(usable), source.root)
    for column in categorical:
        if usable and not any(column in f.columns for f in usable):
            log.warning("validate: categorical column %r is in no file; it will be 0 everywhere", column)

    def build(tmp: Path) -> dict:
        staged = tmp / ".checked"  # hidden: readers of the final directory skip it
        sink = CheckedSink(staged)
        if usable:
            check = functools.partial(
                check_batch, files=[f.name for f in source.files], categorical=categorical,
                max_examples=data.validation.max_examples,
            )
            source.dataset().map_batches(check, batch_format="pyarrow", batch_size=None).write_datasink(sink)
        checked = ray.data.read_parquet(str(staged)) if sink.tallies else None
        result, drop = audit(sink.tallies, checked, source, data.validation.strict, data.validation.max_examples)
        _write_report(result.to_json(), report)
        for line in result.summary():
            log.info("validate:%s", line)
        fail_if_invalid(result, report)
        columns = event_schema(categorical).names
        keep = functools.partial(keep_batch, drop_ref=ray.put(drop), columns=columns)
        checked.map_batches(keep, batch_format="pyarrow", batch_size=None).write_parquet(str(tmp))
        remove_tree(staged)
        return {
            **extra,
            "path": source.root,
            "rows": result.rows_kept,
            "rows_read": result.rows_read,
            "invalid": {rule: result.counts[rule] for rule in BIT},
            "categorical": categorical,
            "columns": columns,
            "num_surfaces": num_surfaces(result),
            "ts_unit": source.layout.ts_unit,
            "files": _file_entries(source, result.file_rows),
        }

    return publish(out, build)


def _file_entries(source: Source, file_rows: list[int]) -> list[dict]:
    """Per file: name and rows read; where ts is an order, the ts its rows start at (split cut-offs)."""
    entries = []
    for f, rows in zip(source.files, file_rows):
        entry = {"name": f.name, "rows": rows}
        if source.layout.ts_unit == "order":
            entry["ts_start"] = f.index << FILE_SHIFT
        entries.append(entry)
    return entries


def _write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
