"""Extraction ratio (Ray Data actor pool / bare loop) against the number of events, at default settings.

`bench_extract.py` measures one size. The Ray pass pays a fixed cost that the bare loop does not:
a new actor process that imports torch before its first call (about 2-3 s on 2 cores). The bare
loop runs in a driver that has torch loaded already. Whether the ratio clears a target therefore
depends on how long the job is. This harness runs both paths at several sizes, fits
`seconds = fixed + per_event * events` to each, and reports:

* the fixed cost and the per-event cost of each path (their ratio is the ratio the Ray path tends to);
* the number of events from which the Ray path reaches `--target` (0.8x) of the bare loop.

Everything else is `bench_extract.py`'s: the same synthetic chunks, models, `pool_args`, bare loop
and thread counts. At each size the two paths alternate over `--repeats` rounds, and the median
round is kept.

    RAY_AUTH_MODE=disabled python benchmarks/bench_extract_scale.py             # ~6 min on 2 cores
    loopfm bench extract_scale -- --users 1000 4000 16000

Results: benchmarks/results/extract_scale_<device>.json, a row in docs/BENCHMARKS.md, and
docs/bench_extract_scale.png (the ratio against events, the fit and the target line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import alternating_rounds, chunk_dataset, make_events, make_models, warm_driver  # noqa: E402
from common import append_row, device_name, figure, machine, probe_threads, save_png, start_ray, versions, write_result  # noqa: E402

from loopfm.config import CompressConfig, EmbedConfig, LoopFMConfig  # noqa: E402


def measure(users: int, events_per_user: int, cfg: LoopFMConfig, models: dict, threads: int, repeats: int) -> dict:
    """The median of `repeats` alternating (Ray, bare) rounds at one size."""
    ds, chunks = chunk_dataset(make_events(users, events_per_user), cfg.fm, blocks=16)
    embed = cfg.embed
    rounds, _ = alternating_rounds(ds, chunks, models, repeats, embed.num_actors, embed.batch_size,
                                   embed.actor_num_cpus, threads)
    ratios = [p["ratio"] for p in rounds]
    median = rounds[int(np.argsort(ratios)[(len(ratios) - 1) // 2])]
    ray, bare = median["ray"], median["bare"]
    point = {"users": users, "events": ray["events"], "ray_s": ray["seconds"], "bare_s": bare["seconds"],
             "ratio": median["ratio"], "ratio_steady": median["ratio_steady"],
             "to_first_call_s": ray["to_first_call_s"], "ratios": ratios}
    print("size:", point, flush=True)
    return point


def fit(points: list[dict], target: float) -> dict:
    """Affine fits of both paths and the events from which ray/bare >= target (None: never)."""
    events = np.array([p["events"] for p in points], dtype=float)
    ray_per, ray_fixed = np.polyfit(events, [p["ray_s"] for p in points], 1)
    bare_per, bare_fixed = np.polyfit(events, [p["bare_s"] for p in points], 1)
    # bare(E) / ray(E) >= target  <=>  E * (bare_per - target * ray_per) >= target * ray_fixed - bare_fixed
    slope, need = bare_per - target * ray_per, target * ray_fixed - bare_fixed
    break_even = max(0.0, need / slope) if slope > 0 else None
    return {"ray_fixed_s": round(float(ray_fixed), 3), "ray_per_million_s": round(float(ray_per) * 1e6, 3),
            "bare_fixed_s": round(float(bare_fixed), 3), "bare_per_million_s": round(float(bare_per) * 1e6, 3),
            "asymptotic_ratio": round(float(bare_per / ray_per), 3),
            "events_to_target": None if break_even is None else int(break_even)}


def plot(r: dict) -> None:
    points, f, target = r["points"], r["fit"], r["target"]
    fig, (ax,) = figure(1, width=6.5)
    events = np.array([p["events"] for p in points], dtype=float)
    ax.plot(events, [p["ratio"] for p in points], "o-", label="end to end (median round)")
    ax.plot(events, [p["ratio_steady"] for p in points], "s--", label="steady state (first call to last call)")
    grid = np.geomspace(events.min(), events.max(), 100)
    model = ((f["bare_fixed_s"] + f["bare_per_million_s"] * grid / 1e6)
             / (f["ray_fixed_s"] + f["ray_per_million_s"] * grid / 1e6))
    ax.plot(grid, model, color="grey", lw=1, label=f"affine fit (tends to {f['asymptotic_ratio']}x)")
    ax.axhline(target, color="red", ls=":", lw=1, label=f"target {target}x")
    ax.axvline(r["default_events"], color="black", ls=":", lw=1, label="default config's log")
    ax.set_xscale("log")
    ax.set_xlabel("events extracted")
    ax.set_ylabel("Ray / bare events/s")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"FM extraction at default settings, {r['device']} "
                 f"(load {r['load_avg_1m_start']}->{r['load_avg_1m_end']})",
                 fontsize=9)
    save_png(fig, "bench_extract_scale.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = LoopFMConfig()
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 2000, 4000, 10000, 20000, 40000])
    parser.add_argument("--events-per-user", type=int, default=d.data.synthetic.events_per_user)
    parser.add_argument("--repeats", type=int, default=2, help="alternating (Ray, bare) rounds per size")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--device-name", default=None)
    args = parser.parse_args()
    if len(set(args.users)) < 2:
        parser.error("--users needs at least two different sizes to fit")

    import ray

    device = device_name(args.device_name)
    info = {**machine(), **start_ray(args.num_cpus)}
    models = make_models(d.fm, CompressConfig(), EmbedConfig().layers)
    threads = probe_threads(d.embed.actor_num_cpus)["threads"] * d.embed.num_actors
    info["driver_warmup_s"] = warm_driver()
    points = [measure(users, args.events_per_user, d, models, threads, args.repeats)
              for users in sorted(set(args.users))]
    default_events = len(make_events(d.data.synthetic.num_users, args.events_per_user)["event_id"])
    result = {
        "benchmark": "extract_scale", "device": device, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "versions": versions(), "target": args.target, "default_events": default_events,
        "config": {"users": sorted(set(args.users)), "events_per_user_mean": args.events_per_user,
                   "fm": d.fm.model_dump(mode="json"), "embed": d.embed.model_dump(mode="json"),
                   "bare_threads": threads, "repeats": args.repeats},
        "points": points, "fit": fit(points, args.target), "date": time.strftime("%Y-%m-%d"),
    }
    write_result("extract_scale", result)
    f = result["fit"]
    reach = f"{f['events_to_target']:,} events" if f["events_to_target"] is not None else "never"
    append_row(
        result["date"], "extract vs events (Ray Data actors / bare loop)", f"{device}, Ray {result['versions']['ray']}",
        f"reaches {args.target}x from {reach} (default log: {default_events:,}); tends to {f['asymptotic_ratio']}x",
        "; ".join(f"{p['events']:,} events: {p['ratio']}x "
                  f"(steady {p['ratio_steady']}x, {p['to_first_call_s']}s to first call)"
                  for p in points)
        + f". Affine fit: Ray {f['ray_fixed_s']}s + {f['ray_per_million_s']}s/M events, bare {f['bare_fixed_s']}s + "
        f"{f['bare_per_million_s']}s/M events. "
        f"Default settings: {d.embed.num_actors} actor x {d.embed.actor_num_cpus} CPU, "
        f"batch {d.embed.batch_size}, bare at {threads} thread(s); "
        f"median of {args.repeats} alternating rounds per size. "
        f"Load avg {result['load_avg_1m_start']}->{result['load_avg_1m_end']}",
    )
    plot(result)
    ray.shutdown()


if __name__ == "__main__":
    main()
