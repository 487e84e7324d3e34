"""Reading event logs through Ray Data: files in, typed contract columns out, one fixed schema.

A `Layout` says how a log format maps onto the event contract (docs/DESIGN.md, 'Events'): which source
column holds each contract column, which columns are categorical context, and how a column the
format lacks is derived (bars.py). `open_source` lists the files and looks at each file's header
on the driver, so a missing required column is known, per file, before any row is read.
`Source.dataset()` then reads the usable files with `EventFileDatasource`.

The datasource turns every value into int64 where it can (integer text keeps its value, other
text in id columns becomes a stable 63-bit hash, integral floats are accepted) and keeps the
evidence where it cannot (`_untyped`: the raw values, as JSON). A file that stops parsing yields
one marker row (`_error`). Every block has the same schema whatever the file held, so Ray never
has to merge an int column with a string one, and validation (validate.py) can count and show
each defect instead of failing deep inside a read task.

Every row carries `_src` = file index << 40 | row in file: a stable, unique position that names
the row in reports, orders rows within a file, and is the event id when the log has none.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pyarrow import csv
from ray.data.datasource import FileBasedDatasource

from loopfm.config import ColumnMapping
from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, OPTIONAL, REQUIRED, SURFACE, TS, USER_ID
from loopfm.errors import DataValidationError, MissingInputError
from loopfm.location import AnyPath, as_location, is_remote

SRC = "_src"
UNTYPED = "_untyped"
ERROR = "_error"
FILE_SHIFT = 40  # rows per file < 2**40, files < 2**23
CONTRACT = (EVENT_ID, USER_ID, ITEM_ID, CATEGORY, SURFACE, TS, LABEL)
NUMERIC = (TS, LABEL, SURFACE)  # must be integers; text there is a wrong type, never hashed
EXTENSIONS = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz")}
PARQUET_BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 4 << 20
HEADER_BLOCK_BYTES = 1 << 16

Derive = Callable[[pa.Table, int, int], dict[str, pa.Array]]


@dataclass(frozen=True)
class Layout:
    """How one log format maps onto the event contract."""

    columns: dict[str, str]  # contract column -> source column
    categorical: tuple[str, ...] = ()  # source columns kept, under their own names, as context
    derive: Optional[Derive] = None  # (table, file index, first row) -> derived contract columns
    derived: tuple[str, ...] = ()  # contract columns `derive` produces
    derived_from: tuple[str, ...] = ()  # source columns `derive` reads
    sorted_by_ts: bool = False  # the format promises ts order within each file
    ts_unit: str = "seconds"  # or "order": ts ranks events, it is not a clock

    def required_source_columns(self) -> list[str]:
        mapped = [self.columns[c] for c in REQUIRED if c in self.columns]
        return [*mapped, *self.derived_from]

    def source_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.columns.values(), *self.categorical, *self.derived_from]))


def generic_layout(mapping: ColumnMapping, categorical=None, sorted_by_ts: bool = False) -> Layout:
    """A parquet/CSV log whose columns `data.columns` names."""
    columns = {c: getattr(mapping, c) for c in (*REQUIRED, *OPTIONAL) if getattr(mapping, c)}
    context = tuple(mapping.categorical if categorical is None else categorical)
    return Layout(columns=columns, categorical=context, sorted_by_ts=sorted_by_ts)


@dataclass
class SourceFile:
    """One file of the log: its position (the file index in `_src`), columns, up-front problems."""

    index: int
    path: str
    name: str  # relative to the log's root, for reports
    columns: list[str] = field(default_factory=list)
    error: Optional[str] = None  # could not be opened or parsed
    missing: list[str] = field(default_factory=list)  # required source columns it lacks

    @property
    def usable(self) -> bool:
        return self.error is None and not self.missing


@dataclass
class Source:
    """A log ready to read: its files in id order and how they map to the contract."""

    root: str
    fmt: str
    layout: Layout
    files: list[SourceFile]

    def usable(self) -> list[SourceFile]:
        return [f for f in self.files if f.usable]

    def dataset(self):
        """The usable files as a Ray Dataset of `raw_schema(categorical)` rows."""
        return ray.data.read_datasource(EventFileDatasource(self.usable(), self.fmt, self.layout))

    def has_event_ids(self) -> bool:
        """Whether any usable file brings its own event ids (derived ids are unique by construction)."""
        column = self.layout.columns.get(EVENT_ID)
        return column is not None and any(column in f.columns for f in self.usable())


def raw_schema(categorical: tuple[str, ...] | list[str]) -> pa.Schema:
    """What readers yield: nullable int64 contract and context columns plus the evidence columns."""
    ints = [(c, pa.int64()) for c in (*CONTRACT, *categorical)]
    return pa.schema([*ints, (SRC, pa.int64()), (UNTYPED, pa.string()), (ERROR, pa.string())])


# -- listing and inspecting files -------------------------------------------------------------


def list_files(path: str, fmt: str = "auto") -> tuple[list[Path], str]:
    """Files of a log given as a file, a directory (recursive) or a glob, and their format
    (a remote URI: a directory, listed on its filesystem)."""
    where = as_location(path)
    if is_remote(where):
        found = [p for p in where.rglob("*") if p.is_file() and not _hidden(p.relative_to(where))]
        if not found and not where.is_dir():
            raise MissingInputError(f"data.path {path!r} does not exist")
    elif any(ch in path for ch in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(path):
        found = [p for p in Path(path).rglob("*") if p.is_file() and not _hidden(p.relative_to(path))]
    elif os.path.isfile(path):
        if fmt != "auto":
            return [Path(path).resolve()], fmt
        found = [Path(path)]
    else:
        raise MissingInputError(f"data.path {path!r} does not exist")
    kinds = {kind: sorted(p for p in found if _has_ext(p, kind)) for kind in EXTENSIONS}
    if fmt == "auto":
        present = [k for k, files in kinds.items() if files]
        if len(present) > 1:
            counts = ", ".join(f"{len(kinds[k])} {k}" for k in present)
            raise DataValidationError(f"data.path {path!r} mixes formats ({counts}); set data.format")
        fmt = present[0] if present else "parquet"
    if not kinds[fmt]:
        hint = f"; it holds {len(found)} other files" if found else ""
        raise MissingInputError(f"no {fmt} files at data.path {path!r}{hint}")
    return [p.resolve() for p in kinds[fmt]], fmt


def inspect_files(paths: list[Path], fmt: str, layout: Layout, root: str) -> list[SourceFile]:
    """Each file's columns, read from its header on the driver (cheap: no rows are parsed)."""
    files = []
    for i, p in enumerate(paths):
        f = SourceFile(index=i, path=str(p), name=_relative_name(p, root))
        try:
            f.columns = _header(p, fmt)
        except (pa.ArrowException, OSError, ValueError) as err:
            f.error = f"cannot read {fmt}: {_short(err)}"
        else:
            f.missing = [c for c in layout.required_source_columns() if c not in f.columns]
            twice = [c for c in layout.source_columns() if f.columns.count(c) > 1]
            if twice:  # which copy holds the values? Refuse rather than guess (or fail inside a read task)
                f.error = "ambiguous header: " + ", ".join(f"{c} appears {f.columns.count(c)} times" for c in twice)
        files.append(f)
    return files


def open_source(path: str, fmt: str, layout: Layout, files: Optional[list[Path]] = None) -> Source:
    """List (unless `files` is given, in id order) and inspect a log."""
    if files is None:
        files, fmt = list_files(path, fmt)
    return Source(root=path, fmt=fmt, layout=layout, files=inspect_files(files, fmt, layout, path))


def _relative_name(path: AnyPath, root: str) -> str:
    """A file's name relative to the log's root (a folder, or the folder a glob starts in), for reports."""
    if is_remote(path):
        return str(path.relative_to(as_location(root)))
    base = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(re.split(r"[*?\[]", root)[0]))
    return os.path.relpath(path, base)


def _header(path: AnyPath, fmt: str) -> list[str]:
    if fmt == "parquet":
        return pq.read_schema(str(path)).names  # a local path or a URI pyarrow resolves
    with pa.input_stream(str(path), compression="detect") as stream:
        options = csv.ReadOptions(use_threads=False, block_size=HEADER_BLOCK_BYTES)  # parse the header, not the file
        return csv.open_csv(stream, read_options=options).schema.names


def _read_key(path: str) -> str:
    where = as_location(path)
    return where.key if is_remote(where) else os.path.abspath(path)


def _has_ext(p: Path, kind: str) -> bool:
    return p.name.lower().endswith(EXTENSIONS[kind])


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


# -- typing values ----------------------------------------------------------------------------

_INT_TEXT = r"^-?\d+(\.0*)?$"  # integer text, a zero fraction allowed: parsed exactly, never through float64
_NUMBER_TEXT = r"^-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_HASH_MASK = np.uint64((1 << 63) - 1)
_INT64_LIMIT = 2.0**63
_INT64_MAX_TEXT = str((1 << 63) - 1)  # 19 digits: same-length magnitudes compare as text
_INT64_MIN_MAGNITUDE = str(1 << 63)


def to_int64(values, hash_text: bool) -> tuple[pa.Array, np.ndarray]:
    """An int64 view of a column and a mask of values that are present but are not integers.

    Nulls (and NaN) stay null. Integers keep their exact value whatever their width, whether
    they come as int64, uint64, decimal or text ("-9223372036854775808", "0012", "7.0"): a
    nanosecond timestamp or a 19-digit id must not lose its last digits through float64.
    Integral floats are accepted (a float column holds what float64 holds); fractional
    numbers are untyped. Integers outside int64 and other text are hashed in id columns and
    untyped in the others (`hash_text=False`: ts, label, surface). The hash of an integer is
    the hash of its canonical decimal text (no sign for positives, no leading zeros), so the
    same id gets the same key from a CSV file, a parquet string column or a uint64 column.
    Timestamps become seconds since the epoch.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    n = len(values)
    if pa.types.is_dictionary(kind):
        return to_int64(values.dictionary_decode(), hash_text)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        seconds = pc.cast(values, pa.timestamp("s"), safe=False) if pa.types.is_date(kind) else values
        return pc.cast(pc.cast(seconds, pa.timestamp("s"), safe=False), pa.int64()), np.zeros(n, bool)
    if pa.types.is_boolean(kind) or pa.types.is_signed_integer(kind):
        return values.cast(pa.int64()), np.zeros(n, bool)
    if pa.types.is_unsigned_integer(kind) or pa.types.is_decimal(kind):
        # Exact through text: uint64 above int64 then hashes as its decimal text does in a CSV.
        return _from_text(pc.cast(values, pa.string()), hash_text)
    if pa.types.is_floating(kind):
        return _from_floats(values.cast(pa.float64()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _from_text(values, hash_text)
    if pa.types.is_null(kind):
        return pa.nulls(n, pa.int64()), np.zeros(n, bool)
    present = values.is_valid().to_numpy(zero_copy_only=False)
    return pa.nulls(n, pa.int64()), present


def _from_floats(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    present = values.is_valid().to_numpy(zero_copy_only=False)
    f = values.fill_null(0).to_numpy()
    present &= ~np.isnan(f)  # NaN is how float columns spell a missing value
    ok = np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < _INT64_LIMIT)
    return pa.array(np.where(ok, f, 0).astype(np.int64), mask=~(present & ok)), present & ~ok


def _canonical_integers(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Integer text -> (canonical decimal text, whether it fits int64), without parsing a number."""
    negative = pc.starts_with(text, "-").to_numpy(zero_copy_only=False)
    magnitude = pc.replace_substring_regex(pc.replace_substring_regex(text, r"^-", ""), r"\.0*$", "")
    magnitude = pc.utf8_ltrim(magnitude, characters="0")
    digits = pc.utf8_length(magnitude).to_numpy()
    magnitude = pc.if_else(pa.array(digits == 0), "0", magnitude)
    negative &= digits > 0  # "-0" is 0
    limit = pa.array(np.where(negative, _INT64_MIN_MAGNITUDE, _INT64_MAX_TEXT))
    fits = (digits < 19) | ((digits == 19) & pc.less_equal(magnitude, limit).to_numpy(zero_copy_only=False))
    canonical = pc.if_else(pa.array(negative), pc.binary_join_element_wise("-", magnitude, ""), magnitude)
    return canonical, fits


def _from_text(values: pa.Array, hash_text: bool) -> tuple[pa.Array, np.ndarray]:
    text = pc.replace_substring_regex(pc.utf8_trim_whitespace(values), r"^\+", "")
    present = text.is_valid().to_numpy(zero_copy_only=False) & (pc.utf8_length(text.fill_null("")).to_numpy() > 0)
    is_int = pc.fill_null(pc.match_substring_regex(text, _INT_TEXT), False).to_numpy(zero_copy_only=False)
    is_num = pc.fill_null(pc.match_substring_regex(text, _NUMBER_TEXT), False).to_numpy(zero_copy_only=False)
    out = np.zeros(len(values), np.int64)
    ok = np.zeros(len(values), bool)
    hashed = present & ~is_num  # text that is no number: an id to hash (in id columns)
    keys = text
    if is_int.any():
        rows = np.flatnonzero(is_int)
        canonical, fits = _canonical_integers(text.filter(pa.array(is_int)))
        out[rows[fits]] = pc.cast(canonical.filter(pa.array(fits)), pa.int64()).to_numpy()
        ok[rows[fits]] = True
        hashed[rows[~fits]] = True  # an integer wider than int64: an id, hashed by its canonical text
        keys = text.to_numpy(zero_copy_only=False).copy()
        keys[rows] = canonical.to_numpy(zero_copy_only=False)
        keys = pa.array(keys, pa.string())
    decimal = is_num & ~is_int
    if decimal.any():
        f = pc.cast(text.filter(pa.array(decimal)), pa.float64()).to_numpy()
        whole = np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < _INT64_LIMIT)
        rows = np.flatnonzero(decimal)
        out[rows[whole]] = f[whole].astype(np.int64)
        ok[rows[whole]] = True
    if hash_text and hashed.any():
        out[hashed] = stable_hash_ids(keys.filter(pa.array(hashed)).to_numpy(zero_copy_only=False))
        ok |= hashed
    return pa.array(out, mask=~(present & ok)), present & ~ok


def stable_hash_ids(text: np.ndarray) -> np.ndarray:
    """String ids -> non-negative int64, the same on every machine and run (SipHash, fixed key)."""
    return (pd.util.hash_array(np.asarray(text, dtype=object)) & _HASH_MASK).astype(np.int64)


# -- the datasource ---------------------------------------------------------------------------


class Contract:
    """Turns one chunk of a file into `raw_schema` rows (typed values plus evidence)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.schema = raw_schema(layout.categorical)
        self.hashed = {EVENT_ID, USER_ID, ITEM_ID, CATEGORY, *layout.categorical}

    def source_of(self, column: str) -> Optional[str]:
        if column in self.layout.columns:
            return self.layout.columns[column]
        if column in self.layout.derived or column in self.layout.categorical:
            return column
        return None

    def convert(self, table: pa.Table, file_index: int, first_row: int) -> pa.Table:
        n = table.num_rows
        src = pa.array((np.int64(file_index) << FILE_SHIFT) + first_row + np.arange(n, dtype=np.int64))
        if self.layout.derive is not None:
            for name, column in self.layout.derive(table, file_index, first_row).items():
                table = table.append_column(name, column)
        out: dict[str, pa.Array] = {}
        untyped: dict[str, tuple[np.ndarray, pa.Array]] = {}
        for column in (*CONTRACT, *self.layout.categorical):
            source = self.source_of(column)
            if source is None or source not in table.column_names:
                out[column] = src if column == EVENT_ID else pa.nulls(n, pa.int64())
                continue
            raw = table[source]
            out[column], bad = to_int64(raw, hash_text=column in self.hashed)
            if bad.any():
                untyped[column] = (bad, raw)
        out[SRC] = src
        out[UNTYPED] = _evidence(untyped, n)
        out[ERROR] = pa.nulls(n, pa.string())
        return pa.table(out, schema=self.schema)

    def unreadable(self, file_index: int, row: int, message: str) -> pa.Table:
        """One marker row: the file stopped parsing at `row`."""
        columns = {name: pa.nulls(1, kind) for name, kind in zip(self.schema.names, self.schema.types)}
        columns[SRC] = pa.array([(file_index << FILE_SHIFT) + row], pa.int64())
        columns[ERROR] = pa.array([message], pa.string())
        return pa.table(columns, schema=self.schema)


def _evidence(untyped: dict[str, tuple[np.ndarray, pa.Array]], n: int) -> pa.Array:
    """JSON of the raw values of every untyped cell, per row; null where all values typed."""
    if not untyped:
        return pa.nulls(n, pa.string())
    rows = np.flatnonzero(np.logical_or.reduce([bad for bad, _ in untyped.values()]))
    text = [None] * n
    for r in rows:
        cells = {c: str(raw[int(r)].as_py()) for c, (bad, raw) in untyped.items() if bad[r]}
        text[r] = json.dumps(cells)
    return pa.array(text, pa.string())


class EventFileDatasource(FileBasedDatasource):
    """Streams each file in chunks, tagging rows with their file index and row number."""

    def __init__(self, files: list[SourceFile], fmt: str, layout: Layout):
        super().__init__([f.path for f in files])
        # keyed as Ray hands paths to `_read_stream`: absolute locally, `bucket/key` for a URI
        self._by_path = {_read_key(f.path): f for f in files}
        self._fmt = fmt
        self._contract = Contract(layout)
        self._wanted = layout.source_columns()

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._fmt == "parquet":  # the footer is at the end: needs a seekable file
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        info = self._by_path[path] if path in self._by_path else self._by_path[os.path.abspath(path)]
        columns = [c for c in self._wanted if c in info.columns]
        chunks = self._parquet_chunks(f, columns) if self._fmt == "parquet" else self._csv_chunks(f, columns)
        row = 0
        while True:
            try:
                table = next(chunks)
            except StopIteration:
                return
            except (pa.ArrowException, OSError, ValueError) as err:
                message = f"{info.name} unreadable after row {row}: {_short(err)}"
                yield self._contract.unreadable(info.index, row, message)
                return
            if table.num_rows:
                yield self._contract.convert(table, info.index, row)
                row += table.num_rows

    @staticmethod
    def _parquet_chunks(f, columns: list[str]) -> Iterator[pa.Table]:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])

    @staticmethod
    def _csv_chunks(f, columns: list[str]) -> Iterator[pa.Table]:
        reader = csv.open_csv(
            f,
            read_options=csv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            # Text in, typed by `to_int64`: a stray "abc" in a numeric column is then a counted
            # defect, not a conversion error that kills the read.
            convert_options=csv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, include_columns=columns, strings_can_be_null=True
            ),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])
