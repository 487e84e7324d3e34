"""One conformance suite for every store backend configuration (`loopfm.store.backend`).

Each test runs against local disk (commit by rename) and against a real S3 API: moto's standalone
server, started as a subprocess on a loopback port with dummy credentials, reached through
`pyarrow.fs.S3FileSystem` from a `s3://...?endpoint_override=...` run-directory URI (commit by
writing the manifest last). The same assertions hold for both.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from loopfm.errors import MissingInputError, VersionMismatchError
from loopfm.store import codec
from loopfm.store.backend import BACKENDS, StoreBackend, backend_class, backend_for
from loopfm.store.parquet import ParquetBackend
from loopfm.store.schema import COMPRESSOR_FILE, EVENT_ID, FM_LOGIT, ROW_SCHEMA, TS, USER_ID, StoreManifest, Z

WIDTH, DTYPE = 8, "int4"
PINNED = {"fm_version": "fm1", "layers": [1], "width": WIDTH, "dtype": DTYPE}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loopfm-test", "AWS_SECRET_ACCESS_KEY": "loopfm-test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
CRASHING_WRITER = """
import os, sys
import pyarrow.parquet as pq
from loopfm.store.backend import backend_for
sys.path.insert(0, sys.argv[3])
from test_store_backends import rows
backend = backend_for(sys.argv[1])
writing = backend.attempt(backend.store_path(sys.argv[2]))  # held: a dropped one would clean up after itself
attempt = writing.__enter__()
pq.write_table(rows(range(100, 110), tag=9.0), f"{attempt}/part-0.parquet", filesystem=backend.fs)
print(attempt, flush=True)
os._exit(1)  # killed after its data, before its manifest
"""


def rows(event_ids, users=None, ts=None, tag: float = 0.0) -> pa.Table:
    """Store rows in ROW_SCHEMA; `tag` fills fm_logit, so a reader can tell writers apart."""
    event_ids = np.asarray(list(event_ids), dtype=np.int64)
    n = len(event_ids)
    users = event_ids % 10 if users is None else np.asarray(users, dtype=np.int64)
    ts = event_ids * 10 if ts is None else np.asarray(ts, dtype=np.int64)
    z = np.sin(np.outer(event_ids, np.arange(1, WIDTH + 1)) * 0.37 + tag)  # a function of the event and tag
    return pa.Table.from_arrays([
        pa.array(event_ids, pa.int64()), pa.array(users, pa.int64()), pa.array(ts, pa.int64()),
        pa.array(np.zeros(n), pa.int32()), pa.array(np.full(n, tag), pa.float32()),
        codec.rows_to_binary(codec.encode(z, DTYPE)),
    ], schema=ROW_SCHEMA)


def manifest(version: str = "v1", **changes) -> StoreManifest:
    fields = dict(store_version=version, fm_version="fm1", checkpoint_hash="fm1", layers=[1], raw_width=16,
                  width=WIDTH, prefix_widths=[4, 8], dtype=DTYPE)
    return StoreManifest(**{**fields, **changes})


def commit(backend: StoreBackend, path: str, tables: list[pa.Table], m: StoreManifest,
           side: bytes | None = None, pause: float = 0.0) -> StoreManifest:
    """Write `tables` as one store at `path` through an attempt and seal it (`pause` between files)."""
    with backend.attempt(path) as tmp:
        for i, table in enumerate(tables):
            pq.write_table(table, f"{tmp}/part-{i}.parquet", filesystem=backend.fs)
            time.sleep(pause)
        if side is not None:
            with backend.fs.open_output_stream(f"{tmp}/{COMPRESSOR_FILE}") as f:
                f.write(side)
        return backend.seal(tmp, m, expected_rows=sum(t.num_rows for t in tables))


def sorted_rows(table: pa.Table) -> dict:
    return table.sort_by(EVENT_ID).to_pydict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server in its own process on a free loopback port; dummy credentials in the environment."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, f"moto server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "moto server did not answer within 60 s"
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclasses.dataclass
class Target:
    """One backend configuration: the backend and the run-directory location it was built from."""

    uri: str
    backend: StoreBackend


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> Target:
    if request.param == "local":
        uri = str(tmp_path / "run")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"loopfm-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(bucket)
        uri = f"s3://{bucket}/run?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    return Target(uri, backend_for(uri))


def test_the_registry_names_the_parquet_backend_and_refuses_an_unknown_kind():
    assert backend_class("parquet") is ParquetBackend and set(BACKENDS) == {"parquet"}
    with pytest.raises(ValueError, match="registered: \\['parquet'\\]"):
        backend_class("delta-lake")


def test_a_run_directory_uri_picks_the_filesystem(target):
    expected = pafs.LocalFileSystem if "://" not in target.uri else pafs.S3FileSystem
    assert isinstance(target.backend.fs, expected)
    assert target.backend.renames == (expected is pafs.LocalFileSystem)


def test_a_version_that_is_not_an_id_never_becomes_a_path(target):
    for version in ("../elsewhere", ".hidden", "a/b"):
        with pytest.raises(VersionMismatchError, match="not an id"):
            target.backend.store_path(version)
        with pytest.raises(VersionMismatchError, match="not an id"):
            target.backend.deltas_path(version)


def test_rows_and_manifest_round_trip(target):
    b = target.backend
    path = b.store_path("v1")
    written = commit(b, path, [rows(range(10)), rows(range(10, 25))], manifest())
    opened = b.open(path, PINNED)
    assert opened.to_dict() == written.to_dict()
    assert (opened.rows, opened.min_ts, opened.max_ts, len(opened.files)) == (25, 0, 240, 2)
    assert sorted_rows(b.scan(path, ROW_SCHEMA.names)) == sorted_rows(pa.concat_tables([rows(range(25))]))
    assert [f.rsplit("/", 1)[1] for f in b.files(path)] == ["part-0.parquet", "part-1.parquet"]


def test_seal_refuses_lost_or_duplicated_rows_and_publishes_nothing(target):
    b = target.backend
    path = b.store_path("v1")
    with pytest.raises(VersionMismatchError, match="holds 9 rows, expected 10"):
        with b.attempt(path) as tmp:
            pq.write_table(rows(range(9)), f"{tmp}/part-0.parquet", filesystem=b.fs)
            b.seal(tmp, manifest(), expected_rows=10)
    with pytest.raises(VersionMismatchError, match="duplicate"):
        with b.attempt(path) as tmp:
            pq.write_table(rows(range(5)), f"{tmp}/a.parquet", filesystem=b.fs)
            pq.write_table(rows(range(4, 9)), f"{tmp}/b.parquet", filesystem=b.fs)
            b.seal(tmp, manifest())
    with pytest.raises(MissingInputError, match="no store"):
        b.open(path)
    assert b.cleanup(path, older_than_s=0) == []  # the failed attempts removed themselves


def test_an_unsealed_attempt_is_invisible_and_an_exception_discards_it(target):
    b = target.backend
    path = b.store_path("v1")
    with pytest.raises(RuntimeError, match="writer failed"):
        with b.attempt(path) as tmp:
            pq.write_table(rows(range(10)), f"{tmp}/part-0.parquet", filesystem=b.fs)
            with pytest.raises(MissingInputError, match="no store"):  # written, not sealed: no store yet
                b.open(path)
            raise RuntimeError("writer failed")
    assert b.fs.get_file_info(tmp).type == pafs.FileType.NotFound
    with pytest.raises(MissingInputError, match="no store"):
        b.open(path)


def test_a_crashed_attempt_is_invisible_to_readers_and_cleaned_up(target):
    b = target.backend
    path = b.store_path("v1")
    commit(b, path, [rows(range(10))], manifest())
    crash = [sys.executable, "-c", CRASHING_WRITER, target.uri, "v1", str(Path(__file__).parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    crashed = subprocess.run(crash, env=env, capture_output=True, text=True, timeout=60)
    attempt = crashed.stdout.strip()
    assert crashed.returncode == 1 and attempt, crashed.stderr
    assert b.fs.get_file_info(f"{attempt}/part-0.parquet").type == pafs.FileType.File  # its data is there

    assert b.open(path, PINNED).rows == 10  # but readers see only the committed store
    assert sorted_rows(b.scan(path, [EVENT_ID, FM_LOGIT])) == sorted_rows(rows(range(10)).select([EVENT_ID, FM_LOGIT]))
    assert b.cleanup(path, older_than_s=0) == [attempt]
    assert b.fs.get_file_info(attempt).type == pafs.FileType.NotFound
    assert b.open(path, PINNED).rows == 10  # the committed store is untouched


def test_two_writers_of_one_version_do_not_corrupt_each_other(target):
    b = target.backend
    path = b.store_path("v1")
    errors = []

    def write(tag: float) -> None:
        try:  # three files with pauses between them: the two writers' files interleave where nothing locks
            commit(b, path, [rows(range(k, k + 5), tag=tag) for k in (0, 5, 10)], manifest(), pause=0.05)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    writers = [threading.Thread(target=write, args=(tag,)) for tag in (1.0, 2.0)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert not errors
    m = b.open(path, PINNED)  # every file hashes as its manifest says
    table = b.scan(path, [EVENT_ID, FM_LOGIT])
    assert m.rows == table.num_rows == 15 and sorted(table[EVENT_ID].to_pylist()) == list(range(15))
    assert len(set(table[FM_LOGIT].to_pylist())) == 1  # all rows from one writer, none mixed in
    b.cleanup(path, older_than_s=0)  # the losing writer's attempt, where it left one
    assert b.scan(path, [EVENT_ID]).num_rows == 15 and b.open(path, PINNED).rows == 15


@pytest.mark.parametrize("field, value", [("fm_version", "fm2"), ("layers", [1, 2]), ("width", 16), ("dtype", "fp16")])
def test_a_pinned_field_that_differs_is_refused_naming_the_field(target, field, value):
    b = target.backend
    commit(b, b.store_path("v1"), [rows(range(5))], manifest())
    with pytest.raises(VersionMismatchError, match=f"{field}: store has"):
        b.open(b.store_path("v1"), {**PINNED, field: value})


def test_a_changed_data_file_is_refused(target):
    b = target.backend
    path = b.store_path("v1")
    commit(b, path, [rows(range(5)), rows(range(5, 10))], manifest())
    first = b.files(path)[0]
    pq.write_table(rows(range(5), tag=7.0), first, filesystem=b.fs)  # same rows, other bytes
    with pytest.raises(VersionMismatchError, match="part-0.parquet does not match"):
        b.open(path)


def test_column_projection_returns_only_the_asked_columns(target):
    b = target.backend
    path = b.store_path("v1")
    commit(b, path, [rows(range(20))], manifest())
    assert b.scan(path, [USER_ID, TS]).column_names == [USER_ID, TS]
    z_only = b.scan(path, [Z])
    assert z_only.column_names == [Z] and z_only.num_rows == 20
    assert len(codec.binary_to_rows(z_only[Z], codec.bytes_per_row(WIDTH, DTYPE))) == 20


def test_a_user_range_scan_returns_exactly_the_users_in_range(target):
    b = target.backend
    path = b.store_path("v1")
    commit(b, path, [rows(range(30)), rows(range(30, 60))], manifest())
    table = b.scan(path, [EVENT_ID, TS], users=(3, 7))  # user_id = event_id % 10
    assert table.column_names == [EVENT_ID, TS]
    assert sorted(table[EVENT_ID].to_pylist()) == [e for e in range(60) if 3 <= e % 10 < 7]
    assert b.scan(path, [USER_ID], users=(10, 20)).num_rows == 0


def _chain(b: StoreBackend, order=(0, 1, 2)) -> list[list[int]]:
    """A base store v1 (events 0..9) and three deltas of 5 events each, written in `order`."""
    commit(b, b.store_path("v1"), [rows(range(10))], manifest(), side=b"compressor")
    events = {k: list(range(10 + 5 * k, 15 + 5 * k)) for k in range(3)}
    for k in order:
        parent = "v1" if k == 0 else f"d{k - 1}"
        commit(b, f"{b.deltas_path('v1')}/{k:04d}-d{k}", [rows(events[k])],
               manifest(f"d{k}", parent=parent, base="v1", since=90 + 50 * k))
    return [list(range(10))] + [events[k] for k in range(3)]


def test_the_chain_lists_the_deltas_in_sequence_order(target):
    b = target.backend
    expected = _chain(b, order=(2, 0, 1))  # written out of order
    chain = b.chain(b.store_path("v1"))
    assert [m.store_version for _, m in chain] == ["v1", "d0", "d1", "d2"]
    assert [p for p, _ in chain] == [b.store_path("v1")] + [f"{b.deltas_path('v1')}/{k:04d}-d{k}" for k in range(3)]
    assert b.scan(chain, [EVENT_ID])[EVENT_ID].to_pylist() == [e for part in expected for e in part]


def test_a_broken_link_in_the_chain_is_refused(target):
    b = target.backend
    _chain(b)
    commit(b, f"{b.deltas_path('v1')}/0003-d3", [rows(range(25, 30))],
           manifest("d3", parent="d1", base="v1", since=300))  # skips d2
    with pytest.raises(VersionMismatchError, match="extends d1"):
        b.chain(b.store_path("v1"))


def test_compact_equals_the_union_of_the_chain(target):
    b = target.backend
    _chain(b)
    chain = b.chain(b.store_path("v1"))
    before = sorted_rows(b.scan(chain, ROW_SCHEMA.names))
    compacted = b.compact("v1")
    assert compacted.rows == sum(m.rows for _, m in chain) == 25 and compacted.store_version == "v1"
    after = b.chain(b.store_path("v1"))
    assert len(after) == 1 and b.delta_paths("v1") == []
    assert sorted_rows(b.scan(after, ROW_SCHEMA.names)) == before
    with b.fs.open_input_stream(b.side_file(b.store_path("v1"), COMPRESSOR_FILE)) as f:
        assert f.read() == b"compressor"  # the compressor travels with the rows
    assert b.compact("v1").to_dict() == b.open(b.store_path("v1")).to_dict()  # nothing left to fold
