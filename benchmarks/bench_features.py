"""Feature join throughput: `loopfm features` on a synthetic log, events/s and peak memory.

Writes splits and a store straight into a scratch run directory (random ids, times and z; the
join's cost does not depend on what z says), runs the stage once per size, and records:
examples/s (vertical events joined), input rows/s (events + store rows through the shuffle),
the private memory (RssAnon, summed over the driver and the local Ray's processes) before and at
peak during the stage, next to what materializing every sequence as float32 would take
(examples x L x width x 4 bytes), and the peak of /dev/shm (Ray's object store, which holds the
shuffled events and store rows). Two sizes show how memory grows with the number of examples.

    python benchmarks/bench_features.py                      # 0.3M and 1.2M events
    python benchmarks/bench_features.py --users 2000 --events-per-user 50

Results: benchmarks/results/features_<device>.json and a row in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemorySampler, append_row, config_hash, memory_now, write_log, write_result  # noqa: E402

from loopfm.config import LoopFMConfig  # noqa: E402
from loopfm.features.stage import features_stage  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402


def bench_size(cfg: LoopFMConfig, users: int, events_per_user: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        run = RunDir(root)
        events = write_log(cfg, run, users, events_per_user)
        private_before, shm_before = memory_now()
        sampler = MemorySampler()
        sampler.start()
        started = time.perf_counter()
        manifest = features_stage(cfg, run)
        seconds = time.perf_counter() - started
        peaks = sampler.stop()
        private_peak, shm_peak = peaks["private_mib_peak"], peaks["shm_mib_peak"]
        examples = sum(manifest.rows.values())
        return {
            "users": users, "events": events, "examples": examples, "seconds": round(seconds, 2),
            "examples_per_s": round(examples / seconds), "input_rows_per_s": round((examples + events) / seconds),
            "private_mib_before": round(private_before, 1), "private_mib_peak": private_peak,
            "shm_mib_before": round(shm_before, 1), "shm_mib_peak": shm_peak,
            "dense_sequences_mib": round(examples * manifest.seq_len * manifest.width * 4 / 2**20, 1),
            "output_mib": round(
                sum(f.stat().st_size for f in run.features(manifest.fingerprint).rglob("*.parquet")) / 2**20, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[3000, 12000])
    parser.add_argument("--events-per-user", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    args = parser.parse_args()

    import ray

    from loopfm.runtime import init_ray, setup_logging

    setup_logging()
    cfg = LoopFMConfig().updated({"ray.progress_bars": False,
                                  **({"ray.num_cpus": args.num_cpus} if args.num_cpus else {})})
    init_ray(cfg.ray)
    sizes = [bench_size(cfg, users, args.events_per_user) for users in args.users]
    device = f"cpu-{os.cpu_count()}core"
    result = {
        "benchmark": "features", "device": device, "cpu": platform.processor() or platform.machine(),
        "ray_cpus": ray.cluster_resources().get("CPU"), "load_avg_1m": round(os.getloadavg()[0], 2),
        "versions": {"ray": ray.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "config": {"features": cfg.features.model_dump(mode="json"), "width": cfg.embed.compress.width,
                   "dtype": cfg.embed.compress.dtype},
        "sizes": sizes,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result("features", result)
    row(result)


def row(result: dict) -> None:
    big = result["sizes"][-1]
    cfg = result["config"]
    append_row(
        result["date"], "features (point-in-time join)", f"{result['device']}, Ray {result['versions']['ray']}",
        f"{big['examples_per_s']:,} examples/s ({big['input_rows_per_s']:,} input rows/s)",
        f"{big['events']:,} events, {big['examples']:,} examples, L={cfg['features']['seq_len']}, "
        f"width {cfg['width']} {cfg['dtype']}; private memory growth "
        + ", ".join(f"+{s['private_mib_peak'] - s['private_mib_before']:.0f} MiB at {s['events']:,} events"
                    for s in result["sizes"])
        + f" (the first includes starting Ray's workers; dense sequences would be "
        f"{big['dense_sequences_mib']:,.0f} MiB);"
        f" load avg {result['load_avg_1m']}", config_hash(result["config"]))


if __name__ == "__main__":
    main()
