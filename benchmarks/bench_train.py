"""VM training throughput: `train_vm` (Ray Train TorchTrainer over Ray Data shards) against a bare loop.

One run, one device, one feature set, for two arms: `loopfm` (the stored-embedding sequence,
attention pooling) and `base` (no sequence). The feature set is built by the real `features`
stage over splits and a store written straight into a scratch run directory (random ids, times
and z, as benchmarks/bench_features.py does; 3 surfaces, vertical 0). Measured per arm:

* **bare**: the feature splits read with pyarrow into memory (numpy columns, once, not timed),
  held by `ShardBatches` as a kept shard (decoded once, then per epoch a seeded permutation,
  batches gathered from the decoded rows), forward / backward / step of the model `train_vms`
  builds, with `vm_loss`, and the same evaluation as `train_vms`: valid every epoch, test once
  after the last (no checkpoint). Torch threads = what the Ray Train worker gets.
* **ray**: `loopfm.training.vm.train_vm` on the same features, the whole call timed (Ray Train
  start-up, Ray Data reads and streaming, evaluation, checkpoints; nothing subtracted);
  examples/s = train rows x epochs / seconds. `train_vm(timing_log=...)` has each worker's
  `LoopTimer` stamp its loop (worker start, set-up, per epoch: waiting on the batch iterator vs
  compute, evaluation, `report`; a few perf_counter calls per batch, one file line per epoch),
  which say where the Ray time goes. `--plain` adds a run without the stamps as a check.

Ratios (ray / bare): whole fit (both including evaluation each epoch); train epochs (the train
loops only); steady (train loops of epochs after the first, i.e. without Ray Data's per-dataset
start-up).

    RAY_AUTH_MODE=disabled python benchmarks/bench_train.py               # ~3-4 min on 2 cores
    python benchmarks/bench_train.py --fleet-seeds 2    # + the report's path: arms x seeds in one run
    python benchmarks/bench_train.py --users 6000 --epochs 4 --batch-size 1024

Results: benchmarks/results/train_<device>.json and a row in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timer,
    append_row,
    device_name,
    gpu,
    machine,
    probe_threads,
    start_ray,
    versions,
    write_log,
    write_result,
)

from loopfm.config import LoopFMConfig  # noqa: E402
from loopfm.datasets.schema import SPLITS  # noqa: E402
from loopfm.datasets.splits import SplitInfo  # noqa: E402
from loopfm.features.stage import features_stage  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402


def read_split(run: RunDir, features, split: str, with_seq: bool) -> dict[str, np.ndarray]:
    """One feature split in memory as numpy columns (what Ray Data would hand the collate fn)."""
    import pyarrow.dataset as pads

    from loopfm.features.reader import SEQ_Z

    dataset = pads.dataset(str(run.features(features.fingerprint) / split), format="parquet")
    columns = [n for n in dataset.schema.names if with_seq or n != SEQ_Z]
    table = dataset.to_table(columns=columns)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


# -- bare loop -------------------------------------------------------------------------------
def bare_run(cfg: LoopFMConfig, run: RunDir, features, threads: int) -> dict:
    """vms_loop's work without Ray: same model, loss, optimizer, collate, evaluation; data in memory."""
    from loopfm.evaluation.metrics import evaluate
    from loopfm.features.collate import VMBatchCollate
    from loopfm.precision import gpu_precision
    from loopfm.training.batches import HeldShard, ShardBatches
    from loopfm.training.checkpoint import build_from_manifest
    from loopfm.training.loop import seed_everything
    from loopfm.training.vm import TEST_BATCH, predict, seq_width, vm_fingerprint, vm_manifest, vm_optimizer, vm_step

    width = seq_width(cfg, features)
    with Timer() as load:
        data = {s: read_split(run, features, s, width is not None) for s in SPLITS}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = cfg.train
        seed_everything(t.seed)
        device = gpu_precision("cuda" if gpu() else "cpu")  # TF32 + bf16 autocast on CUDA, as vms_loop
        manifest = vm_manifest(cfg, vm_fingerprint(cfg, features), features, SplitInfo.load(run))
        model = build_from_manifest(manifest).to(device)  # the model train_vms builds for this config
        optimizer = vm_optimizer(model, t)  # the Ray path's optimizer, so both loops do the same work
        collate = VMBatchCollate(features, width, str(device), with_seq=width is not None, with_raw=t.use_rawseq)
        # the splits in memory as a kept shard (read already: no Ray), decoded once, batches gathered
        train = ShardBatches(None, collate, t.batch_size, keep=True, shuffle_seed=t.seed,
                             held=HeldShard(columns=data["train"]))
        scored = {"valid": ShardBatches(None, collate, t.batch_size, keep=True, held=HeldShard(columns=data["valid"])),
                  "test": ShardBatches(None, collate, TEST_BATCH, keep=True, held=HeldShard(columns=data["test"]))}
        n = len(data["train"]["label"])

        epochs, train_s, eval_s = [], 0.0, 0.0
        with Timer() as total:
            for epoch in range(t.epochs):
                model.train()
                with Timer() as tr:
                    losses = []
                    for batch in train.epoch(epoch):
                        losses.append(vm_step(model, optimizer, batch, t, device))  # vms_loop's own step
                with Timer() as ev:  # as train_vms: valid every epoch, test once (the driver, after the fit)
                    metrics = {}
                    for split in ("valid", "test") if epoch == t.epochs - 1 else ("valid",):
                        arrays = predict(model, scored[split].epoch())
                        metrics[split] = evaluate(arrays["label"], arrays["logit"], arrays["user"])
                train_s, eval_s = train_s + tr.seconds, eval_s + ev.seconds
                epochs.append({"epoch": epoch, "train_s": round(tr.seconds, 3), "eval_s": round(ev.seconds, 3),
                               "train_loss": round(float(np.mean(losses)), 5),
                               "valid_auc": round(metrics["valid"]["auc"], 5)})
        return {"threads": threads, "load_s": round(load.seconds, 3), "seconds": round(total.seconds, 3),
                "train_s": round(train_s, 3), "eval_s": round(eval_s, 3), "train_rows": n, "epochs": epochs,
                "examples_per_s": round(n * t.epochs / total.seconds),
                "train_examples_per_s": round(n * t.epochs / train_s)}
    finally:
        torch.set_num_threads(before)


# -- Ray path ---------------------------------------------------------------------------------
def ray_run(cfg: LoopFMConfig, run: RunDir, features, log_path: str | None = None) -> dict:
    """`train_vm` once, timed whole; with log_path, its workers' `LoopTimer` stamps broken down."""
    from loopfm.training.vm import train_vm

    try:
        started = time.time()
        with Timer() as t:
            manifest = train_vm(cfg, run, features, timing_log=log_path)
        ended = started + t.seconds
    finally:
        shutil.rmtree(run.root / "vm", ignore_errors=True)  # so the next run is not "current" ...
        shutil.rmtree(run.ray_storage, ignore_errors=True)  # ... nor resumed by Ray Train V2
    n = features.rows["train"]
    epochs = len(manifest.metrics["history"])
    out = {"seconds": round(t.seconds, 3), "epochs": epochs, "train_rows": n,
           "examples_per_s": round(n * epochs / t.seconds), "valid_auc": round(manifest.metrics["valid"]["auc"], 5)}
    if log_path is not None:
        out.update(breakdown(log_path, started, ended))
    return out


def breakdown(log_path: str, started: float, ended: float) -> dict:
    entries = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    setup = next(e for e in entries if e["kind"] == "setup")
    epochs = [e for e in entries if e["kind"] == "epoch"]
    train_s = sum(e["train_end"] - e["start"] for e in epochs)
    rows = sum(e["rows"] for e in epochs)
    return {
        "worker_threads": setup["threads"], "worker_omp_num_threads": setup["omp"],
        "startup_s": round(setup["start"] - started, 3),  # fit() call -> loop function starts in the worker
        "loop_setup_s": round(setup["end"] - setup["start"], 3),  # model, prepare_model, shards
        "train_s": round(train_s, 3),
        "train_wait_s": round(sum(e["wait_s"] for e in epochs), 3),  # blocked on the batch iterator
        "first_batch_s": [round(e["first_batch_s"], 3) for e in epochs],
        "train_compute_s": round(sum(e["compute_s"] for e in epochs), 3),
        "eval_s": round(sum(e["eval_end"] - e["train_end"] for e in epochs), 3),
        "report_s": round(sum(e["end"] - e["eval_end"] for e in epochs), 3),
        "teardown_s": round(ended - max(e["end"] for e in epochs), 3),  # last report -> train_vm returns
        "train_examples_per_s": round(rows / train_s),
        **({"steady_train_examples_per_s": round(sum(e["rows"] for e in epochs[1:])
                                                 / sum(e["train_end"] - e["start"] for e in epochs[1:]))}
           if len(epochs) > 1 else {}),
        "per_epoch": [{"epoch": e["epoch"], "train_s": round(e["train_end"] - e["start"], 3),
                       "wait_s": round(e["wait_s"], 3), "compute_s": round(e["compute_s"], 3),
                       "eval_s": round(e["eval_end"] - e["train_end"], 3),
                       "report_s": round(e["end"] - e["eval_end"], 3)}
                      for e in epochs],
    }


def collate_paths(cfg: LoopFMConfig, run: RunDir, features, threads: int, steps: int = 20) -> dict:
    """Per-batch decode (`VMBatchCollate.tensors` on each batch's rows) against decoding the split
    once and gathering each batch (`decode` + `take`, what `ShardBatches` does): seconds for one
    epoch of train batches each way, the one decode apart, and whether `steps` optimizer steps from
    the same seed give the same weights bit for bit."""
    from loopfm.datasets.splits import SplitInfo
    from loopfm.features.collate import VMBatchCollate
    from loopfm.training.checkpoint import build_from_manifest
    from loopfm.training.loop import seed_everything
    from loopfm.training.vm import seq_width, vm_fingerprint, vm_manifest, vm_optimizer, vm_step

    t, width = cfg.train, seq_width(cfg, features)
    data = read_split(run, features, "train", width is not None)
    collate = VMBatchCollate(features, width, "cpu", with_seq=width is not None, with_raw=t.use_rawseq)
    order = np.random.default_rng(t.seed).permutation(len(data["label"]))
    starts = range(0, len(order), t.batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with Timer() as per_batch:
            for start in starts:
                collate.tensors({k: v[order[start : start + t.batch_size]] for k, v in data.items()})
        with Timer() as once:
            decoded = collate.decode(data)
        with Timer() as gathered:
            for start in starts:
                collate.take(decoded, order[start : start + t.batch_size])
        manifest = vm_manifest(cfg, vm_fingerprint(cfg, features), features, SplitInfo.load(run))
        weights = []
        for batch_of in (lambda rows: collate.tensors({k: v[rows] for k, v in data.items()}),
                         lambda rows: collate.take(decoded, rows)):
            seed_everything(t.seed)
            model = build_from_manifest(manifest)
            optimizer = vm_optimizer(model, t)
            for start in list(starts)[:steps]:
                vm_step(model, optimizer, batch_of(order[start : start + t.batch_size]), t, torch.device("cpu"))
            weights.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(before)
    return {"batches": len(starts), "per_batch_decode_s": round(per_batch.seconds, 3),
            "decode_once_s": round(once.seconds, 3), "gather_s": round(gathered.seconds, 3),
            "ratio_per_epoch": round(per_batch.seconds / gathered.seconds, 2),
            "same_weights": all(torch.equal(a, b) for a, b in zip(*weights))}


def compare_arm(acfg: LoopFMConfig, run: RunDir, features, threads: int, plain: bool = False) -> dict:
    """One arm: the collate's two paths, the bare loop, then `train_vm` with its workers' stamps; their ratios."""
    from loopfm.training.vm import arm_of

    arm = arm_of(acfg.train)
    collate = collate_paths(acfg, run, features, threads)
    print(arm, "collate:", collate, flush=True)
    bare = bare_run(acfg, run, features, threads)
    print(arm, "bare:", bare, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_log_") as tmp:
        timed = ray_run(acfg, run, features, str(Path(tmp) / "loop.jsonl"))
    print(arm, "ray:", timed, flush=True)
    entry = {"collate": collate, "bare": bare, "ray": timed,
             "ratio_fit": round(timed["examples_per_s"] / bare["examples_per_s"], 3),
             "ratio_train_epochs": round(timed["train_examples_per_s"] / bare["train_examples_per_s"], 3)}
    later = [e["train_s"] for e in bare["epochs"][1:]]
    if later and "steady_train_examples_per_s" in timed:
        bare["steady_train_examples_per_s"] = round(bare["train_rows"] * len(later) / sum(later))
        entry["ratio_steady"] = round(timed["steady_train_examples_per_s"] / bare["steady_train_examples_per_s"], 3)
    if plain:
        entry["ray_plain"] = ray_run(acfg, run, features)
        print(arm, "ray (plain vms_loop):", entry["ray_plain"], flush=True)
    return entry


def fleet(cfg: LoopFMConfig, run: RunDir, features, threads: int, arms: list[str], seeds: int) -> dict:
    """The report's path: every arm x seed in one `train_vms` run, against one `train_vm` per VM and
    against the bare loops of the same VMs; Ray's share = 1 - bare seconds / wall seconds."""
    from loopfm.training.vm import arm_config, train_vm, train_vms

    cfgs = [arm_config(cfg, arm, seed) for seed in range(seeds) for arm in arms]
    bare_s = sum(bare_run(c, run, features, threads)["seconds"] for c in cfgs)

    def timed(fn):
        try:
            with Timer() as t:
                out = fn()
        finally:
            shutil.rmtree(run.root / "vm", ignore_errors=True)
            shutil.rmtree(run.ray_storage, ignore_errors=True)
        return round(t.seconds, 3), out

    one_s, alone = timed(lambda: [train_vm(c, run, features) for c in cfgs])
    fleet_s, together = timed(lambda: train_vms(cfgs, run, features))
    out = {"vms": len(cfgs), "bare_s": round(bare_s, 3), "one_per_fit_s": one_s, "fleet_s": fleet_s,
           "speedup_fleet": round(one_s / fleet_s, 3), "ray_share_one_per_fit": round(1 - bare_s / one_s, 3),
           "ray_share_fleet": round(1 - bare_s / fleet_s, 3),
           "same_weights": all(a.model_version == b.model_version for a, b in zip(alone, together))}
    print("fleet:", out, flush=True)
    return out


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--events-per-user", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default: the config's)")
    parser.add_argument("--arms", nargs="+", default=["loopfm", "base"])
    parser.add_argument("--data-cache", choices=["auto", "memory", "stream"], default=None,
                        help="train.data_cache (default: the config's)")
    parser.add_argument("--plain", action="store_true", help="also time train_vm with the unmodified vms_loop")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--fleet-seeds", type=int, default=0,
                        help="also time the report's path: --arms x this many seeds in one train_vms run "
                             "against one train_vm each and their bare loops (0: skip)")
    parser.add_argument("--device-name", default=None)
    args = parser.parse_args()

    import ray

    from loopfm.training.vm import arm_config, keep_shards

    overrides = {"ray.progress_bars": False, "ray.num_cpus": args.num_cpus, "train.epochs": args.epochs,
                 "train.num_workers": 1, "vm.pooling": "attention"}
    if args.batch_size:
        overrides["train.batch_size"] = args.batch_size
    if args.data_cache:
        overrides["train.data_cache"] = args.data_cache
    cfg = LoopFMConfig().updated(overrides)
    device = device_name(args.device_name)
    info = {**machine(), **start_ray(args.num_cpus)}
    worker = probe_threads(1)
    print("worker threads:", worker, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        run = RunDir(root)
        events = write_log(cfg, run, args.users, args.events_per_user)
        with Timer() as feat:
            features = features_stage(cfg, run)
        print(f"features: {features.rows} in {feat.seconds:.1f}s", flush=True)
        arms = {arm: compare_arm(arm_config(cfg, arm, 0), run, features, worker["threads"], args.plain)
                for arm in args.arms}
        result = {
            "benchmark": "train", "device": device, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2),
            "versions": versions(),
            "config": {"users": args.users, "events": events, "features_rows": features.rows,
                       "features_seconds": round(feat.seconds, 2),
                       "shards_kept": keep_shards(cfg.train.data_cache, run, features), "seq_len": features.seq_len,
                       "width": features.width, "dtype": features.dtype, "vm": cfg.vm.model_dump(mode="json"),
                       "train": cfg.train.model_dump(mode="json"), "ray_train_workers": 1, "cpus_per_worker": 1},
            "threads": {"driver_default": torch.get_num_threads(), "worker_probe": worker["threads"],
                        "worker_omp_num_threads": worker["omp"], "bare": worker["threads"]},
            "arms": arms, "date": time.strftime("%Y-%m-%d"),
        }
        if args.fleet_seeds:
            result["fleet"] = fleet(cfg, run, features, worker["threads"], args.arms, args.fleet_seeds)
        result["notes"] = notes(result)
        write_result("train", result)
        row(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


def notes(r: dict) -> str:
    parts = []
    for arm, e in r["arms"].items():
        text = (f"{arm}: whole fit {e['ray']['seconds']}s vs bare {e['bare']['seconds']}s "
                f"(ratio {e['ratio_fit']}x)")
        t = e["ray"]
        if "startup_s" in t:
            text += (f"; = start-up {t['startup_s']}s + loop set-up {t['loop_setup_s']}s + "
                     f"train {t['train_s']}s (of which waiting on Ray Data {t['train_wait_s']}s, first batch per epoch "
                     f"{t['first_batch_s']}s, compute {t['train_compute_s']}s) + eval {t['eval_s']}s + report "
                     f"{t['report_s']}s + teardown {t['teardown_s']}s; bare train {e['bare']['train_s']}s, eval "
                     f"{e['bare']['eval_s']}s; train-epochs ratio {e['ratio_train_epochs']}x"
                     + (f", steady (epochs after the first) {e['ratio_steady']}x" if "ratio_steady" in e else ""))
        if "collate" in e:
            c = e["collate"]
            text += (f"; collate per epoch ({c['batches']} batches): decoded per batch {c['per_batch_decode_s']}s vs "
                     f"gathered from the decoded split {c['gather_s']}s ({c['ratio_per_epoch']}x), after one decode "
                     f"of {c['decode_once_s']}s; same weights after 20 steps: {c['same_weights']}")
        parts.append(text)
    if "fleet" in r:
        f = r["fleet"]
        parts.append(f"{f['vms']} VMs (arms x seeds) in one train_vms run {f['fleet_s']}s vs one train_vm each "
                     f"{f['one_per_fit_s']}s ({f['speedup_fleet']}x) vs bare {f['bare_s']}s: Ray's share "
                     f"{f['ray_share_fleet']:.0%} (one per fit {f['ray_share_one_per_fit']:.0%}); same weights: "
                     f"{f['same_weights']}")
    return "; ".join(parts) + "."


def row(r: dict) -> None:
    c = r["config"]
    result = ", ".join(f"{arm} {e['ray']['examples_per_s']:,} vs {e['bare']['examples_per_s']:,} ex/s "
                       f"({e['ratio_fit']}x fit"
                       + f", {e['ratio_train_epochs']}x train epochs"
                       + (f", {e['ratio_steady']}x steady" if "ratio_steady" in e else "") + ")"
                       for arm, e in r["arms"].items())
    append_row(
        r["date"], "train (Ray Train vs bare loop)", f"{r['device']}, Ray {r['versions']['ray']}", result,
        f"{c['features_rows']['train']:,} train examples x {c['train']['epochs']} epochs, "
        f"batch {c['train']['batch_size']}, "
        f"VM {c['vm']['model']} {c['vm']['hidden']} pooling {c['vm']['pooling']}, L={c['seq_len']} width {c['width']} "
        f"{c['dtype']}, shards {'kept in worker memory after epoch 1' if c['shards_kept'] else 'streamed every epoch'} "
        f"(train.data_cache={c['train']['data_cache']}); "
        f"1 Train worker (1 CPU, {r['threads']['worker_probe']} torch thread) vs bare at "
        f"{r['threads']['bare']} thread, both scoring valid every epoch and test once; {r['notes']} "
        f"Load avg {r['load_avg_1m_start']}->{r['load_avg_1m_end']}",
    )


if __name__ == "__main__":
    main()
