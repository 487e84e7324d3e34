"""Shared pieces of the harnesses in this folder: device naming, versions, results, timing, memory.

Not a benchmark itself. The scripts put this folder on `sys.path` (they run as plain scripts, or
through `loopfm bench <name>`), start the local Ray through `loopfm.runtime.init_ray` (so the Data
settings of the real stages apply) and write `benchmarks/results/<name>_<device>.json` plus one
row of docs/BENCHMARKS.md. Every row names the device, the Ray and torch versions and the config
hash (`stable_hash` of the result's "config" section, also stored in the JSON as "config_hash").
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.config import LoopFMConfig
from loopfm.datasets.schema import SPLITS
from loopfm.datasets.splits import SplitInfo, boundaries, split_of
from loopfm.rundir import RunDir
from loopfm.store import codec
from loopfm.store.parquet import seal
from loopfm.store.resolve import store_version
from loopfm.store.schema import ROW_SCHEMA, StoreManifest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLE = REPO / "docs" / "BENCHMARKS.md"
DOCS = REPO / "docs"

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
    """The local Ray as every command starts it (more logical CPUs than cores, docs/DESIGN.md, 'Ray facts')."""
    import ray

    from loopfm.config import LoopFMConfig
    from loopfm.runtime import init_ray, setup_logging

    setup_logging()
    cfg = LoopFMConfig().updated({"ray.progress_bars": False, **({"ray.num_cpus": num_cpus} if num_cpus else {})})
    init_ray(cfg.ray)  # exactly as the stages start it, with their Data settings
    return {"ray_cpus": ray.cluster_resources().get("CPU"), "ray_gpus": ray.cluster_resources().get("GPU", 0)}


def batches_as_arrays(ds) -> dict[str, np.ndarray]:
    """Every batch of a Ray Dataset, in order, as one dict of numpy arrays (a bare loop's input)."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- memory of this process and its descendants (the local Ray: raylet, workers, actors) ------
class MemorySampler(threading.Thread):
    """Peaks (MiB), polled every `every` s from /proc, over this process and its descendants (a
    local Ray started by this driver: GCS, raylet, every worker and actor): private memory
    (RssAnon summed), RSS summed (shared pages counted once per process), the largest single
    process's RSS (and its command) and private memory, and /dev/shm in use (Ray's object store)."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self._done = every, threading.Event()
        self.private = self.rss = self.largest = self.largest_private = self.shm = 0.0
        self.largest_cmd, self.processes = "", 0

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        procs = process_memory()
        private = sum(p["anon"] for p in procs)
        self.private, self.rss = max(self.private, private), max(self.rss, sum(p["rss"] for p in procs))
        self.processes = max(self.processes, len(procs))
        self.largest_private = max([self.largest_private, *(p["anon"] for p in procs)])
        top = max(procs, key=lambda p: p["rss"], default=None)
        if top and top["rss"] > self.largest:
            self.largest, self.largest_cmd = top["rss"], top["cmd"]
        self.shm = max(self.shm, shm_used_mib())

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        return {"private_mib_peak": round(self.private, 1), "rss_sum_mib_peak": round(self.rss, 1),
                "largest_process_rss_mib": round(self.largest, 1), "largest_process": self.largest_cmd,
                "largest_private_mib": round(self.largest_private, 1),
                "processes_max": self.processes, "shm_mib_peak": round(self.shm, 1)}


def memory_now() -> tuple[float, float]:
    """(private MiB of the process tree, used MiB of /dev/shm)."""
    return sum(p["anon"] for p in process_memory()), shm_used_mib()


def shm_used_mib() -> float:
    shm = os.statvfs("/dev/shm")
    return (shm.f_blocks - shm.f_bfree) * shm.f_frsize / 2**20


def process_memory(root: Optional[int] = None) -> list[dict]:
    """{pid, rss, anon (MiB), cmd} of `root` (default: this process) and all its descendants."""
    out = []
    for pid in descendants(root or os.getpid()):
        fields = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    fields[key] = int(value.split()[0]) / 1024
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            continue
        out.append({"pid": pid, "rss": fields.get("VmRSS", 0.0), "anon": fields.get("RssAnon", 0.0),
                    "cmd": cmd.strip()})
    return out


def descendants(root: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier}
        found += sorted(frontier)
    return found


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


_LAST_CONFIG_HASH: dict[str, str] = {}


def config_hash(config) -> str:
    """The project's stable hash of a benchmark's config section (what a row and its JSON share)."""
    from loopfm.config import stable_hash

    return stable_hash(config)


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>_<device>.json; adds "config_hash", which the next `append_row` uses."""
    if "config" in result:
        result["config_hash"] = config_hash(result["config"])
        _LAST_CONFIG_HASH["hash"] = result["config_hash"]
    out = RESULTS / f"{name}_{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return out


def append_row(date: str, benchmark: str, device: str, result: str, details: str,
               config_hash: Optional[str] = None) -> None:
    """One row of docs/BENCHMARKS.md (append only). The device cell gets the torch version and the
    config hash (`config_hash`, else the one of the last `write_result`) when it lacks them."""
    import torch

    if "torch" not in device:
        device += f", torch {torch.__version__}"
    hashed = config_hash or _LAST_CONFIG_HASH.get("hash")
    if hashed and "config" not in device:
        device += f", config {hashed}"
    if not TABLE.exists():
        TABLE.write_text("# Benchmarks\n\nOne row per run; JSON with full details in `benchmarks/results/`.\n\n"
                         "| date | benchmark | device | result | details |\n|---|---|---|---|---|\n")
    cells = [c.replace("|", "/").replace("\n", " ") for c in (date, benchmark, device, result, details)]
    with TABLE.open("a") as f:
        f.write("| " + " | ".join(cells) + " |\n")


def figure(cols: int, width: float = 5.0, height: float = 3.8):
    """(Figure, axes) for a row of `cols` panels, drawn with Agg (no pyplot, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height), layout="constrained")
    axes = [fig.add_subplot(1, cols, i + 1) for i in range(cols)]
    return fig, axes


def save_png(fig, name: str) -> Path:
    """docs/<name> (PNG)."""
    out = DOCS / name
    fig.savefig(out, format="png", dpi=110)
    print(f"plot: {out}")
    return out


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
    events = write_splits(cfg, run, users, events_per_user, seed)
    write_store(cfg, run, events, seed)
    return events.num_rows


def write_splits(cfg: LoopFMConfig, run: RunDir, users: int, events_per_user: int, seed: int = 0) -> pa.Table:
    """Splits only (what `loopfm embed` reads); returns the events table (all splits)."""
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
        pq.write_table(events.filter(pa.array(which == i)), run.splits / name / "part-0.parquet",
                       row_group_size=200_000)
    info = SplitInfo(fingerprint=f"bench-{users}-{events_per_user}", valid_start_ts=valid_start,
                     test_start_ts=test_start,
                     rows={s: int((which == i).sum()) for i, s in enumerate(SPLITS)}, label_rate={},
                     vocab_sizes={"user_id": users + 2, "item_id": NUM_ITEMS + 2, "category": NUM_CATEGORIES + 2},
                     categorical=[], num_surfaces=NUM_SURFACES, vertical=0)
    info.write(run.splits)
    return events


def write_store(cfg: LoopFMConfig, run: RunDir, events: pa.Table, seed: int = 0) -> None:
    """A sealed store of `events` with random z (uniform in [-1, 1]) and logits, FM version "bench"."""
    rng = np.random.default_rng([seed, 1])
    n = events.num_rows
    c = cfg.embed.compress
    version = store_version(FM_VERSION, cfg.embed, "")  # no compressor: z are fabricated
    path = run.store(version)
    path.mkdir(parents=True)
    z = codec.encode(rng.uniform(-1, 1, (n, c.width)), c.dtype)
    store = pa.table({
        "event_id": events["event_id"], "user_id": events["user_id"], "ts": events["ts"], "surface": events["surface"],
        "fm_logit": rng.normal(size=n).astype(np.float32), "z": codec.rows_to_binary(z),
    }).cast(ROW_SCHEMA)
    pq.write_table(store, path / "part-0.parquet", row_group_size=200_000)
    seal(path, StoreManifest(version, FM_VERSION, "none", list(cfg.embed.layers), 64, c.width, list(c.prefix_widths),
                             c.dtype), expected_rows=n)  # seal computes the row count, ts range, file hashes


def write_fm(cfg: LoopFMConfig, run: RunDir, seed: int = 0) -> int:
    """A random-init CausalFM of `cfg.fm` saved where `embed` looks for this config's FM."""
    import io

    import torch

    from loopfm.fm.checkpoint import FMManifest, save_fm
    from loopfm.fm.train import fm_fingerprint
    from loopfm.models.fm import CausalFM
    from loopfm.rundir import atomic_output

    info = SplitInfo.load(run)
    vocab = {k: info.vocab_sizes[k] for k in ("item_id", "category")}
    torch.manual_seed(seed)
    fm = CausalFM(cfg.fm, vocab, info.num_surfaces)
    buf = io.BytesIO()
    torch.save(fm.state_dict(), buf)
    fingerprint = fm_fingerprint(cfg, info)
    with atomic_output(run.fm(fingerprint)) as tmp:
        save_fm(tmp, buf.getvalue(), FMManifest(fingerprint=fingerprint, fm_version="",
                                                 fm=cfg.fm.model_dump(mode="json"),
                                                 vocab_sizes=vocab, num_surfaces=info.num_surfaces,
                                                 splits_fingerprint=info.fingerprint))
    return sum(p.numel() for p in fm.parameters())
