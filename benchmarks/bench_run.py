"""`make run`'s Ray share: every stage of `loopfm run` timed, against the same work done bare.

Issue 22 asks how much of the default run's wall time Ray costs: the wall time of the stages minus
their bare compute, over the wall time. This harness runs the pipeline (`loopfm.pipeline.PIPELINE`,
each stage through its CLI entry point, as `loopfm run` does) into a scratch run directory, then
redoes each stage's work in this process without Ray, on the very data and models the Ray run
made:

* **fm train**: `fm_step` / `evaluate_fm` over the chunks in memory (`gpu_check.fm_bare`), for as
  many epochs as the real FM ran (it stops early), at the torch threads a Train worker gets.
* **embed**: the compressor's sample (`ChunkExtractor(mode="raw")` on the first train chunks), the
  compressor's training (`embed._train_compressor`), then `ChunkExtractor` itself over every chunk
  and one parquet file: the actor's own code, called in this process at the actor's threads.
* **features**: the stage's own row functions (`item_counters`, `event_rows`, `history_rows`,
  `store_rows`, `join_block`) over the whole log at once as one block sorted by user, one parquet
  file per split.
* **report**: `bench_train.bare_run` for every VM of the report (arm x seed), each for the epochs
  its Ray run trained, valid scored every epoch and test once, as `train_vms` does, at the threads
  of Train's local mode (the driver's).

Ray's share = 1 - sum(bare) / sum(wall) over those four stages. The data stages (generate,
validate, split) have no bare counterpart here and are listed apart; the report's own writing
(metrics, bootstrap CIs, plots) counts as Ray's, so the share is an upper bound.

    python benchmarks/bench_run.py                 # the default config: make run's work (~1 h on 2 cores)
    python benchmarks/bench_run.py --seeds 1       # one VM seed per arm
    python benchmarks/bench_run.py --config configs/smoke.yaml

Results: benchmarks/results/run_<device>.json and a row in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
import gpu_check  # noqa: E402
from common import Timer, append_row, batches_as_arrays, device_name, machine, probe_threads, versions, write_result  # noqa: E402

from loopfm.cli import COMMANDS  # noqa: E402
from loopfm.config import LoopFMConfig, load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402

WORK_STAGES = ("fm train", "embed", "features", "report")  # the stages with a bare counterpart


def ray_pipeline(cfg: LoopFMConfig, run: RunDir) -> dict[str, float]:
    """Each stage of `loopfm run`, timed: seconds by stage name."""
    from loopfm.pipeline import PIPELINE

    by_name = {c.name: c for c in COMMANDS}
    run.ensure()
    seconds = {}
    for name in PIPELINE:
        if name == "data generate" and cfg.data.source != "synthetic":
            continue
        with Timer() as t:
            by_name[name].load()(cfg, run)
        seconds[name] = round(t.seconds, 2)
        print(f"ray: {name} {t.seconds:.1f}s", flush=True)
    return seconds


def only_dir(parent: Path) -> Path:
    dirs = [p for p in parent.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
    if len(dirs) != 1:
        raise RuntimeError(f"expected one committed folder under {parent}, found {len(dirs)}")
    return dirs[0]


def chunk_arrays(cfg: LoopFMConfig, run: RunDir) -> dict[str, np.ndarray]:
    """The chunks `fm train` and `embed` read, in one dict of arrays (built through Ray, not timed)."""
    from loopfm.datasets.splits import SplitInfo
    from loopfm.fm.chunks import build_chunks
    from loopfm.fm.train import split_cutoffs
    from loopfm.ordering import ordered_data

    with ordered_data():
        return batches_as_arrays(build_chunks(run, cfg, split_cutoffs(SplitInfo.load(run))).materialize())


def bare_fm(cfg: LoopFMConfig, run: RunDir, chunks: dict, threads: int) -> dict:
    from loopfm.datasets.splits import SplitInfo
    from loopfm.fm.checkpoint import FMManifest
    from loopfm.fm.chunks import keep_chunks
    from loopfm.fm.train import TEST, TRAIN, VALID

    fm = FMManifest.read(only_dir(run.root / "fm"))
    epochs = len(fm.history)
    train, evaluation = keep_chunks(chunks, (TRAIN,)), keep_chunks(chunks, (VALID, TEST))
    out = gpu_check.fm_bare(cfg.updated({"fm.epochs": epochs}), train, evaluation, SplitInfo.load(run), threads)
    return {"seconds": out["seconds"], "epochs": epochs, "train_chunks": out["train_chunks"]}


def bare_embed(cfg: LoopFMConfig, run: RunDir, chunks: dict, threads: int, scratch: Path) -> dict:
    """The embed stage's compute in this process: sample pass, compressor training, extraction, write."""
    from loopfm.actors.extractor import ChunkExtractor
    from loopfm.fm.checkpoint import FMManifest
    from loopfm.fm.chunks import keep_chunks
    from loopfm.fm.embed import _train_compressor
    from loopfm.fm.extract import extractor_args
    from loopfm.fm.train import TRAIN
    from loopfm.logs import log

    fm_dir = only_dir(run.root / "fm")
    fm_args = extractor_args(fm_dir, FMManifest.read(fm_dir), cfg)
    size, n = cfg.embed.batch_size, len(chunks["user_id"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with Timer() as total:
            train = keep_chunks(chunks, (TRAIN,))
            raw = ChunkExtractor(**fm_args, mode="raw")
            n_chunks = math.ceil(cfg.embed.compress.sample_events / max(1, cfg.fm.chunk_len - cfg.fm.context))
            parts = [raw({k: v[s : min(s + size, n_chunks)] for k, v in train.items()})["e"]
                     for s in range(0, n_chunks, size)]
            sample = np.concatenate(parts)[: cfg.embed.compress.sample_events]
            with Timer() as fit:
                compressor, _ = _train_compressor(sample, cfg, log)
            extractor = ChunkExtractor(**fm_args, compressor=compressor, dtype=cfg.embed.compress.dtype)
            tables = [extractor({k: v[s : s + size] for k, v in chunks.items()}) for s in range(0, n, size)]
            table = pa.concat_tables(tables)
            pq.write_table(table, scratch / "store.parquet")
    finally:
        torch.set_num_threads(before)
    return {"seconds": round(total.seconds, 3), "compressor_s": round(fit.seconds, 3), "events": table.num_rows}


def bare_features(cfg: LoopFMConfig, run: RunDir, scratch: Path) -> dict:
    """The join's compute in this process: the stage's own row functions over the whole log as one
    block, one parquet file per split."""
    import pyarrow.compute as pc

    from loopfm.datasets.schema import SPLITS, SURFACE, USER_ID
    from loopfm.datasets.splits import SplitInfo, split_paths
    from loopfm.features import stage
    from loopfm.features.join import JoinSpec
    from loopfm.store import codec
    from loopfm.store.parquet import data_files
    from loopfm.store.schema import StoreManifest

    info = SplitInfo.load(run)
    vertical = cfg.data.one_vertical("the bench")
    store_dir = only_dir(run.root / "store")
    store = StoreManifest.read(store_dir)
    with Timer() as total:
        spec = JoinSpec.from_config(cfg.features, codec.bytes_per_row(store.width, store.dtype),
                                    prior=stage.vertical_label_rate(run, vertical))
        events = pa.concat_tables([pads.dataset(str(split_paths(run, s)), format="parquet").to_table()
                                   for s in SPLITS])
        events_schema = pads.dataset(str(split_paths(run, "train")), format="parquet").schema.remove_metadata()
        schema = stage.union_schema(events_schema)
        on_vertical = pc.equal(events[SURFACE], vertical)
        examples = stage.example_rows(events.filter(on_vertical), cfg.features.lag, schema, info.valid_start_ts,
                                      info.test_start_ts)
        history = stage.history_rows(events.filter(pc.invert(on_vertical)), schema)
        rows = stage.store_rows(pa.concat_tables([pq.read_table(f) for f in data_files(store_dir)]), schema)
        union = pa.concat_tables([examples, history, rows])
        union = union.take(pc.sort_indices(union[USER_ID]))
        out = stage.join_block(union, spec, events_schema.names, vertical)  # the whole log as one block
        for name in SPLITS:
            pq.write_table(out.filter(pc.equal(out[stage.SPLIT], name)), scratch / f"features-{name}.parquet")
    return {"seconds": round(total.seconds, 3), "examples": out.num_rows}


def bare_report(cfg: LoopFMConfig, run: RunDir, threads: int) -> dict:
    """Every VM of the report, bare, each for the epochs its Ray run trained."""
    from loopfm.features.reader import FeaturesManifest
    from loopfm.training.checkpoint import VMManifest

    features = FeaturesManifest.read(only_dir(run.root / "features"))
    vms = sorted((VMManifest.read(p.parent) for p in (run.root / "vm").rglob("manifest.json")),
                 key=lambda m: (m.seed, m.arm))
    per_vm, total = [], 0.0
    for m in vms:
        epochs = len(m.metrics["history"])
        vcfg = cfg.updated({"vm": m.vm, "train": {**m.train, "epochs": epochs}})
        out = bench_train.bare_run(vcfg, run, features, threads)
        total += out["seconds"]
        per_vm.append({"arm": m.arm, "seed": m.seed, "epochs": epochs, "bare_s": out["seconds"],
                       "ray_loop_s": m.metrics.get("seconds")})
        print(f"bare: vm {m.arm} seed {m.seed} ({epochs} epochs) {out['seconds']:.1f}s", flush=True)
    return {"seconds": round(total, 3), "vms": len(vms), "per_vm": per_vm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in default)")
    parser.add_argument("--seeds", type=int, default=None, help="experiment.seeds (default: the config's)")
    parser.add_argument("--keep", default=None,
                        help="keep the run directory here (default: a scratch folder); when it holds a finished Ray "
                             "pass (wall.json), only the bare pass runs")
    parser.add_argument("--device-name", default=None)
    args = parser.parse_args()

    import ray

    from loopfm.runtime import setup_logging

    setup_logging()
    cfg = load_config(args.config) if args.config else LoopFMConfig()
    cfg = cfg.updated({"ray.progress_bars": False, **({"experiment.seeds": args.seeds} if args.seeds else {})})
    load_start = os.getloadavg()[0]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_run_"))
    scratch = Path(tempfile.mkdtemp(prefix="bench_run_bare_"))
    try:
        run = RunDir(root)
        timed = root / "wall.json"
        if timed.is_file():
            wall, pipeline_s = json.loads(timed.read_text()), None
        else:
            with Timer() as whole:
                wall = ray_pipeline(cfg, run)
            pipeline_s = round(whole.seconds, 2)
            timed.write_text(json.dumps({**wall, "pipeline": pipeline_s}))
        pipeline_s = wall.pop("pipeline", pipeline_s)
        worker_threads = probe_threads(1)["threads"]  # an FM Train worker's and an extractor actor's
        driver_threads = torch.get_num_threads()  # Train's local mode: the report's VMs train in the driver
        chunks = chunk_arrays(cfg, run)
        bare = {"fm train": bare_fm(cfg, run, chunks, worker_threads),
                "embed": bare_embed(cfg, run, chunks, worker_threads, scratch),
                "features": bare_features(cfg, run, scratch)}
        for name in ("fm train", "embed", "features"):
            print(f"bare: {name} {bare[name]['seconds']:.1f}s", flush=True)
        bare["report"] = bare_report(cfg, run, driver_threads)
        wall_work = sum(wall[s] for s in WORK_STAGES)
        bare_work = sum(bare[s]["seconds"] for s in WORK_STAGES)
        result = {
            "benchmark": "run", "device": device_name(args.device_name), **machine(), "versions": versions(),
            "config": {"name": cfg.name, "seeds": cfg.experiment.seeds, "arms": list(cfg.experiment.arms),
                       "fm_epochs": cfg.fm.epochs, "vm_epochs": cfg.train.epochs,
                       "events": int(sum(pq.ParquetFile(f).metadata.num_rows
                                         for f in (run.root / "data" / "splits").rglob("*.parquet")))},
            "threads": {"worker": worker_threads, "driver": driver_threads},
            "wall_s": wall, "pipeline_s": pipeline_s, "bare": bare,
            "stages": {s: {"wall_s": wall[s], "bare_s": bare[s]["seconds"],
                           "ray_share": round(1 - bare[s]["seconds"] / wall[s], 3)} for s in WORK_STAGES},
            "data_stages_s": round(sum(v for k, v in wall.items() if k not in WORK_STAGES), 2),
            "ray_share": round(1 - bare_work / wall_work, 3),
            "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "date": time.strftime("%Y-%m-%d"),
        }
        write_result("run", result)
        row(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


def row(r: dict) -> None:
    stages = "; ".join(f"{s}: wall {v['wall_s']:.1f}s, bare {v['bare_s']:.1f}s (Ray {100 * v['ray_share']:.0f}%)"
                       for s, v in r["stages"].items())
    c = r["config"]
    append_row(
        r["date"], "run (make run's stages vs bare compute)", r["device"],
        f"pipeline {r['pipeline_s']:.0f}s; Ray's share of the work stages {100 * r['ray_share']:.0f}%",
        f"config {c['name']}, {c['events']:,} events, arms {'/'.join(c['arms'])} x {c['seeds']} seeds "
        f"({r['bare']['report']['vms']} VMs); {stages}; data stages {r['data_stages_s']:.0f}s (no bare counterpart); "
        f"threads: Train worker / actor {r['threads']['worker']}, driver (VMs, local mode) {r['threads']['driver']}. "
        f"Load avg {r['load_avg_1m'][0]}->{r['load_avg_1m'][1]}")


if __name__ == "__main__":
    main()
