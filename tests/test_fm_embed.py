"""`loopfm fm train` + `loopfm embed` on the smoke log: a store that holds every event once, whose
rows are what one causal pass of the FM over each user's whole history gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from loopfm.datasets.schema import CATEGORY, EVENT_ID, ITEM_ID, LABEL, SPLITS, SURFACE, TS, USER_ID, idx
from loopfm.datasets.splits import SplitInfo
from loopfm.fm.checkpoint import load_fm
from loopfm.fm.chunks import prev_labels
from loopfm.fm.embed import embed_stage
from loopfm.fm.train import fm_fingerprint
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.parquet import data_files, open_store


@pytest.fixture(scope="module")
def embedded(smoke_embedded):
    return smoke_embedded


def store_frame(run: RunDir, version: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in data_files(run.store(version))], ignore_index=True)


def events_frame(run: RunDir) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(run.splits / s) for s in SPLITS], ignore_index=True)


@pytest.mark.timeout(400)
def test_store_holds_every_event_once_with_its_manifest(embedded, smoke_config):
    run, fm, store = embedded
    events, rows = events_frame(run), store_frame(run, store.store_version)
    assert len(rows) == len(events) == store.rows
    assert rows[EVENT_ID].is_unique and set(rows[EVENT_ID]) == set(events[EVENT_ID])
    m = open_store(run.store(store.store_version),
                   {"fm_version": fm.fm_version, "layers": [1], "width": 16, "dtype": "int4"})
    assert m.raw_width == smoke_config.fm.d_model  # layer 1 of the FM
    errors = [m.recon_error[str(w)] for w in sorted(smoke_config.embed.compress.prefix_widths)]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]  # wider prefix, smaller error
    assert m.quant_error["int4_max_abs"] <= 1 / 16 + 1e-6
    assert set(fm.metrics) >= {"valid", "test"} and len(fm.history) >= 1


@pytest.mark.timeout(120)
def test_stored_rows_equal_one_causal_pass_over_each_whole_history(embedded, smoke_config):
    """Users longer than a chunk are split with overlap; their rows must still match one pass."""
    run, fm, store = embedded
    model, _ = load_fm(run.fm(fm_fingerprint(smoke_config, SplitInfo.load(run))))
    compressor = torch.load(run.store(store.store_version) / "compressor.pt", weights_only=True)
    from loopfm.actors.extractor import build_compressor

    ae = build_compressor(compressor).eval()
    events = events_frame(run).sort_values([TS, EVENT_ID])
    rows = store_frame(run, store.store_version).set_index(EVENT_ID)
    counts = events[USER_ID].value_counts()
    long_users = counts[counts > smoke_config.fm.chunk_len].index[:3]
    assert len(long_users) > 0, "the smoke log must have users longer than one chunk"
    for user in long_users:
        u = events[events[USER_ID] == user]
        label = u[LABEL].to_numpy()
        tokens = {
            "item": torch.tensor(u[idx(ITEM_ID)].to_numpy())[None],
            "category": torch.tensor(u[idx(CATEGORY)].to_numpy())[None],
            "surface": torch.tensor(u[SURFACE].to_numpy())[None],
            "prev_label": torch.tensor(prev_labels(u[USER_ID].to_numpy(), u[TS].to_numpy(), label))[None],
        }
        with torch.no_grad():
            logit, emb = model.extract(tokens, smoke_config.embed.layers)
            z = ae.encode(emb[0]).numpy()
        stored = rows.loc[u[EVENT_ID].to_numpy()]
        np.testing.assert_allclose(stored["fm_logit"].to_numpy(), logit[0].numpy(), atol=1e-4)
        decoded = codec.decode(codec.from_binary_column(list(stored["z"]), store.width // 2), "int4", store.width)
        assert np.abs(decoded - z).max() <= 1 / 16 + 1e-4  # int4 of the same z


@pytest.mark.timeout(60)
def test_current_store_is_skipped_and_the_fm_version_is_its_weights_hash(embedded, smoke_config):
    run, fm, store = embedded
    stamp = (run.store(store.store_version) / "manifest.json").stat().st_mtime_ns
    assert embed_stage(smoke_config, run).store_version == store.store_version
    assert (run.store(store.store_version) / "manifest.json").stat().st_mtime_ns == stamp
    from loopfm.weights import MODEL_FILE, model_hash

    fm_dir = run.fm(fm_fingerprint(smoke_config, SplitInfo.load(run)))
    assert model_hash((fm_dir / MODEL_FILE).read_bytes()) == fm.fm_version
