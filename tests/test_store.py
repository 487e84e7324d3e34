"""The store on disk: sealed only when whole, refused when it is not what the reader expects."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loopfm.errors import VersionMismatchError
from loopfm.rundir import atomic_output
from loopfm.store import codec
from loopfm.store.parquet import open_store, seal
from loopfm.store.schema import ROW_SCHEMA, StoreManifest

WIDTH, DTYPE = 8, "int4"


def manifest(**changes) -> StoreManifest:
    fields = dict(store_version="s1", fm_version="fm1", checkpoint_hash="fm1", layers=[1], raw_width=16, width=WIDTH,
                  prefix_widths=[4, 8], dtype=DTYPE)
    return StoreManifest(**{**fields, **changes})


def write_rows(directory, event_ids, name="part-0.parquet") -> None:
    n = len(event_ids)
    z = np.random.default_rng(0).uniform(-1, 1, (n, WIDTH))
    table = pa.Table.from_arrays([
        pa.array(event_ids, pa.int64()), pa.array(np.arange(n) % 3, pa.int64()),
        pa.array(np.arange(n) * 10, pa.int64()),
        pa.array(np.zeros(n), pa.int32()), pa.array(np.zeros(n), pa.float32()),
        codec.rows_to_binary(codec.encode(z, DTYPE)),
    ], schema=ROW_SCHEMA)
    pq.write_table(table, directory / name)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store" / "s1"
    with atomic_output(path) as tmp:
        write_rows(tmp, np.arange(10), "part-0.parquet")
        write_rows(tmp, np.arange(10, 25), "part-1.parquet")
        seal(tmp, manifest(), expected_rows=25)
    return path


def test_seal_counts_rows_time_range_and_hashes_files(store):
    m = open_store(store, {"fm_version": "fm1", "layers": [1], "width": WIDTH, "dtype": DTYPE})
    assert (m.rows, m.min_ts, m.max_ts) == (25, 0, 140)
    assert sorted(m.files) == ["part-0.parquet", "part-1.parquet"]


@pytest.mark.parametrize("field, value", [("fm_version", "fm2"), ("layers", [1, 2]), ("width", 16), ("dtype", "fp16")])
def test_reader_refuses_a_store_that_differs_and_names_the_field(store, field, value):
    with pytest.raises(VersionMismatchError, match=field):
        open_store(store, {field: value})


def test_a_changed_or_missing_file_is_refused(store):
    write_rows(store, np.arange(10), "part-0.parquet")  # same rows, new bytes (other z)
    (store / "part-0.parquet").write_bytes((store / "part-0.parquet").read_bytes() + b"x")
    with pytest.raises(VersionMismatchError, match="part-0.parquet does not match"):
        open_store(store)
    (store / "part-1.parquet").unlink()
    with pytest.raises(VersionMismatchError, match="missing"):
        open_store(store)


def test_lost_or_duplicated_rows_never_become_a_store(tmp_path):
    final = tmp_path / "store" / "s1"
    with pytest.raises(VersionMismatchError, match="holds 24 rows, expected 25"):
        with atomic_output(final) as tmp:
            write_rows(tmp, np.arange(24))
            seal(tmp, manifest(), expected_rows=25)
    with pytest.raises(VersionMismatchError, match="duplicate"):
        with atomic_output(final) as tmp:
            write_rows(tmp, np.arange(10), "a.parquet")
            write_rows(tmp, np.arange(9, 24), "b.parquet")
            seal(tmp, manifest(), expected_rows=25)
    assert not final.exists() and list(final.parent.iterdir()) == []  # no half store, no temp left


def test_int4_round_trip_error_is_at_most_a_sixteenth():
    z = np.random.default_rng(1).uniform(-1, 1, (2000, WIDTH)).astype(np.float32)
    z[0], z[1] = 1.0, -1.0  # the saturated ends tanh units reach
    err = np.abs(codec.decode(codec.encode(z, "int4"), "int4", WIDTH) - z)
    assert err.max() <= 1 / 16 + 1e-7
    assert codec.encode(z, "int4").shape == (2000, WIDTH // 2)  # two per byte


@pytest.mark.timeout(300)
def test_a_store_rebuilt_with_another_compressor_is_never_taken_for_the_old_one(smoke_trained, smoke_config,
                                                                                 tmp_path, monkeypatch):
    """Same config, same FM, and a compressor that trains to other weights (as on other hardware,
    precision or library version; here: another seed): the store gets another version, so the
    features stage does not reuse the old feature set, and serving refuses the VM trained on the old
    store instead of feeding it the new store's z (before: the same version, path and fingerprint,
    and the old VM served with z it never saw)."""
    import shutil

    from conftest import SERVED_ARM, SERVED_SEED
    from loopfm.datasets.splits import SplitInfo
    from loopfm.errors import MissingInputError
    from loopfm.features.stage import features_fingerprint
    from loopfm.fm.embed import embed_stage
    from loopfm.models import autoencoder
    from loopfm.rundir import RunDir
    from loopfm.serve_apps.bundle import Bundle
    from loopfm.serve_apps.lookup import FeatureTable
    from loopfm.store.resolve import resolve_store

    src, features, vm = smoke_trained
    run = RunDir(tmp_path / "run")
    shutil.copytree(src.root, run.root)
    old_path, old = resolve_store(smoke_config, run)
    assert features.store_version == vm.store_version == old.store_version
    shutil.rmtree(old_path)  # rebuilt: removed by hand, or built again on another machine
    train = autoencoder.train_autoencoder
    monkeypatch.setattr(autoencoder, "train_autoencoder",
                        lambda sample, cfg, seed=0, log=None: train(sample, cfg, seed=seed + 1, log=log))
    new = embed_stage(smoke_config, run)
    assert new.compressor_hash != old.compressor_hash  # the premise: another compressor, the same config

    assert new.store_version != old.store_version
    assert resolve_store(smoke_config, run)[1].store_version == new.store_version
    assert features_fingerprint(smoke_config, SplitInfo.load(run), new) != features.fingerprint
    with pytest.raises(MissingInputError, match=f"reads store version {old.store_version}"):
        FeatureTable(Bundle.open(run.root, run.vm(SERVED_ARM, SERVED_SEED, vm.fingerprint)))
