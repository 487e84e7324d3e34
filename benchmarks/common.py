"""Shared pieces of bench_extract.py and bench_train.py: device naming, versions, results, timing.

Not a benchmark itself. Both scripts put this folder on `sys.path` (they run as plain scripts),
start the local Ray through `loopfm.runtime.init_ray` (so the Data settings of the real stages
apply) and write `benchmarks/results/<name>_<device>.json` plus one row of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.config import LoopFMConfig
from loopfm.datasets.schema import SPLITS
from loopfm.datasets.splits import SplitInfo, boundaries, split_of
from loopfm.features import store_version
from loopfm.rundir import RunDir, write_manifest
from loopfm.store import codec
from loopfm.store.parquet import seal
from loopfm.store.schema import ROW_SCHEMA, StoreManifest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLE = REPO / "docs" / "BENCHMARKS.md"

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by GPU name substring.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name(override: Optional[str] = None) -> str:
    """`cpu-<n>core`, or the GPU's short name (`h100`), unless given."""
    if override:
        return override
    if gpu():
        import torch

        name = torch.cuda.get_device_name(0)
        for short in PEAK_BF16:
            if short in name:
                return short.lower()
        return name.replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core"


def peak_flops() -> Optional[float]:
    """Dense bf16 peak of this machine's GPU, None on CPU (or an unknown GPU)."""
    if not gpu():
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((peak for short, peak in PEAK_BF16.items() if short in name), None)


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    if gpu():
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import numpy as np
    import pyarrow as pa
    import ray
    import torch

    return {"ray": ray.__version__, "torch": torch.__version__, "pyarrow": pa.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def start_ray(num_cpus: Optional[int]) -> dict:
    """The local Ray as every command starts it (more logical CPUs than cores, DESIGN section 8)."""
    import ray

    from loopfm.config import LoopFMConfig
    from loopfm.runtime import init_ray, local_num_cpus, setup_logging

    setup_logging()
    cfg = LoopFMConfig().updated({"ray.progress_bars": False, **({"ray.num_cpus": num_cpus} if num_cpus else {})})
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # address="local": a fresh Ray of our own even when another local one runs on this machine
        # (a plain ray.init() attaches to the newest `ray start` cluster and then refuses num_cpus).
        ray.init(address="local", num_cpus=local_num_cpus(cfg.ray), include_dashboard=False, log_to_driver=True)
    init_ray(cfg.ray)  # connected already: applies the Data settings of the real stages
    return {"ray_cpus": ray.cluster_resources().get("CPU"), "ray_gpus": ray.cluster_resources().get("GPU", 0)}


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def write_result(name: str, result: dict) -> Path:
    out = RESULTS / f"{name}_{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return out


def append_row(date: str, benchmark: str, device: str, result: str, details: str) -> None:
    """One row of docs/BENCHMARKS.md (append only)."""
    if not TABLE.exists():
        TABLE.write_text("# Benchmarks\n\nOne row per run; JSON with full details in `benchmarks/results/`.\n\n"
                         "| date | benchmark | device | result | details |\n|---|---|---|---|---|\n")
    cells = [c.replace("|", "/").replace("\n", " ") for c in (date, benchmark, device, result, details)]
    with TABLE.open("a") as f:
        f.write("| " + " | ".join(cells) + " |\n")


def probe_threads(num_cpus: float) -> dict:
    """What torch runs with in a Ray actor holding `num_cpus` (an extractor, a Train worker)."""
    import ray
    import torch

    @ray.remote(num_cpus=num_cpus)
    class Probe:
        def threads(self):
            return {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}

    probe = Probe.remote()
    out = ray.get(probe.threads.remote())
    ray.kill(probe)
    return out


# -- a scratch run: splits and a store written directly (random ids, times and z) ----------
NUM_ITEMS, NUM_CATEGORIES, NUM_SURFACES = 20_000, 60, 3
FM_VERSION = "bench"


def write_log(cfg: LoopFMConfig, run: RunDir, users: int, events_per_user: int, seed: int = 0) -> int:
    """Splits (with *_idx columns and a SplitInfo with vocab sizes) and a matching store; returns events."""
    rng = np.random.default_rng(seed)
    n = users * events_per_user
    user = np.repeat(np.arange(users), events_per_user)
    ts = rng.integers(0, 14 * 86_400, n)
    surface = np.where(rng.random(n) < 0.3, 0, rng.integers(1, NUM_SURFACES, n)).astype(np.int32)  # vertical: 0
    item, category = rng.integers(0, NUM_ITEMS, n), rng.integers(0, NUM_CATEGORIES, n)
    events = pa.table({
        "event_id": np.arange(n, dtype=np.int64), "user_id": user, "item_id": item, "category": category,
        "surface": surface, "ts": ts, "label": (rng.random(n) < 0.3).astype(np.int8),
        "user_id_idx": user + 2, "item_id_idx": item + 2, "category_idx": category + 2,
    })
    valid_start, test_start = boundaries(ts, cfg.data.split)
    which = split_of(ts, valid_start, test_start)
    for i, name in enumerate(SPLITS):
        (run.splits / name).mkdir(parents=True)
        pq.write_table(events.filter(pa.array(which == i)), run.splits / name / "part-0.parquet", row_group_size=200_000)
    info = SplitInfo(fingerprint=f"bench-{users}-{events_per_user}", valid_start_ts=valid_start, test_start_ts=test_start,
                     rows={s: int((which == i).sum()) for i, s in enumerate(SPLITS)}, label_rate={},
                     vocab_sizes={"user_id": users + 2, "item_id": NUM_ITEMS + 2, "category": NUM_CATEGORIES + 2},
                     categorical=[], num_surfaces=NUM_SURFACES, vertical=0)
    write_manifest(run.splits, asdict(info))

    c = cfg.embed.compress
    version = store_version(FM_VERSION, cfg.embed)
    path = run.store(version)
    path.mkdir(parents=True)
    z = codec.encode(rng.uniform(-1, 1, (n, c.width)), c.dtype)
    store = pa.table({
        "event_id": events["event_id"], "user_id": events["user_id"], "ts": events["ts"], "surface": events["surface"],
        "fm_logit": rng.normal(size=n).astype(np.float32), "z": codec.rows_to_binary(z),
    }).cast(ROW_SCHEMA)
    pq.write_table(store, path / "part-0.parquet", row_group_size=200_000)
    seal(path, StoreManifest(version, FM_VERSION, "none", list(cfg.embed.layers), 64, c.width, list(c.prefix_widths),
                             c.dtype, 0, 0, 0), expected_rows=n)  # row count, ts range, file hashes
    return n
