"""The store's data contract (docs/DESIGN.md, 'Store'): row columns and the manifest.

A store version is a directory of parquet files with one row per event and a `manifest.json`.
Readers state what they expect (FM version, layer set, width, dtype) and are refused, with the
differing field named, when the manifest says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from loopfm.errors import VersionMismatchError
from loopfm.rundir import Manifest, computed

EVENT_ID = "event_id"
USER_ID = "user_id"
TS = "ts"
SURFACE = "surface"
FM_LOGIT = "fm_logit"
Z = "z"
COMPRESSOR_FILE = "compressor.pt"  # the autoencoder that made z; incremental embedding reuses it

ROW_SCHEMA = pa.schema(
    [
        (EVENT_ID, pa.int64()),
        (USER_ID, pa.int64()),
        (TS, pa.int64()),
        (SURFACE, pa.int32()),
        (FM_LOGIT, pa.float32()),
        (Z, pa.binary()),
    ]
)

# Fields a reader may pin; everything else in the manifest is informational.
CHECKED_FIELDS = ("fm_version", "layers", "width", "dtype")


@dataclass
class StoreManifest(Manifest):
    """A store's (or a store delta's) `manifest.json`. `seal` computes `rows`, `min_ts`, `max_ts`,
    `files` and `created_at` from the files it seals: whoever builds one leaves them out."""

    MISSING = "no store at {path} (missing manifest.json)"

    store_version: str
    fm_version: str
    checkpoint_hash: str
    layers: list[int]
    raw_width: int
    width: int
    prefix_widths: list[int]
    dtype: str
    rows: int = computed(0)
    min_ts: int = computed(0)
    max_ts: int = computed(0)
    recon_error: dict[str, float] = field(default_factory=dict)  # prefix width -> MSE of e'
    quant_error: dict[str, float] = field(default_factory=dict)  # dtype -> max |z - decode(encode(z))|
    parent: Optional[str] = None  # set on deltas: the version this one extends
    base: Optional[str] = None  # set on deltas: the full store the chain starts from
    since: Optional[int] = None  # set on deltas: holds the log's events with ts > since
    compressor_hash: str = ""  # sha256 of compressor.pt, part of the version (a drifting store lists its slices')
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, checked on open
    created_at: str = ""

    def check(self, expected: dict[str, Any], where: Path | str = "") -> None:
        """Raise VersionMismatchError naming every pinned field that differs."""
        diffs = []
        for key, want in expected.items():
            if key not in CHECKED_FIELDS:
                raise ValueError(f"{key!r} is not a pinnable store field; use one of {CHECKED_FIELDS}")
            have = getattr(self, key)
            if want is not None and have != want:
                diffs.append(f"{key}: store has {have!r}, expected {want!r}")
        if diffs:
            raise VersionMismatchError(f"store {where or self.store_version} does not match: " + "; ".join(diffs))
