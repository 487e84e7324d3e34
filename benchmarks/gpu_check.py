"""The GPU figures of issue 22 in one run: extraction, FM training and VM training, Ray against bare.

`benchmarks/gpu_check.sh` runs it (under 8 minutes on one H100/H200); `--tiny` runs the same code
paths at a CPU size (a minute or two on 2 cores). Parts, each a Ray path against a bare PyTorch
loop in this process on the same data and device (GPU: bf16 autocast and TF32 on both sides,
`loopfm.precision`):

* **extract** at `configs/bench.yaml` scale (its FM, chunk length, `embed.batch_size`, actors;
  30,000 users x 200 events unless `--extract-users` says fewer): `bench_extract`'s alternating
  rounds of the `ChunkExtractor` actor pool (end to end, actor start included) and the bare loop,
  medians; FM FLOP/s as a fraction of the GPU's dense bf16 peak (datasheet) and of a measured
  8192^3 bf16 matmul, for the Ray pass end to end, inside its calls, the bare loop, and the FM
  forward alone (token tensors already on the GPU).
* **fm**: the real `fm_loop` through `run_trainer` (Ray Train, `fm.num_workers` workers, Ray Data
  shards) against the same model, `fm_step` and `evaluate_fm` over the same chunks in memory;
  the FM of the config, a smaller log (`--fm-users`), `--fm-epochs` epochs.
* **vm**: `bench_train.compare_arm` (`train_vm` against its bare loop) for the loopfm and base arms
  with the config's VM and training settings on a scratch feature set.

Writes `gpu_check_<device>.json` and `.md` (device name, versions, every figure) to `--out`
(default `$OUT`, else benchmarks/results) after every part, so a run cut short keeps what it has.

    benchmarks/gpu_check.sh                      # GPU, configs/bench.yaml
    benchmarks/gpu_check.sh --tiny --out /tmp/g  # CPU, tiny sizes, same code paths
"""

from __future__ import annotations

import argparse
import io
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
import bench_extract  # noqa: E402
import bench_train  # noqa: E402
from common import (  # noqa: E402
    Timer,
    batches_as_arrays,
    device_name,
    gpu,
    machine,
    peak_flops,
    probe_threads,
    versions,
    write_log,
    write_splits,
)

from loopfm.config import LoopFMConfig, load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = {  # the CPU size: every part's code path, in a minute or two on 2 cores
    "fm.d_model": 32, "fm.n_layers": 2, "fm.n_heads": 2, "fm.d_ff": 64, "fm.window": 8, "fm.chunk_len": 32,
    "fm.batch_size": 32, "fm.num_workers": 1, "embed.batch_size": 64, "embed.num_actors": 1,
    "train.batch_size": 512, "train.num_workers": 1,
}


# -- the device's own ceilings ----------------------------------------------------------------------
def matmul_ceiling(n: int = 8192, reps: int = 20) -> dict:
    """Median bf16 FLOP/s of an n^3 matmul on random data (CUDA events), the measured ceiling."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    seconds = float(np.median(times))
    return {"n": n, "seconds": round(seconds, 6), "flop_per_s": float(f"{2 * n**3 / seconds:.4g}")}


def fm_forward_only(chunks: dict, models: dict, batch_size: int) -> dict:
    """The FM forward alone over every chunk, token tensors already on the device: what the
    pipeline's FM kernels can reach (seconds, synchronized)."""
    from loopfm.config import FMConfig
    from loopfm.fm.chunks import TOKENS
    from loopfm.models.fm import CausalFM
    from loopfm.precision import autocast, gpu_precision

    device = gpu_precision("cuda" if gpu() else "cpu")
    m = models["fm_manifest"]
    fm = CausalFM(FMConfig.model_validate(m["fm"]), m["vocab_sizes"], m["num_surfaces"])
    fm.load_state_dict(torch.load(io.BytesIO(models["fm_weights"]), weights_only=True))
    fm.to(device).eval()
    n = len(chunks["user_id"])
    batches = [{k: torch.as_tensor(chunks[k][s : s + batch_size], dtype=torch.long, device=device) for k in TOKENS}
               for s in range(0, n, batch_size)]
    with torch.no_grad(), autocast(device):
        fm.extract(batches[0], models["layers"])  # warm-up: kernels picked, workspace allocated
        sync(device)
        with Timer() as t:
            for tokens in batches:
                fm.extract(tokens, models["layers"])
            sync(device)
    return {"seconds": round(t.seconds, 3), "chunks": n}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- part 1: extraction -------------------------------------------------------------------------------
def extract_part(cfg: LoopFMConfig, args) -> dict:
    fm_cfg, embed = cfg.fm, cfg.embed
    events_in = bench_extract.make_events(args.extract_users, args.events_per_user)
    with Timer() as build:
        ds, chunks = bench_extract.chunk_dataset(events_in, fm_cfg, args.blocks)
    del events_in
    n_chunks, events = len(chunks["user_id"]), int(chunks["out"].sum())
    models = bench_extract.make_models(fm_cfg, embed.compress, list(embed.layers))
    actor = probe_threads(embed.actor_num_cpus)
    bench_extract.warm_driver()
    print(f"extract: {n_chunks:,} chunks, {events:,} events (built in {build.seconds:.1f}s); actor threads {actor}",
          flush=True)
    warm = {k: v[: 2 * embed.batch_size] for k, v in chunks.items()}
    bench_extract.bare_pass(warm, models, embed.batch_size, actor["threads"])  # CUDA context, kernels: not timed
    threads = actor["threads"] * embed.num_actors
    rounds, out = bench_extract.alternating_rounds(ds, chunks, models, args.rounds, embed.num_actors,
                                                   embed.batch_size, embed.actor_num_cpus, threads)
    del out
    flops = bench_extract.fm_flops_per_chunk(fm_cfg) * n_chunks
    forward = fm_forward_only(chunks, models, embed.batch_size)
    ray, bare = bench_extract.median_round(rounds, "ray"), bench_extract.median_round(rounds, "bare")
    rates = {"ray_end_to_end": ray["seconds"], "ray_in_calls": ray["calls_s"], "bare_end_to_end": bare["seconds"],
             "bare_loop": bare["loop_seconds"], "fm_forward_only": forward["seconds"]}
    result = {
        "users": args.extract_users, "events_per_user_mean": args.events_per_user, "events": events,
        "chunks": n_chunks, "chunk_build_s": round(build.seconds, 2), "fm": fm_cfg.model_dump(mode="json"),
        "batch_size": embed.batch_size, "actors": embed.num_actors, "actor_num_cpus": embed.actor_num_cpus,
        "actor_threads": actor["threads"], "fm_flops_total": flops, "rounds": rounds, "ray": ray, "bare": bare,
        "fm_forward_only": forward,
        "ratio_ray_over_bare": round(float(np.median([r["ratio"] for r in rounds])), 3),
        "ratio_ray_over_bare_steady": round(float(np.median([r["ratio_steady"] for r in rounds])), 3),
        "fm_flop_per_s": {k: float(f"{flops / s:.4g}") for k, s in rates.items()},
    }
    peak, ceiling = peak_flops(), args.ceiling
    if peak:
        result["fraction_of_peak_bf16"] = {k: round(flops / s / peak, 4) for k, s in rates.items()}
    if ceiling:
        result["fraction_of_measured_matmul"] = {k: round(flops / s / ceiling, 4) for k, s in rates.items()}
    return result


# -- part 2: FM training ------------------------------------------------------------------------------
class ArrayShard:
    """A dataset shard's `iter_torch_batches` over chunk arrays in memory (the bare loop's data)."""

    def __init__(self, arrays: dict[str, np.ndarray], order=None):
        self.arrays, self.order = arrays, order

    def iter_torch_batches(self, batch_size: int, device, **_):
        n = len(next(iter(self.arrays.values())))
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size) if self.order is None else self.order[start : start + batch_size]
            yield {k: torch.as_tensor(v[rows], device=device) for k, v in self.arrays.items()}


def fm_bare(cfg: LoopFMConfig, train: dict, evaluation: dict, info, threads: int) -> dict:
    """fm_loop's work without Ray: the same model, optimizer, `fm_step` and `evaluate_fm`."""
    from loopfm.fm.train import evaluate_fm, fm_step
    from loopfm.models.fm import CausalFM
    from loopfm.precision import gpu_precision
    from loopfm.training.loop import seed_everything

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f = cfg.fm
        device = gpu_precision("cuda" if gpu() else "cpu")
        rng = np.random.default_rng(f.seed)
        n = len(train["label"])
        epochs = []
        with Timer() as total:
            seed_everything(f.seed)
            model = CausalFM(f, {k: info.vocab_sizes[k] for k in ("item_id", "category")}, info.num_surfaces).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=f.lr, weight_decay=f.weight_decay)
            for epoch in range(f.epochs):
                model.train()
                with Timer() as tr:
                    losses = [fm_step(model, optimizer, batch, device)
                              for batch in ArrayShard(train, rng.permutation(n)).iter_torch_batches(
                                  f.batch_size, device)]
                with Timer() as ev:
                    metrics = evaluate_fm(model, ArrayShard(evaluation), f.batch_size, device)
                epochs.append({"epoch": epoch, "train_s": round(tr.seconds, 3), "eval_s": round(ev.seconds, 3),
                               "train_loss": round(float(np.mean(losses)), 5),
                               "valid_auc": round(metrics["valid"]["auc"], 5)})
        train_s = sum(e["train_s"] for e in epochs)
        out = {"threads": threads, "seconds": round(total.seconds, 3), "train_s": round(train_s, 3),
               "eval_s": round(sum(e["eval_s"] for e in epochs), 3), "train_chunks": n, "epochs": epochs,
               "chunks_per_s": round(n * f.epochs / total.seconds), "train_chunks_per_s": round(n * f.epochs / train_s)}
        if len(epochs) > 1:
            out["steady_train_chunks_per_s"] = round(n * (len(epochs) - 1) / sum(e["train_s"] for e in epochs[1:]))
        return out
    finally:
        torch.set_num_threads(before)


def fm_part(cfg: LoopFMConfig, args) -> dict:
    from loopfm.datasets.splits import SplitInfo
    from loopfm.fm.chunks import build_chunks, keep_chunks
    from loopfm.fm.train import TEST, TRAIN, VALID, fm_loop, split_cutoffs
    from loopfm.ordering import ordered_data
    from loopfm.runtime import use_gpu
    from loopfm.training.loop import final_state, run_trainer

    cfg = cfg.updated({"fm.epochs": args.fm_epochs, "fm.patience": args.fm_epochs + 1})
    root = Path(tempfile.mkdtemp(prefix="gpu_check_fm_"))
    try:
        run = RunDir(root)
        write_splits(cfg, run, args.fm_users, args.events_per_user)
        info = SplitInfo.load(run)
        gpu_on = use_gpu(cfg.ray)
        log_path = str(root / "fm_loop.jsonl")
        with ordered_data():
            with Timer() as build:
                chunks = build_chunks(run, cfg, split_cutoffs(info)).materialize()
            datasets = {"train": chunks.map_batches(keep_chunks, batch_format="numpy", fn_args=((TRAIN,),)),
                        "eval": chunks.map_batches(keep_chunks, batch_format="numpy", fn_args=((VALID, TEST),))}
            arrays = batches_as_arrays(chunks)
            train, evaluation = keep_chunks(arrays, (TRAIN,)), keep_chunks(arrays, (VALID, TEST))
            threads = probe_threads(1)["threads"]
            bare = fm_bare(cfg, train, evaluation, info, threads)
            print("fm bare:", {k: v for k, v in bare.items() if k != "epochs"}, flush=True)
            started = time.time()
            with Timer() as fit:
                result = run_trainer(
                    fm_loop, {"fm": cfg.fm.model_dump(mode="json"),
                              "vocab_sizes": {k: info.vocab_sizes[k] for k in ("item_id", "category")},
                              "num_surfaces": info.num_surfaces, "use_gpu": gpu_on, "timing_log": log_path},
                    datasets, name="gpu-check-fm", storage=str(run.ray_storage), num_workers=cfg.fm.num_workers,
                    use_gpu=gpu_on)
            state = final_state(result)
        ray = {"seconds": round(fit.seconds, 3), "epochs": len(state["history"]),
               "chunks_per_s": round(len(train["label"]) * len(state["history"]) / fit.seconds),
               "valid_auc": round(state["stopper"]["best_metrics"]["valid"]["auc"], 5),
               **bench_train.breakdown(log_path, started, started + fit.seconds)}
        print("fm ray:", ray, flush=True)
        out = {"users": args.fm_users, "events": sum(info.rows.values()), "chunks": len(arrays["label"]),
               "train_chunks": len(train["label"]), "chunk_build_s": round(build.seconds, 2),
               "fm": cfg.fm.model_dump(mode="json"), "workers": cfg.fm.num_workers, "use_gpu": gpu_on,
               "bare": bare, "ray": ray,
               "ratio_fit": round(ray["chunks_per_s"] / bare["chunks_per_s"], 3),
               "ratio_train_epochs": round(ray["train_examples_per_s"] / bare["train_chunks_per_s"], 3)}
        if "steady_train_examples_per_s" in ray and "steady_train_chunks_per_s" in bare:
            out["ratio_steady"] = round(ray["steady_train_examples_per_s"] / bare["steady_train_chunks_per_s"], 3)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- part 3: VM training ------------------------------------------------------------------------------
def vm_part(cfg: LoopFMConfig, args) -> dict:
    from loopfm.features.stage import features_stage
    from loopfm.training.vm import arm_config

    cfg = cfg.updated({"train.epochs": args.vm_epochs, "vm.pooling": "attention"})
    root = Path(tempfile.mkdtemp(prefix="gpu_check_vm_"))
    try:
        run = RunDir(root)
        events = write_log(cfg, run, args.vm_users, args.events_per_user)
        with Timer() as feat:
            features = features_stage(cfg, run)
        print(f"vm features: {features.rows} in {feat.seconds:.1f}s", flush=True)
        threads = probe_threads(1)["threads"]
        arms = {arm: bench_train.compare_arm(arm_config(cfg, arm, 0), run, features, threads) for arm in args.arms}
        return {"users": args.vm_users, "events": events, "features_rows": features.rows,
                "features_s": round(feat.seconds, 2), "seq_len": features.seq_len, "width": features.width,
                "vm": cfg.vm.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"), "arms": arms}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- report -------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    lines = [f"# GPU check: {r['gpu_name'] or r['device']}", "",
             f"{r['date']}, {r['device']}, Ray {r['versions']['ray']}, torch {r['versions']['torch']}, "
             f"{r['machine']['cores']} cores; wall {r.get('wall_s', '?')} s; command `{r['command']}`", "",
             "| figure | value | details |", "|---|---|---|"]
    e = r["parts"].get("extract")
    if e and "error" not in e:
        frac = e.get("fraction_of_peak_bf16", {})
        lines += [
            f"| extraction Ray/bare, end to end | {e['ratio_ray_over_bare']}x "
            f"(steady {e['ratio_ray_over_bare_steady']}x) | "
            f"{e['events']:,} events, {e['chunks']:,} chunks of {e['fm']['chunk_len']}; "
            f"Ray {e['ray']['events_per_s']:,} vs bare "
            f"{e['bare']['events_per_s']:,} events/s; Ray wall {e['ray']['seconds']} s = "
            f"{e['ray']['to_first_call_s']} s to "
            f"first call + {e['ray']['calls_s']} s of calls |",
            "| extraction, fraction of bf16 peak | "
            + (f"{frac.get('ray_end_to_end', 0):.2%} (Ray, end to end)" if frac else "no GPU")
            + " | " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in e["fm_flop_per_s"].items())
            + ("; as fractions of peak: " + ", ".join(f"{k} {v:.2%}" for k, v in frac.items()) if frac else "")
            + ("; of the measured matmul: "
               + ", ".join(f"{k} {v:.2%}" for k, v in e["fraction_of_measured_matmul"].items())
               if "fraction_of_measured_matmul" in e else "") + " |",
        ]
    f = r["parts"].get("fm")
    if f and "error" not in f:
        lines.append(
            f"| FM training Ray/bare | {f['ratio_fit']}x fit, {f['ratio_train_epochs']}x train epochs"
            + (f", {f['ratio_steady']}x steady" if "ratio_steady" in f else "")
            + f" | {f['train_chunks']:,} train chunks x "
            f"{f['ray']['epochs']} epochs, FM d={f['fm']['d_model']} x{f['fm']['n_layers']}, "
            f"batch {f['fm']['batch_size']}, "
            f"{f['workers']} Train worker(s); fit {f['ray']['seconds']} s "
            f"(start-up {f['ray']['startup_s']} s, teardown "
            f"{f['ray']['teardown_s']} s) vs bare {f['bare']['seconds']} s |")
    v = r["parts"].get("vm")
    if v and "error" not in v:
        for arm, a in v["arms"].items():
            lines.append(
                f"| VM training Ray/bare ({arm}) | {a['ratio_fit']}x fit, {a['ratio_train_epochs']}x train epochs"
                + (f", {a['ratio_steady']}x steady" if "ratio_steady" in a else "")
                + f" | {v['features_rows']['train']:,} train "
                f"examples x {v['train']['epochs']} epochs, batch {v['train']['batch_size']}; "
                f"fit {a['ray']['seconds']} s "
                f"(start-up {a['ray'].get('startup_s')} s, teardown {a['ray'].get('teardown_s')} s) "
                f"vs bare {a['bare']['seconds']} s |")
    for name, part in r["parts"].items():
        if "error" in part:
            lines.append(f"| {name} | failed | {part['error']} |")
    for name in r.get("skipped", []):
        lines.append(f"| {name} | skipped | over the time budget |")
    return "\n".join(lines) + "\n"


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_check_{r['device']}.json").write_text(json.dumps(r, indent=2))
    (out / f"gpu_check_{r['device']}.md").write_text(markdown(r))


def start(cfg: LoopFMConfig) -> dict:
    """The local Ray as the stages start it; without the dashboard when its packages are missing."""
    import ray

    from loopfm.runtime import init_ray, setup_logging

    setup_logging()
    dashboard = True
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as err:
        dashboard = False
        print(f"dashboard packages missing ({err}): local Ray without the dashboard", flush=True)
    init_ray(cfg.ray.model_copy(update={"dashboard": dashboard}))
    resources = ray.cluster_resources()
    return {"ray_cpus": resources.get("CPU"), "ray_gpus": resources.get("GPU", 0), "dashboard": dashboard}


def preflight(r: dict) -> None:
    """Before a long run: a Ray worker holding a GPU share sees the GPU and imports loopfm's actors."""
    import ray

    @ray.remote(num_gpus=0.5)
    def probe() -> dict:
        import loopfm.actors.extractor  # noqa: F401  (what the extractor actors import)
        import loopfm.training.vm  # noqa: F401

        cuda = torch.cuda.is_available()
        x = torch.randn(1024, 1024, device="cuda" if cuda else "cpu")
        return {"cuda": cuda, "name": torch.cuda.get_device_name(0) if cuda else None,
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": ray.get_gpu_ids(),
                "matmul_ok": bool(torch.isfinite(x @ x).all())}

    r["preflight"] = ray.get(probe.options(num_gpus=0.5 if r["ray"]["ray_gpus"] else 0).remote(), timeout=300)
    print("preflight:", r["preflight"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    parser.add_argument("--tiny", action="store_true", help="CPU size: tiny FM and logs, one round (same code paths)")
    parser.add_argument("--parts", nargs="+", default=["extract", "fm", "vm"], choices=["extract", "fm", "vm"])
    parser.add_argument("--extract-users", type=int, default=None, help="default: the config's num_users")
    parser.add_argument("--events-per-user", type=int, default=None, help="default: the config's events_per_user")
    parser.add_argument("--rounds", type=int, default=2, help="extraction: alternating (Ray, bare) rounds")
    parser.add_argument("--blocks", type=int, default=32, help="extraction: event blocks before the user sort")
    parser.add_argument("--fm-users", type=int, default=4000)
    parser.add_argument("--fm-epochs", type=int, default=2)
    parser.add_argument("--vm-users", type=int, default=6000)
    parser.add_argument("--vm-epochs", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["loopfm", "base"])
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: the stages')")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip a part that starts later than this (default 450 s; --tiny: no limit)")
    parser.add_argument("--preflight", action="store_true", help="only start Ray, probe a GPU worker, time a matmul")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    started = time.time()
    cfg = LoopFMConfig() if args.tiny else load_config(args.config)
    overrides = {"ray.progress_bars": False, **(TINY if args.tiny else {})}
    if args.num_cpus:
        overrides["ray.num_cpus"] = args.num_cpus
    cfg = cfg.updated(overrides)
    s = cfg.data.synthetic
    if args.tiny:
        args.extract_users, args.events_per_user = args.extract_users or 150, args.events_per_user or 60
        args.fm_users, args.vm_users, args.rounds, args.blocks = min(args.fm_users, 150), min(args.vm_users, 300), 1, 4
        args.fm_epochs, args.vm_epochs = min(args.fm_epochs, 2), min(args.vm_epochs, 2)
    args.budget_s = args.budget_s or (float("inf") if args.tiny else 450.0)
    args.extract_users = args.extract_users or s.num_users
    args.events_per_user = args.events_per_user or s.events_per_user

    r = {"benchmark": "gpu_check", "device": device_name(),
         "gpu_name": torch.cuda.get_device_name(0) if gpu() else None,
         "date": time.strftime("%Y-%m-%d"), "command": " ".join(["benchmarks/gpu_check.sh", *sys.argv[1:]]),
         "config": args.config if not args.tiny else "tiny", "machine": machine(), "versions": versions(),
         "args": vars(args), "parts": {}, "skipped": []}
    r["ray"] = start(cfg)
    if gpu():
        r["matmul_bf16_8192"] = matmul_ceiling()
        args.ceiling = r["matmul_bf16_8192"]["flop_per_s"]
        r["peak_bf16_datasheet"] = peak_flops()
        print("bf16 matmul:", r["matmul_bf16_8192"], "datasheet peak:", r["peak_bf16_datasheet"], flush=True)
    else:
        args.ceiling = None
    out = Path(args.out)
    if args.preflight:
        preflight(r)
        args.parts = []
    for name, part in (("extract", extract_part), ("fm", fm_part), ("vm", vm_part)):
        if name not in args.parts:
            continue
        if time.time() - started > args.budget_s:
            r["skipped"].append(name)
            print(f"{name}: skipped, {time.time() - started:.0f}s into a {args.budget_s:.0f}s budget", flush=True)
            continue
        with Timer() as t:
            try:
                r["parts"][name] = part(cfg, args)
            except Exception as err:  # one part's failure leaves the others' figures
                import traceback

                traceback.print_exc()
                r["parts"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        r["parts"][name]["part_s"] = round(t.seconds, 1)
        r["wall_s"] = round(time.time() - started, 1)
        write(r, out)
        print(f"{name}: done in {t.seconds:.0f}s ({r['wall_s']:.0f}s so far)", flush=True)
    r["wall_s"] = round(time.time() - started, 1)
    write(r, out)
    print(markdown(r), flush=True)
    print(f"written: {out}/gpu_check_{r['device']}.json and .md", flush=True)
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
