"""Check (not collected by pytest): `loopfm features` of this tree writes the same feature sets as
another tree's (`--base`, e.g. an export of the commit before a change to the join).

For a config: generate, validate and split its synthetic log, fabricate a store of every event
with the config's width and dtype (what z says does not change what the join must do), then run
`loopfm features` twice on copies of that run directory, once with `--base` first on PYTHONPATH
(the driver and every Ray worker import `loopfm` from there), once with this tree. Every feature
set must have the same fingerprint and manifest rows, and every split the same rows (sorted by
event_id) with every column equal, list columns and bytes included; each file's event ids too.

    flock /tmp/loopfm_heavy.lock env RAY_AUTH_MODE=disabled .venv/bin/python \\
        tests/features_join_equivalence.py --config configs/smoke.yaml --base /tmp/base/src

`--base` holds a `loopfm` folder (a link to the other tree's `platform/`); `--new` likewise, when
the changed tree is not this checkout. Exit status 0 when equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
LOOPFM = [sys.executable, "-m", "loopfm.cli"]


def loopfm(args: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([*LOOPFM, *args], check=True, cwd=REPO, env=env)
    return time.perf_counter() - started


def fabricate_store(config: str, sets: list[str], run_root: Path) -> None:
    """A sealed store of every event (random z and logits, seeded) that `loopfm features` resolves."""
    from loopfm.config import load_config
    from loopfm.datasets.schema import SPLITS
    from loopfm.rundir import RunDir
    from loopfm.store import codec
    from loopfm.store.parquet import seal
    from loopfm.store.resolve import store_version
    from loopfm.store.schema import ROW_SCHEMA, StoreManifest

    cfg = load_config(config, sets)
    run = RunDir(run_root)
    events = pa.concat_tables([pads.dataset(str(run.splits / s), format="parquet").to_table(
        columns=["event_id", "user_id", "ts", "surface"]) for s in SPLITS])
    rng = np.random.default_rng(0)
    c = cfg.embed.compress
    version = store_version("fm-fabricated", cfg.embed, "")
    path = run.store(version)
    path.mkdir(parents=True)
    z = codec.encode(rng.uniform(-1, 1, (events.num_rows, c.width)), c.dtype)
    table = events.append_column("fm_logit", pa.array(rng.normal(size=events.num_rows).astype(np.float32)))
    pq.write_table(table.append_column("z", codec.rows_to_binary(z)).select(ROW_SCHEMA.names).cast(ROW_SCHEMA),
                   path / "part-0.parquet")
    seal(path, StoreManifest(version, "fm-fabricated", "none", list(cfg.embed.layers), 64, c.width,
                             list(c.prefix_widths), c.dtype), expected_rows=events.num_rows)


def feature_sets(run_root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((run_root / "features").iterdir()) if p.is_dir()}


def compare(old: Path, new: Path) -> list[str]:
    """Differences between two feature set folders (empty: equal)."""
    problems = []
    mo, mn = (json.loads((p / "manifest.json").read_text()) for p in (old, new))
    for key in set(mo) | set(mn):
        if key not in ("seconds", "created_at") and mo.get(key) != mn.get(key):  # when and how long
            problems.append(f"manifest {key}: {mo.get(key)} != {mn.get(key)}")
    for split in ("train", "valid", "test"):
        a, b = (pads.dataset(str(p / split), format="parquet").to_table() for p in (old, new))
        if a.schema != b.schema:
            problems.append(f"{split}: schema {a.schema} != {b.schema}")
            continue
        if a.num_rows != b.num_rows:
            problems.append(f"{split}: {a.num_rows} != {b.num_rows} rows")
            continue
        a, b = a.sort_by("event_id"), b.sort_by("event_id")
        for name in a.column_names:
            x, y = a[name].combine_chunks(), b[name].combine_chunks()
            if not x.equals(y) and not _equal_with_nan(x, y):
                problems.append(f"{split}.{name}: values differ")
        files = [sorted(tuple(pq.read_table(f, columns=["event_id"])["event_id"].to_pylist())
                        for f in (p / split).glob("*.parquet")) for p in (old, new)]
        if files[0] != files[1]:
            problems.append(f"{split}: rows are spread over files differently")
        print(f"  {split}: {a.num_rows} rows x {a.num_columns} columns compared", flush=True)
    return problems


def _equal_with_nan(x: pa.Array, y: pa.Array) -> bool:
    if pa.types.is_floating(x.type):
        return np.array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), equal_nan=True)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--base", required=True, help="folder holding the other tree's `loopfm` package")
    parser.add_argument("--new", default=None, help="the same for the changed tree (default: this checkout)")
    parser.add_argument("--set", dest="sets", action="append", default=["ray.progress_bars=false"])
    parser.add_argument("--scratch", default=None)
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="join_equivalence_"))
    sets = [a for s in args.sets for a in ("--set", s)]
    source = scratch / "source"
    common = ["--config", args.config, *sets]
    try:
        if not (source / "data" / "splits").is_dir():
            for step in (["data", "generate"], ["data", "validate"], ["data", "split"]):
                loopfm([*step, *common, "--out", str(source)])
            fabricate_store(args.config, args.sets, source)
        seconds = {}
        for name, path in (("old", args.base), ("new", args.new)):
            shutil.rmtree(scratch / name, ignore_errors=True)
            shutil.copytree(source, scratch / name)
            env = {**os.environ, **({"PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
                                    if path else {})}
            where = subprocess.run([sys.executable, "-c", "import loopfm.features.stage as s; print(s.__file__)"],
                                   check=True, env=env, capture_output=True, text=True).stdout.strip()
            print(f"{name}: loopfm.features.stage from {where}", flush=True)
            seconds[name] = loopfm(["features", *common, "--out", str(scratch / name)], env)
        old, new = feature_sets(scratch / "old"), feature_sets(scratch / "new")
        problems = [] if old.keys() == new.keys() else [f"feature sets {sorted(old)} != {sorted(new)}"]
        for fingerprint in sorted(old.keys() & new.keys()):
            print(f"feature set {fingerprint}:", flush=True)
            problems += compare(old[fingerprint], new[fingerprint])
        print(f"features stage: old {seconds['old']:.1f}s, new {seconds['new']:.1f}s (each a fresh CLI process)")
        print("EQUAL" if not problems else "DIFFERENT:\n  " + "\n  ".join(problems), flush=True)
        return 1 if problems else 0
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
