"""FM extraction throughput: Ray Data actor pool (`ChunkExtractor`) against a bare PyTorch loop.

One run, one device, one data set; every size and setting defaults to the default config's
(`LoopFMConfig()`: its synthetic log, FM, `embed.batch_size`, `embed.num_actors`), which is what
the target "at default settings" is read against. Synthetic users (event counts uniform in
[n/2, 3n/2]) are cut into FM chunks as `build_chunks` cuts them (`chunk_users`: sort by user, then
`block_chunks` over each block), so the actors read embed's block layout, and the Dataset is
materialized before any clock starts (the user shuffle is not timed). The FM is a random-init
`CausalFM` (its weights go to the actors as `torch.save` bytes, as in `embed`), the compressor a
random-init `MatryoshkaAE`. Before any
clock, one trivial Ray Data execution warms the driver, as `embed`'s earlier passes have when it
extracts. Measured, in `--repeats` rounds whose order alternates (ray, bare / bare, ray), medians
reported, because this machine's speed drifts by +-10% over minutes:

* **ray**: `ds.map_batches(ChunkExtractor, **pool_args(N, num_cpus, num_gpus, B))` (exactly as
  `embed` runs it) then `.materialize()`; the clock covers the whole call,
  actor start-up included (end-to-end). The extractor is subclassed only to log wall-clock
  stamps of its constructor and of each call (one JSON line each), which split the wall time into
  start-up, calls (steady state) and the rest (scheduling, object store, batching).
* **bare**: the same FM + compressor in this process over the same chunk arrays in batches of
  B: tokens -> `fm.extract` -> output mask -> `ae.encode` -> `codec.encode` (the pyarrow
  table assembly of the store rows is left out). The clock covers building the models too.
  Torch threads are set to what one actor gets (Ray sets OMP_NUM_THREADS from the actor's
  `num_cpus`), so "1 actor vs bare" compares the same compute; a second bare run with 2x those
  threads is the fair partner of the 2-actor runs.
* **in-process**: `ChunkExtractor` itself called in this process (same threads, pyarrow table
  included), to tell the cost of the actor process from that of the extractor code.
* **sweep**: actors x batch size, one Ray pass each, with the same stamps.

FLOPs: FM forward over every position of every chunk (padding included, it is computed):
per layer 2*T*(4d^2 + 2*d*d_ff) in matmuls + 4*T^2*d in attention (masked SDPA computes the
full T x T), plus the head. Achieved FLOP/s = FM FLOPs / seconds; on a GPU also the fraction of
dense bf16 peak.

    RAY_AUTH_MODE=disabled python benchmarks/bench_extract.py            # ~4 min on 2 cores
    python benchmarks/bench_extract.py --users 40000 --repeats 1 --no-sweep   # 10x the events
    loopfm bench extract -- --sweep-actors 1 2 4                          # the same, through the CLI

Results: benchmarks/results/extract_<device>.json, a row in docs/BENCHMARKS.md and, with the sweep,
docs/bench_extract_sweep.png (events/s against actors, one line per batch size, and against batch
size, one line per actor count).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timer,
    append_row,
    device_name,
    figure,
    gpu,
    machine,
    peak_flops,
    probe_threads,
    save_png,
    start_ray,
    versions,
    write_result,
)

from loopfm.actors.extractor import ChunkExtractor, build_compressor, pool_args  # noqa: E402
from loopfm.config import CompressConfig, EmbedConfig, FMConfig, LoopFMConfig  # noqa: E402
from loopfm.fm.chunks import CHUNK_COLUMNS, TOKENS, block_chunks, chunk_users  # noqa: E402
from loopfm.precision import autocast, gpu_precision  # noqa: E402
from loopfm.store import codec  # noqa: E402

NUM_ITEMS, NUM_CATEGORIES, NUM_SURFACES = 20_000, 60, 3
HORIZON = 14 * 86_400  # seconds of synthetic log; valid from 70% of it, test from 85%


# -- data ------------------------------------------------------------------------------------
def make_events(users: int, events_per_user: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Event rows of `users` synthetic users (event counts uniform in [n/2, 3n/2]), the columns
    `build_chunks` reads from the splits."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(max(1, events_per_user // 2), events_per_user * 3 // 2 + 1, users)
    n = int(counts.sum())
    return {"event_id": np.arange(n, dtype=np.int64), "user_id": np.repeat(np.arange(users, dtype=np.int64), counts),
            "ts": rng.integers(0, HORIZON, n), "label": (rng.random(n) < 0.3).astype(np.int8),
            "surface": rng.integers(0, NUM_SURFACES, n).astype(np.int32),
            "item_id_idx": rng.integers(2, NUM_ITEMS + 2, n), "category_idx": rng.integers(2, NUM_CATEGORIES + 2, n)}


def chunk_dataset(events: dict[str, np.ndarray], fm: FMConfig, blocks: int) -> tuple[object, dict[str, np.ndarray]]:
    """The users' chunks made exactly as `build_chunks` makes them (sort by user, `block_chunks` per
    block), materialized, so the Ray pass reads embed's block layout; and the same chunks as one
    dict of arrays, in the same order, for the bare loop."""
    import ray

    tables = [pa.table({k: v[rows] for k, v in events.items()})
              for rows in np.array_split(np.arange(len(events["event_id"])), blocks)]
    ds = chunk_users(ray.data.from_arrow(tables), block_chunks, chunk_len=fm.chunk_len, context=fm.context,
                     valid_start=int(HORIZON * 0.7), test_start=int(HORIZON * 0.85)).materialize()
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return ds, {name: np.concatenate([p[name] for p in parts]) for name in (*CHUNK_COLUMNS, "user_id")}


# -- models ----------------------------------------------------------------------------------
def make_models(fm_cfg: FMConfig, compress: CompressConfig, layers: list[int], seed: int = 0) -> dict:
    """Random-init FM weights and a compressor spec, as `embed` hands them to `ChunkExtractor`."""
    from loopfm.models.autoencoder import MatryoshkaAE
    from loopfm.models.fm import CausalFM

    torch.manual_seed(seed)
    vocab = {"item_id": NUM_ITEMS + 2, "category": NUM_CATEGORIES + 2}
    fm = CausalFM(fm_cfg, vocab, NUM_SURFACES)
    raw = fm.layer_width(layers)
    ae = MatryoshkaAE(raw, compress)
    buf_fm, buf_ae = io.BytesIO(), io.BytesIO()
    torch.save(fm.state_dict(), buf_fm)
    torch.save(ae.state_dict(), buf_ae)
    return {
        "fm_weights": buf_fm.getvalue(),
        "fm_manifest": {"fm": fm_cfg.model_dump(mode="json"), "vocab_sizes": vocab, "num_surfaces": NUM_SURFACES},
        "layers": list(layers),
        "compressor": {"raw_width": raw, "compress": compress.model_dump(mode="json"), "weights": buf_ae.getvalue()},
        "dtype": compress.dtype,
    }


def fm_flops_per_chunk(cfg: FMConfig) -> float:
    d, T, L = cfg.d_model, cfg.chunk_len, cfg.n_layers
    matmul = L * 2 * T * (4 * d * d + 2 * d * cfg.d_ff) + 2 * T * d
    attention = L * 4 * T * T * d
    return float(matmul + attention)


def ae_flops_per_event(raw: int, compress: CompressConfig) -> float:
    return float(2 * (raw * compress.hidden + compress.hidden * compress.width))


# -- the two paths ---------------------------------------------------------------------------
def warm_driver() -> float:
    """One trivial Ray Data execution before any clock: a driver's first execution pays ~1.5 s of
    its own start-up (streaming executor, lazy imports) that `loopfm embed` has already paid when
    it extracts (it materializes the chunks and reads the compressor's sample first)."""
    import ray

    with Timer() as t:
        ray.data.range(1000, override_num_blocks=2).map_batches(lambda batch: batch).materialize()
    return round(t.seconds, 3)


class TimedExtractor(ChunkExtractor):
    """ChunkExtractor plus wall-clock stamps of its constructor and of every call (one JSON line each)."""

    def __init__(self, log_path: str, **kwargs):
        started = time.time()
        super().__init__(**kwargs)
        self.log_path = log_path
        self._log({"kind": "init", "start": started, "end": time.time(), "threads": torch.get_num_threads(),
                   "omp": os.environ.get("OMP_NUM_THREADS")})

    def __call__(self, batch):
        started = time.time()
        out = super().__call__(batch)
        self._log({"kind": "call", "start": started, "end": time.time(), "chunks": len(batch["user_id"]),
                   "events": out.num_rows, "threads": torch.get_num_threads()})
        return out

    def _log(self, entry: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")


def ray_pass(ds, models: dict, actors: int, batch_size: int, actor_cpus: float, log_path: str | None = None) -> dict:
    extractor = ChunkExtractor if log_path is None else TimedExtractor
    args = pool_args(actors, actor_cpus, (1 / actors) if gpu() else 0, batch_size)  # as `embed` runs it
    args["fn_constructor_kwargs"].update(models, **({"log_path": log_path} if log_path else {}))
    started = time.time()
    with Timer() as t:
        out = ds.map_batches(extractor, **args).materialize()
    rows = out.count()
    result = {"actors": actors, "batch_size": batch_size, "seconds": round(t.seconds, 3), "events": rows,
              "events_per_s": round(rows / t.seconds)}
    if log_path is not None:
        result.update(breakdown(log_path, started, started + t.seconds, actors))
    return result, out


def alternating_rounds(ds, chunks: dict[str, np.ndarray], models: dict, repeats: int, actors: int, batch_size: int,
                       actor_cpus: float, threads: int) -> tuple[list[dict], object]:
    """`repeats` rounds of (Ray pass, bare loop at `threads`), the order alternating so that this
    machine's drift over minutes lands on both sides. Returns the rounds, each with its end-to-end
    and steady ratios, and the last Ray pass's output (earlier ones are freed as it goes)."""
    rounds, out = [], None
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        for i in range(repeats):
            pair = {}
            for side in (("ray", "bare") if i % 2 == 0 else ("bare", "ray")):
                if side == "ray":
                    pair["ray"], out = ray_pass(ds, models, actors, batch_size, actor_cpus,
                                                str(Path(tmp) / f"round-{i}.jsonl"))
                else:
                    pair["bare"] = bare_pass(chunks, models, batch_size, threads)
            pair["ratio"] = round(pair["ray"]["events_per_s"] / pair["bare"]["events_per_s"], 3)
            pair["ratio_steady"] = round(pair["ray"]["steady_events_per_s"] / pair["bare"]["steady_events_per_s"], 3)
            print(f"round {i + 1}/{repeats}:", pair, flush=True)
            rounds.append(pair)
            if i < repeats - 1:
                out = None
    return rounds, out


def median_round(rounds: list[dict], side: str) -> dict:
    """The round whose `side` has the median events/s (a whole measured run, not a blend)."""
    ordered = sorted(rounds, key=lambda r: r[side]["events_per_s"])
    return ordered[(len(ordered) - 1) // 2][side]


def breakdown(log_path: str, started: float, ended: float, actors: int) -> dict:
    """Where the Ray wall time went, from the actors' own stamps."""
    entries = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    inits = [e for e in entries if e["kind"] == "init"]
    calls = [e for e in entries if e["kind"] == "call"]
    first, last = min(c["start"] for c in calls), max(c["end"] for c in calls)
    compute = sum(c["end"] - c["start"] for c in calls)
    events = sum(c["events"] for c in calls)
    wall = ended - started
    return {
        "actor_threads": sorted({e["threads"] for e in inits + calls}),
        "actor_omp_num_threads": sorted({str(e["omp"]) for e in inits}),
        "actor_init_s": round(max(e["end"] - e["start"] for e in inits), 3),
        "to_first_call_s": round(first - started, 3),
        "calls_s": round(last - first, 3), "after_last_call_s": round(ended - last, 3),
        "compute_in_calls_s": round(compute, 3), "calls": len(calls),
        "actor_busy_fraction": round(compute / (wall * actors), 3),
        "steady_events_per_s": round(events / (last - first)),
    }


def bare_pass(chunks: dict[str, np.ndarray], models: dict, batch_size: int, threads: int) -> dict:
    """The same work as ChunkExtractor in this process, without Ray (and without the pyarrow table)."""
    from loopfm.config import FMConfig as _FMConfig
    from loopfm.models.fm import CausalFM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = gpu_precision("cuda" if gpu() else "cpu")  # TF32 + bf16 autocast on CUDA, as the extractor
        n, events, checksum = len(chunks["user_id"]), 0, 0.0
        with Timer() as total:
            m = models["fm_manifest"]
            fm = CausalFM(_FMConfig.model_validate(m["fm"]), m["vocab_sizes"], m["num_surfaces"])
            fm.load_state_dict(torch.load(io.BytesIO(models["fm_weights"]), weights_only=True))
            fm.to(device).eval()
            ae = build_compressor(models["compressor"]).to(device).eval()
            with Timer() as loop, torch.no_grad():
                for start in range(0, n, batch_size):
                    batch = {k: v[start : start + batch_size] for k, v in chunks.items()}
                    tokens = {name: torch.as_tensor(batch[name], dtype=torch.long, device=device) for name in TOKENS}
                    with autocast(device):
                        logit, emb = fm.extract(tokens, models["layers"])
                    out = torch.as_tensor(batch["out"], device=device)
                    z = ae.encode(emb[out].float()).cpu().numpy()
                    encoded = codec.encode(z, models["dtype"])
                    logits = logit[out].float().cpu().numpy()
                    ids = batch["event_id"][batch["out"]]
                    events += len(ids)
                    checksum += float(logits.sum()) + float(encoded[:, 0].sum())
        return {"threads": threads, "batch_size": batch_size, "seconds": round(total.seconds, 3),
                "loop_seconds": round(loop.seconds, 3), "events": events, "events_per_s": round(events / total.seconds),
                "steady_events_per_s": round(events / loop.seconds), "checksum": checksum}
    finally:
        torch.set_num_threads(before)


def inprocess_pass(chunks: dict[str, np.ndarray], models: dict, batch_size: int, threads: int) -> dict:
    """ChunkExtractor itself called in this process (pyarrow table included): separates what the
    actor process costs from what the extractor's own code costs."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, events = len(chunks["user_id"]), 0
        with Timer() as total:
            extractor = ChunkExtractor(**models)
            for start in range(0, n, batch_size):
                events += extractor({k: v[start : start + batch_size] for k, v in chunks.items()}).num_rows
        return {"threads": threads, "batch_size": batch_size, "seconds": round(total.seconds, 3), "events": events,
                "events_per_s": round(events / total.seconds)}
    finally:
        torch.set_num_threads(before)


def ray_checksum(out, row_bytes: int) -> float:
    """Sum of fm_logit + first z byte over every row (compare with the bare loop's)."""
    import ray

    total = 0.0
    for ref in out.to_arrow_refs():
        table = ray.get(ref)
        if table.num_rows == 0:
            continue
        z = codec.binary_to_rows(table["z"], row_bytes)
        total += float(table["fm_logit"].to_numpy().sum()) + float(z[:, 0].sum())
    return total


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = LoopFMConfig()  # every default is the default config's: the target is "at default settings"
    parser.add_argument("--users", type=int, default=d.data.synthetic.num_users)
    parser.add_argument("--events-per-user", type=int, default=d.data.synthetic.events_per_user,
                        help="mean; each user uniform in [n/2, 3n/2]")
    parser.add_argument("--d-model", type=int, default=d.fm.d_model)
    parser.add_argument("--layers", type=int, default=d.fm.n_layers, help="FM blocks (n_layers)")
    parser.add_argument("--heads", type=int, default=d.fm.n_heads)
    parser.add_argument("--d-ff", type=int, default=d.fm.d_ff, help="FM feed-forward width")
    parser.add_argument("--chunk-len", type=int, default=d.fm.chunk_len)
    parser.add_argument("--window", type=int, default=d.fm.window)
    parser.add_argument("--batch-size", type=int, default=d.embed.batch_size, help="chunks per call (embed.batch_size)")
    parser.add_argument("--actors", type=int, default=d.embed.num_actors,
                        help="actors of the headline Ray run (embed.num_actors)")
    parser.add_argument("--actor-cpus", type=float, default=d.embed.actor_num_cpus,
                        help="num_cpus per actor (embed.actor_num_cpus)")
    parser.add_argument("--sweep-actors", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--sweep-batch", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (Ray pass, bare loop); medians reported")
    parser.add_argument("--blocks", type=int, default=16,
                        help="blocks of the event rows before the user sort (its reducers)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--device-name", default=None)
    parser.add_argument("--result-name", default="extract",
                        help="results file benchmarks/results/<name>_<device>.json (keep runs at other scales apart)")
    args = parser.parse_args()

    import ray

    fm_cfg = FMConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                      window=args.window, chunk_len=args.chunk_len)
    compress = CompressConfig()
    layers = EmbedConfig().layers  # which activations are stored (embed.layers default)
    device = device_name(args.device_name)
    info = {**machine(), **start_ray(args.num_cpus)}

    ds, chunks = chunk_dataset(make_events(args.users, args.events_per_user), fm_cfg, args.blocks)
    n_chunks, events = len(chunks["user_id"]), int(chunks["out"].sum())
    models = make_models(fm_cfg, compress, layers)
    flops_chunk = fm_flops_per_chunk(fm_cfg)
    fm_flops = flops_chunk * n_chunks
    peak = peak_flops()

    def rates(seconds: float) -> dict:
        achieved = fm_flops / seconds
        return {"fm_flop_per_s": float(f"{achieved:.4g}"),
                **({"fraction_of_peak_bf16": round(achieved / peak, 5)} if peak else {})}

    actor = probe_threads(args.actor_cpus)
    info["driver_warmup_s"] = warm_driver()
    print(f"data: {args.users} users, {n_chunks} chunks, {events} events; actor threads {actor}", flush=True)

    # Headline: alternating rounds of (Ray pass, bare loop at one actor's threads); medians reported.
    rounds, out = alternating_rounds(ds, chunks, models, args.repeats, args.actors, args.batch_size, args.actor_cpus,
                                     actor["threads"] * args.actors)
    for pair in rounds:
        for side in ("ray", "bare"):
            pair[side].update(rates(pair[side]["seconds"]))
    headline = median_round(rounds, "ray")
    bare = median_round(rounds, "bare")
    ray_sum = ray_checksum(out, codec.bytes_per_row(compress.width, compress.dtype))
    del out
    inprocess = inprocess_pass(chunks, models, args.batch_size, actor["threads"] * args.actors)
    print("ChunkExtractor in-process:", inprocess, flush=True)
    bare_all = None
    if actor["threads"] * args.actors < (os.cpu_count() or 1):
        bare_all = bare_pass(chunks, models, args.batch_size, os.cpu_count())
        bare_all.update(rates(bare_all["seconds"]))
        print("bare (all cores):", bare_all, flush=True)

    sweep = []
    if not args.no_sweep:
        with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
            for actors in args.sweep_actors:
                for batch_size in args.sweep_batch:
                    log_path = str(Path(tmp) / f"a{actors}-b{batch_size}.jsonl")
                    point, out = ray_pass(ds, models, actors, batch_size, args.actor_cpus, log_path)
                    del out
                    point.update(rates(point["seconds"]))
                    print("sweep:", point, flush=True)
                    sweep.append(point)

    same = abs(ray_sum - bare["checksum"]) <= 1e-3 * max(1.0, abs(bare["checksum"]))
    result = {
        "benchmark": "extract", "device": device, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "config": {"users": args.users, "events_per_user_mean": args.events_per_user, "chunks": n_chunks,
                   "events": events, "positions": n_chunks * fm_cfg.chunk_len, "fm": fm_cfg.model_dump(mode="json"),
                   "fm_context": fm_cfg.context, "layers": layers, "compress": compress.model_dump(mode="json"),
                   "batch_size": args.batch_size, "actors": args.actors, "actor_num_cpus": args.actor_cpus,
                   "event_blocks": args.blocks, "fm_flops_per_chunk": flops_chunk, "fm_flops_total": fm_flops,
                   "ae_flops_per_event": ae_flops_per_event(fm_cfg.d_model * len(layers), compress)},
        "threads": {"driver_default": torch.get_num_threads(), "actor": actor["threads"],
                    "actor_omp_num_threads": actor["omp"], "bare": bare["threads"],
                    **({"bare_all_cores": bare_all["threads"]} if bare_all else {})},
        "ray": headline, "bare": bare, "extractor_in_process": inprocess,
        **({"bare_all_cores": bare_all} if bare_all else {}),
        "rounds": rounds,
        "ratio_ray_over_bare": round(float(np.median([r["ratio"] for r in rounds])), 3),
        "ratio_ray_over_bare_steady": round(float(np.median([r["ratio_steady"] for r in rounds])), 3),
        "ratio_range": [min(r["ratio"] for r in rounds), max(r["ratio"] for r in rounds)],
        "outputs_match": same, "sweep": sweep,
        "date": time.strftime("%Y-%m-%d"),
    }
    two = [p for p in sweep if p["actors"] == 2]
    if bare_all and two:
        best = max(two, key=lambda p: p["events_per_s"])
        result["ratio_ray2_over_bare_all_cores"] = round(best["events_per_s"] / bare_all["events_per_s"], 3)
    result["notes"] = notes(result)
    write_result(args.result_name, result)
    row(result)
    if sweep:
        plot_sweep(result)
    ray.shutdown()


def plot_sweep(r: dict) -> None:
    """docs/bench_extract_sweep.png: events/s against actors (per batch size) and against batch size
    (per actor count)."""
    sweep, c = r["sweep"], r["config"]
    fig, (by_actors, by_batch) = figure(2)
    for batch in sorted({p["batch_size"] for p in sweep}):
        pts = sorted((p["actors"], p["events_per_s"]) for p in sweep if p["batch_size"] == batch)
        by_actors.plot(*zip(*pts), marker="o", label=f"batch {batch} chunks")
    for actors in sorted({p["actors"] for p in sweep}):
        pts = sorted((p["batch_size"], p["events_per_s"]) for p in sweep if p["actors"] == actors)
        by_batch.plot(*zip(*pts), marker="o", label=f"{actors} actor(s)")
    bare = r["bare"]["events_per_s"]
    for ax in (by_actors, by_batch):
        ax.axhline(bare, color="grey", ls="--", lw=1, label=f"bare loop, {r['bare']['threads']} thread(s)")
        ax.set_ylabel("events/s (end to end)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_actors.set_xlabel("actors (ActorPoolStrategy size)")
    by_actors.set_xticks(sorted({p["actors"] for p in sweep}))
    by_batch.set_xlabel("batch size (chunks per call)")
    by_batch.set_xscale("log", base=2)
    fm = c["fm"]
    fig.suptitle(f"FM extraction, {c['events']:,} events, FM d={fm['d_model']} x{fm['n_layers']} layers, "
                 f"{r['device']} (load {r['load_avg_1m_start']}->{r['load_avg_1m_end']})", fontsize=9)
    save_png(fig, "bench_extract_sweep.png")


def notes(r: dict) -> str:
    h, b = r["ray"], r["bare"]
    lo, hi = r["ratio_range"]
    text = (f"{h['actors']} actor(s) x {r['threads']['actor']} torch thread(s) vs bare at {b['threads']} thread(s), "
            f"batch {h['batch_size']}, median of {len(r['rounds'])} alternating rounds: ray/bare end-to-end "
            f"{r['ratio_ray_over_bare']}x (rounds {lo}-{hi}), steady-state (first call to last call vs the bare "
            f"loop without model build) {r['ratio_ray_over_bare_steady']}x")
    text += (f". Median Ray wall {h['seconds']}s = {h['to_first_call_s']}s to first call (actor constructor "
             f"{h['actor_init_s']}s) + {h['calls_s']}s of calls (actor busy {h['actor_busy_fraction']:.0%}) + "
             f"{h['after_last_call_s']}s after")
    text += (f". ChunkExtractor called in-process (pyarrow table included) "
             f"{r['extractor_in_process']['events_per_s']:,} "
             f"events/s vs bare loop {r['bare']['events_per_s']:,}")
    return text + "."


def row(r: dict) -> None:
    h, b, c = r["ray"], r["bare"], r["config"]
    fm = c["fm"]
    sweep = ", ".join(f"{p['actors']}a/b{p['batch_size']} {p['events_per_s']:,}" for p in r["sweep"]) or "not run"
    flops = f"FM {h['fm_flop_per_s'] / 1e9:.1f} GFLOP/s (ray) vs {b['fm_flop_per_s'] / 1e9:.1f} (bare)"
    if "fraction_of_peak_bf16" in h:
        flops += f", {h['fraction_of_peak_bf16']:.2%} of bf16 peak"
    extra = (f"; bare at {r['bare_all_cores']['threads']} threads {r['bare_all_cores']['events_per_s']:,} ev/s"
             if "bare_all_cores" in r else "")
    append_row(
        r["date"], "extract (Ray Data actors vs bare loop)", f"{r['device']}, Ray {r['versions']['ray']}",
        f"{h['events_per_s']:,} vs {b['events_per_s']:,} events/s (median runs), "
        f"median ratio of rounds {r['ratio_ray_over_bare']}x"
        + f" (steady {r['ratio_ray_over_bare_steady']}x)",
        f"{c['events']:,} events in {c['chunks']:,} chunks of {fm['chunk_len']}; "
        f"FM d={fm['d_model']} L={fm['n_layers']} "
        f"d_ff={fm['d_ff']}, int4 z width {c['compress']['width']}; "
        f"{h['actors']} actor x {r['threads']['actor']} thread vs bare "
        f"{b['threads']} thread, batch {c['batch_size']}; {flops}{extra}; sweep actors/batch events/s: {sweep}; "
        f"{r['notes']} Load avg {r['load_avg_1m_start']}->{r['load_avg_1m_end']}",
    )


if __name__ == "__main__":
    main()
