"""Memory: peak of the feature join and of VM training against L and width; store bytes per event.

One run, one machine, one local Ray started by this process (so every Ray process, GCS, raylet,
task workers, Data actors, the Train controller and worker, is a descendant of it).

* **join and train against L and width**: for each (L, width) point, a scratch run gets splits and
  a store written straight from random events and z (`common.write_log`; what z says does not
  change what the join holds), then `features_stage` and `train_vm` (the `loopfm` arm, one epoch,
  one Train worker) run while `common.MemorySampler` polls /proc every 0.2 s: private memory
  (RssAnon) summed over the whole process tree, RSS summed, the largest single process's RSS, and
  /dev/shm in use (Ray's object store, which is shared memory, not in RssAnon). L is swept at the
  default width, width at the default L, after an untimed warm-up join (so the first point does
  not alone pay for starting the join's worker processes; every `train_vm` starts its own Train
  worker, which is part of what training costs). Reported per stage: the peak, the baseline just
  before the stage, and their difference; next to it what holding every sequence densely as float32 would take
  (examples x L x width x 4 bytes).
* **store bytes per event, int4 against fp16**: the real `embed_stage` (a random-init FM of the
  config's shape, the compressor fitted as usual) writes one store per dtype from the same splits;
  the parquet files on disk are summed and divided by the rows, and the z column's compressed size
  is read from the parquet metadata (against its raw size, `codec.bytes_per_row`).

    RAY_AUTH_MODE=disabled python benchmarks/bench_memory.py              # ~5 min on 2 cores
    loopfm bench memory -- --users 800 --seq-lens 8 32 --widths 16 32

Results: benchmarks/results/memory_<device>.json, a row in docs/BENCHMARKS.md, docs/bench_memory.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

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
    write_log,
    write_result,
    write_splits,
)

from loopfm.config import load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402

DEFAULTS = ["ray.progress_bars=false", "train.epochs=1", "train.num_workers=1", "fm.num_workers=0",
            "embed.compress.epochs=3", "embed.compress.sample_events=10000"]


def measured(fn):
    """(fn(), {before, peaks..., growth}) with the process tree polled while fn runs."""
    before, shm_before = memory_now()
    sampler = MemorySampler()
    sampler.start()
    with Timer() as t:
        out = fn()
    peaks = sampler.stop()
    return out, {"seconds": round(t.seconds, 2), "private_mib_before": round(before, 1),
                 "shm_mib_before": round(shm_before, 1), **peaks,
                 "private_mib_growth": round(peaks["private_mib_peak"] - before, 1)}


def join_and_train(base, users: int, events_per_user: int, seq_len: int, width: int, scratch: Path) -> dict:
    from loopfm.features.stage import features_stage
    from loopfm.training.vm import arm_config, train_vm

    prefixes = [w for w in base.embed.compress.prefix_widths if w < width] + [width]
    cfg = base.updated({"features.seq_len": seq_len, "embed.compress.width": width,
                        "embed.compress.prefix_widths": prefixes})
    root = Path(tempfile.mkdtemp(prefix=f"memory-L{seq_len}-w{width}-", dir=scratch))
    try:
        run = RunDir(root)
        events = write_log(cfg, run, users, events_per_user)
        load = round(os.getloadavg()[0], 2)
        features, join = measured(lambda: features_stage(cfg, run))
        examples = sum(features.rows.values())
        output = sum(f.stat().st_size for f in run.features(features.fingerprint).rglob("*.parquet"))
        _, train = measured(lambda: train_vm(arm_config(cfg, "loopfm", 0), run, features))
        point = {"seq_len": seq_len, "width": width, "dtype": cfg.embed.compress.dtype, "events": events,
                 "examples": examples, "train_rows": features.rows["train"],
                 "load_avg_1m": [load, round(os.getloadavg()[0], 2)],
                 "dense_sequences_mib": round(examples * seq_len * width * 4 / 2**20, 1),
                 "features_output_mib": round(output / 2**20, 1), "join": join, "train": train}
        print("point:", {k: v for k, v in point.items() if k not in ("join", "train")},
              "join", join["private_mib_peak"], "train", train["private_mib_peak"], flush=True)
        return point
    finally:
        shutil.rmtree(root, ignore_errors=True)


def base_warmup(cfg, users: int, events_per_user: int, scratch: Path) -> float:
    from loopfm.features.stage import features_stage

    root = Path(tempfile.mkdtemp(prefix="memory-warmup-", dir=scratch))
    try:
        run = RunDir(root)
        write_log(cfg, run, users, events_per_user)
        with Timer() as t:
            features_stage(cfg, run)
        return t.seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def store_bytes(base, users: int, events_per_user: int, dtypes: list[str], scratch: Path) -> list[dict]:
    """The real embed once per dtype (same splits, same FM); bytes on disk per stored event."""
    from loopfm.fm.embed import embed_stage
    from loopfm.store import codec

    root = Path(tempfile.mkdtemp(prefix="memory-store-", dir=scratch))
    out = []
    try:
        run = RunDir(root)
        write_splits(base, run, users, events_per_user)
        write_fm(base, run)
        for dtype in dtypes:
            cfg = base.updated({"embed.compress.dtype": dtype})
            with Timer() as t:
                store = embed_stage(cfg, run)
            files = sorted(run.store(store.store_version).glob("*.parquet"))
            size = sum(f.stat().st_size for f in files)
            z_compressed = z_raw = 0
            for f in files:
                meta = pq.read_metadata(f)
                for g in range(meta.num_row_groups):
                    for c in range(meta.num_columns):
                        col = meta.row_group(g).column(c)
                        if col.path_in_schema == "z":
                            z_compressed += col.total_compressed_size
                            z_raw += col.total_uncompressed_size
            width = cfg.embed.compress.width
            entry = {"dtype": dtype, "width": width, "rows": store.rows, "files": len(files), "bytes": size,
                     "bytes_per_event": round(size / store.rows, 2),
                     "z_bytes_per_event_on_disk": round(z_compressed / store.rows, 2),
                     "z_bytes_per_event_parquet_uncompressed": round(z_raw / store.rows, 2),
                     "z_bytes_per_event_raw": codec.bytes_per_row(width, dtype),
                     "other_columns_bytes_per_event": round((size - z_compressed) / store.rows, 2),
                     "embed_s": round(t.seconds, 2)}
            print("store:", entry, flush=True)
            out.append(entry)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def plot(r: dict) -> None:
    c, points = r["config"], r["points"]
    fig, (by_l, by_w, store) = figure(3, width=4.6)
    for ax, key, fixed, label in ((by_l, "seq_len", ("width", c["width"]), "L (stored embeddings per example)"),
                                  (by_w, "width", ("seq_len", c["seq_len"]), "width (z dimensions)")):
        pts = sorted((p for p in points if p[fixed[0]] == fixed[1]), key=lambda p: p[key])
        xs = [p[key] for p in pts]
        ax.plot(xs, [p["join"]["private_mib_growth"] for p in pts], "o-", label="join: private growth")
        ax.plot(xs, [p["train"]["private_mib_growth"] for p in pts], "s-", label="train: private growth")
        ax.plot(xs, [p["join"]["shm_mib_peak"] - p["join"]["shm_mib_before"] for p in pts], "o:",
                label="join: object store growth")
        ax.plot(xs, [p["train"]["largest_process_rss_mib"] for p in pts], "s--", label="train: largest process RSS")
        ax.plot(xs, [p["dense_sequences_mib"] for p in pts], "x:", color="grey", label="dense float32 sequences")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(f"{label}, {fixed[0]}={fixed[1]}")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    labels = [f"{s['dtype']} w{s['width']}" for s in r["store"]]
    xs = range(len(labels))
    z = [s["z_bytes_per_event_on_disk"] for s in r["store"]]
    other = [s["other_columns_bytes_per_event"] for s in r["store"]]
    store.bar(xs, z, label="z column")
    store.bar(xs, other, bottom=z, label="ids, ts, surface, logit")
    for x, s in zip(xs, r["store"]):
        store.annotate(f"{s['bytes_per_event']:.1f} B", (x, s["bytes_per_event"]), ha="center", va="bottom", fontsize=8)
    store.set_xticks(list(xs), labels)
    store.set_ylabel("store bytes per event on disk (parquet)")
    store.legend(fontsize=7)
    fig.suptitle(f"Memory, {r['device']}: {c['events']:,} events per point (load {r['load_avg_1m_start']}->"
                 f"{r['load_avg_1m_end']})", fontsize=9)
    save_png(fig, "bench_memory.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--events-per-user", type=int, default=100)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8, 32, 128], help="L swept at the config's width")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128], help="widths swept at the config's L")
    parser.add_argument("--store-users", type=int, default=600, help="users of the int4/fp16 store comparison")
    parser.add_argument("--dtypes", nargs="+", default=["int4", "fp16"])
    parser.add_argument("--warmup-users", type=int, default=50, help="untimed warm-up join (0: none)")
    parser.add_argument("--config", help="loopfm config; default: built-in")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--device-name", default=None)
    args = parser.parse_args()

    import ray

    cfg = load_config(args.config, [*DEFAULTS, f"ray.num_cpus={args.num_cpus}", *args.overrides])
    L, W = cfg.features.seq_len, cfg.embed.compress.width
    grid = sorted({(seq, W) for seq in args.seq_lens} | {(L, w) for w in args.widths})
    device = device_name(args.device_name)
    info = {**machine(), **start_ray(args.num_cpus)}
    scratch = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        if args.warmup_users:  # start the join's worker processes once, so the first point's growth is not theirs
            warm = base_warmup(cfg, args.warmup_users, args.events_per_user, scratch)
            print(f"warm-up join: {warm:.1f}s", flush=True)
        points = [join_and_train(cfg, args.users, args.events_per_user, seq, w, scratch) for seq, w in grid]
        store = store_bytes(cfg, args.store_users, args.events_per_user, args.dtypes, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "memory", "device": device, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "config": {"users": args.users, "events_per_user": args.events_per_user, "events": points[0]["events"],
                   "seq_len": L, "width": W, "seq_lens": sorted(args.seq_lens), "widths": sorted(args.widths),
                   "dtype": cfg.embed.compress.dtype, "store_users": args.store_users, "dtypes": args.dtypes,
                   "fm": cfg.fm.model_dump(mode="json"), "vm": cfg.vm.model_dump(mode="json"),
                   "train_epochs": cfg.train.epochs, "train_batch_size": cfg.train.batch_size,
                   "config_file": args.config, "overrides": [*DEFAULTS, *args.overrides], "sample_every_s": 0.2},
        "points": points, "store": store, "date": time.strftime("%Y-%m-%d"),
    }
    write_result("memory", result)
    row(result)
    plot(result)
    ray.shutdown()


def row(r: dict) -> None:
    c = r["config"]

    def line(p: dict) -> str:
        return (f"L={p['seq_len']} w={p['width']}: join +{p['join']['private_mib_growth']:.0f} MiB private "
                f"(+{p['join']['shm_mib_peak'] - p['join']['shm_mib_before']:.0f} object store), train "
                f"+{p['train']['private_mib_growth']:.0f} MiB "
                f"(worker {p['train']['largest_process_rss_mib']:.0f} MiB RSS)")

    store = ", ".join(f"{s['dtype']} w{s['width']} {s['bytes_per_event']} B/event (z {s['z_bytes_per_event_on_disk']} "
                      f"on disk, {s['z_bytes_per_event_raw']} raw)" for s in r["store"])
    append_row(
        r["date"], "memory (join and train vs L, width; store bytes)", f"{r['device']}, Ray {r['versions']['ray']}",
        f"store {store}",
        f"{c['events']:,} events per point; peaks of the whole process tree (driver + local Ray), growth over the "
        f"stage's start: " + "; ".join(line(p) for p in r["points"])
        + f". Store: real embed of {r['store'][0]['rows']:,} events, random-init FM d={c['fm']['d_model']}. "
        f"Load avg {r['load_avg_1m_start']}->{r['load_avg_1m_end']}",
    )


if __name__ == "__main__":
    main()
