"""Cost growth: wall time of embed, the feature join and VM training against the number of events.

One run, one machine, one local Ray, sizes in ascending order. For each size a scratch run
directory gets splits written straight from random events (`common.write_splits`: N users x
E events, 3 surfaces, vertical 0) and a random-init FM checkpoint of the config's shape (its
weights do not change what extraction costs); then the real stages run one after another, each
timed whole as a user would see it:

* **embed**: `loopfm.fm.embed.embed_stage` (user chunks -> compressor fit on a fixed sample ->
  the ChunkExtractor actor pool over every chunk -> sealed store);
* **features**: `loopfm.features.stage.features_stage` (the point-in-time join over that store),
  with the memory of the whole process tree (driver, raylet, workers; `common.MemorySampler`) and
  /dev/shm polled while it runs: the join holds one bucket per task (`features.buckets`), so its
  private memory and what it adds to the object store should stay flat as the log grows;
* **train**: `loopfm.training.vm.train_vm`, the `loopfm` arm (Ray Train, one worker).

Per stage: the log-log slope of seconds against events (least squares over the sizes; 1.0 =
linear, below 1 = fixed costs still weigh, above 1 = superlinear), and an affine fit
seconds = fixed + events x per-event, which splits the fixed start-up cost from the per-event one.
An untimed warm-up (embed and features at a tiny size) runs first, so the smallest size does not
alone pay for starting Ray's worker processes and their imports (every `train_vm` starts its own
Train worker group, so training needs none).

    RAY_AUTH_MODE=disabled python benchmarks/bench_scaling.py        # 60k, 200k, 600k events: ~6 min on 2 cores
    loopfm bench scaling -- --users 300 1000 3000 --events-per-user 100
    loopfm bench scaling --config configs/bench.yaml -- --users 5000 15000 50000  # GPU scale

Results: benchmarks/results/scaling_<device>.json, a row in docs/BENCHMARKS.md, docs/bench_scaling.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MemorySampler,
    Timer,
    append_row,
    device_name,
    figure,
    machine,
    memory_now,
    save_png,
    start_ray,
    versions,
    write_fm,
    write_result,
    write_splits,
)

from loopfm.bench import loglog_slope  # noqa: E402
from loopfm.config import load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402

STAGES = ("embed", "features", "train")
# The join's memory against events (flat: slope near 0): the private memory the process tree gained
# over the stage, and the largest single process's; what the object store (/dev/shm) gained is
# reported as its largest value (near zero when flat, where a log-log slope would fit noise).
MEMORY = ("private_mib_growth", "largest_private_mib")
# The compressor's quality does not change what the stages cost; a small fixed fit keeps it out of the way.
DEFAULTS = ["ray.progress_bars=false", "embed.compress.epochs=3", "embed.compress.sample_events=10000",
            "train.epochs=2", "train.num_workers=1", "fm.num_workers=0"]


def one_size(cfg, users: int, events_per_user: int, scratch: Path, train: bool = True) -> dict:
    from loopfm.features.stage import features_stage
    from loopfm.fm.embed import embed_stage
    from loopfm.training.vm import arm_config, train_vm

    root = Path(tempfile.mkdtemp(prefix=f"scaling-{users}-", dir=scratch))
    try:
        run = RunDir(root)
        events = write_splits(cfg, run, users, events_per_user).num_rows
        fm_params = write_fm(cfg, run)
        out = {"users": users, "events": events, "fm_params": fm_params}
        load = [round(os.getloadavg()[0], 2)]
        with Timer() as t:
            store = embed_stage(cfg, run)
        out["embed_s"], out["store_rows"] = round(t.seconds, 2), store.rows
        load.append(round(os.getloadavg()[0], 2))
        private_before, shm_before = memory_now()
        sampler = MemorySampler(every=0.5)
        sampler.start()
        with Timer() as t:
            features = features_stage(cfg, run)
        peaks = sampler.stop()
        out["features_s"], out["examples"] = round(t.seconds, 2), sum(features.rows.values())
        out["features_memory"] = {**peaks, "private_mib_before": round(private_before, 1),
                                  "shm_mib_before": round(shm_before, 1),
                                  "private_mib_growth": round(peaks["private_mib_peak"] - private_before, 1),
                                  "shm_mib_growth": round(peaks["shm_mib_peak"] - shm_before, 1)}
        load.append(round(os.getloadavg()[0], 2))
        if not train:
            return out
        acfg = arm_config(cfg, "loopfm", 0)
        with Timer() as t:
            vm = train_vm(acfg, run, features)
        out["train_s"], out["train_rows"] = round(t.seconds, 2), features.rows["train"]
        out["train_epochs"] = len(vm.metrics["history"])
        load.append(round(os.getloadavg()[0], 2))
        out["load_avg_1m"] = load  # before embed, after embed, after features, after train
        for stage in STAGES:
            out[f"{stage}_events_per_s"] = round(events / out[f"{stage}_s"])
        print("size:", out, flush=True)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fits(sizes: list[dict]) -> dict:
    events = [s["events"] for s in sizes]
    out = {}
    for stage in STAGES:
        seconds = [s[f"{stage}_s"] for s in sizes]
        per_event, fixed = np.polyfit(events, seconds, 1)
        out[stage] = {**loglog_slope(events, seconds), "fixed_s": round(float(fixed), 2),
                      "per_million_events_s": round(float(per_event) * 1e6, 2)}
    total = [sum(s[f"{stage}_s"] for stage in STAGES) for s in sizes]
    out["all"] = loglog_slope(events, total)
    upper = len(sizes) // 2  # the larger half: where every task slot of the join is busy
    out["features_memory"] = {"shm_mib_growth_max": max(s["features_memory"]["shm_mib_growth"] for s in sizes)}
    for name in MEMORY:
        mib = [max(s["features_memory"][name], 1.0) for s in sizes]
        out["features_memory"][f"{name}_slope"] = loglog_slope(events, mib)["slope"]
        out["features_memory"][f"{name}_slope_upper"] = loglog_slope(events[upper:], mib[upper:])["slope"]
    return out


def plot(r: dict) -> None:
    sizes, f = r["sizes"], r["fits"]
    events = np.array([s["events"] for s in sizes], dtype=float)
    fig, (ax, rate, memory) = figure(3)
    grid = np.geomspace(events.min(), events.max(), 50)
    for stage, color in zip(STAGES, ("C0", "C1", "C2")):
        seconds = np.array([s[f"{stage}_s"] for s in sizes])
        ax.plot(events, seconds, "o", color=color)
        b, a = np.polyfit(np.log(events), np.log(seconds), 1)
        ax.plot(grid, np.exp(a) * grid**b, "-", color=color, label=f"{stage}: slope {f[stage]['slope']:.2f}")
        rate.plot(events, events / seconds, "o-", color=color, label=stage)
    ax.plot(grid, sizes[0][f"{STAGES[0]}_s"] * grid / events[0], ":", color="grey", label="slope 1 (linear)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events")
    ax.set_ylabel("stage wall time (s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    events_axis(rate, "events/s (whole stage)")
    for name, label in zip((*MEMORY, "shm_mib_growth"), ("private gained, all processes",
                                                         "private, largest process", "object store gained")):
        slopes = (f" (slope {f['features_memory'][name + '_slope']:.2f}, upper half "
                  f"{f['features_memory'][name + '_slope_upper']:.2f})" if name in MEMORY else "")
        memory.plot(events, [s["features_memory"][name] for s in sizes], "o-", label=label + slopes)
    events_axis(memory, "features stage memory (MiB)")
    c = r["config"]
    fig.suptitle(f"Cost growth, {r['device']}: FM d={c['fm']['d_model']} x{c['fm']['n_layers']}, L={c['seq_len']}, "
                 f"VM {c['vm_model']} x{c['train_epochs']} epochs "
                 f"(load {r['load_avg_1m_start']}->{r['load_avg_1m_end']})",
                 fontsize=9)
    save_png(fig, "bench_scaling.png")


def events_axis(axis, ylabel: str) -> None:
    """A panel of some quantity (from 0) against events on a log axis."""
    axis.set_xscale("log")
    axis.set_xlabel("events")
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[600, 2000, 6000], help="one size per value")
    parser.add_argument("--events-per-user", type=int, default=100)
    parser.add_argument("--config", help="loopfm config (FM shape, embed, features, VM, train); default: built-in")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--warmup-users", type=int, default=50, help="untimed warm-up size (0: none)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--device-name", default=None)
    args = parser.parse_args()
    if len(set(args.users)) < 2:
        parser.error("--users needs at least two different sizes")

    import ray

    cfg = load_config(args.config, [*DEFAULTS, f"ray.num_cpus={args.num_cpus}", *args.overrides])
    device = device_name(args.device_name)
    info = {**machine(), **start_ray(args.num_cpus)}
    scratch = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    try:
        if args.warmup_users:
            with Timer() as warm:
                one_size(cfg, args.warmup_users, args.events_per_user, scratch, train=False)
            print(f"warm-up: {warm.seconds:.1f}s", flush=True)
        sizes = [one_size(cfg, users, args.events_per_user, scratch) for users in sorted(args.users)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "scaling", "device": device, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "config": {"events_per_user": args.events_per_user, "users": sorted(args.users), "config_file": args.config,
                   "overrides": [*DEFAULTS, *args.overrides], "fm": cfg.fm.model_dump(mode="json"),
                   "fm_params": sizes[0]["fm_params"], "embed": cfg.embed.model_dump(mode="json"),
                   "seq_len": cfg.features.seq_len, "vm_model": cfg.vm.model, "vm_pooling": cfg.vm.pooling,
                   "train_epochs": cfg.train.epochs, "train_batch_size": cfg.train.batch_size,
                   "train_workers": cfg.train.num_workers, "arm": "loopfm", "ray_num_cpus": args.num_cpus},
        "sizes": sizes, "date": time.strftime("%Y-%m-%d"),
    }
    result["fits"] = fits(sizes)
    result["span"] = round(sizes[-1]["events"] / sizes[0]["events"], 1)
    write_result("scaling", result)
    row(result)
    plot(result)
    ray.shutdown()


def row(r: dict) -> None:
    f, sizes, c = r["fits"], r["sizes"], r["config"]
    slopes = ", ".join(f"{stage} {f[stage]['slope']:.2f}" for stage in STAGES)
    per = "; ".join(f"{s['events']:,} events: " + ", ".join(f"{stage} {s[f'{stage}_s']}s" for stage in STAGES)
                    + f" (features: private +{s['features_memory']['private_mib_growth']:.0f} MiB, largest "
                    f"process {s['features_memory']['largest_private_mib']:.0f} MiB, shm gained "
                    f"{s['features_memory']['shm_mib_growth']:.0f} MiB;"
                    f" load {s['load_avg_1m'][0]}->{s['load_avg_1m'][-1]})" for s in sizes)
    affine = ", ".join(f"{stage} {f[stage]['fixed_s']}s + {f[stage]['per_million_events_s']}s/M events"
                       for stage in STAGES)
    append_row(
        r["date"], "scaling (stage time vs events)", f"{r['device']}, Ray {r['versions']['ray']}",
        f"log-log slope {slopes} (all stages {f['all']['slope']:.2f}) over {r['span']}x events; features memory "
        + ", ".join(f"{name} slope {f['features_memory'][name + '_slope']:.2f} (upper half "
                    f"{f['features_memory'][name + '_slope_upper']:.2f})" for name in MEMORY)
        + f", object store gained at most {f['features_memory']['shm_mib_growth_max']:.0f} MiB",
        f"{per}. Affine fit: {affine}. FM d={c['fm']['d_model']} x{c['fm']['n_layers']} "
        f"({c['fm_params']:,} params, random "
        f"init), {c['embed']['num_actors']} actor; features L={c['seq_len']}; VM {c['vm_model']} loopfm arm, "
        f"{c['train_epochs']} epochs, 1 Train worker; untimed warm-up first. "
        f"Load avg {r['load_avg_1m_start']}->{r['load_avg_1m_end']}",
    )


if __name__ == "__main__":
    main()
