"""Serving latency and throughput: the Ray Serve app over loopback HTTP against the VM in-process.

One run, one device, one VM, the same requests (100 candidate items each, `--items`):

* **in-process**: `FeatureTable.features` (the lookup) + `VMScorer.score` (the batch assembly,
  `decode_batch` and the forward) called directly in this process, one request at a time, 1 torch
  thread: the floor any serving stack adds to; with each stage timed on its own (body parse and
  validation, lookup, forward, answer JSON). Also one call with 32 requests batched, the
  throughput ceiling of one VM replica.
* **serve**: `loopfm.serve_apps` deployed as `loopfm serve run` does (`serve.*` config defaults: 1
  replica, max batch 32, wait 1 ms), for each topology of `--topology` (`fused`: one deployment
  parses, looks up and scores; `front`: an ingress ahead of the scoring deployment), on a free
  loopback port; for each `--concurrency` level, that many closed-loop clients (aiohttp, one event
  loop in this process, so the client shares the machine's cores with the server) post for
  `--duration` seconds after a warm-up. Per level: p50 / p90 / p99 / max latency, requests/s,
  candidates/s, errors (any non-200 or transport failure).
* **`--breakdown`**: where a request's time goes besides the stages above, at 1 client: a trivial
  FastAPI deployment answering a response of the same size (Serve's proxy, HTTP and ASGI: the floor
  of any Serve app), the same with one handle call to a trivial deployment (the cost of one more
  hop), and with a no-op `@serve.batch` call (the batcher's cost at 1 request in flight, at the
  1 ms wait and at 0).

The VM: by default a scratch run like bench_train.py's (random splits and store written directly,
3 surfaces, the default config's VM: dnn [128, 64], attention pooling, L=32, width 32 int4, one
epoch of the kd_loopfm arm; scores are meaningless, the shapes are the default's). `--run DIR`
benchmarks the newest `serve.arm` VM of an existing run instead (e.g. runs/default after `make run`).

    RAY_AUTH_MODE=disabled python benchmarks/bench_serve.py            # ~2-3 min on 2 cores
    python benchmarks/bench_serve.py --breakdown --topology fused,front
    python benchmarks/bench_serve.py --run runs/default --concurrency 1,8 --duration 30

Results: benchmarks/results/serve_<device>.json and a row in docs/BENCHMARKS.md (`--no-table`: not).
"""


import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, append_row, device_name, machine, start_ray, versions, write_log, write_result  # noqa: E402

from loopfm.config import LoopFMConfig, load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    if not len(ms):
        return {}
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def scratch_run(cfg: LoopFMConfig, root: Path, users: int, events_per_user: int) -> RunDir:
    """Splits + store written directly, then the real `features` and `train` stages (kd_loopfm, 1 epoch)."""
    from common import NUM_CATEGORIES, NUM_ITEMS

    from loopfm.datasets.vocab import Vocab
    from loopfm.features.stage import features_stage
    from loopfm.training.vm import arm_config, train_vm

    run = RunDir(root)
    write_log(cfg, run, users, events_per_user)
    (run.splits / "vocab").mkdir()  # write_log's indices are id + 2: the vocabularies of arange(n)
    for column, n in (("user_id", users), ("item_id", NUM_ITEMS), ("category", NUM_CATEGORIES)):
        Vocab(np.arange(n)).save(run.splits / "vocab" / f"{column}.npy")
    features = features_stage(cfg, run)
    train_vm(arm_config(cfg, cfg.serve.arm, cfg.serve.seed), run, features)
    return run


def make_requests(run: RunDir, table, n: int, items: int, seed: int = 0) -> list[dict]:
    """n request bodies: users drawn from the log (5% unknown: cold start), `items` random known items each."""
    rng = np.random.default_rng(seed)
    users = table.users.users if len(table.users) else np.arange(100)
    if table.with_seq:
        users = table.store_users.users
    catalog = table.catalog_items
    out = []
    for _ in range(n):
        user = int(rng.choice(users)) if rng.random() > 0.05 else int(10**12 + rng.integers(1_000_000))
        out.append({"user_id": user, "items": [int(i) for i in rng.choice(catalog, items)], "context": {}})
    return out


def in_process(bundle, bodies: list[dict], batch: int = 32) -> dict:
    """The lookup + VM called directly, one request at a time, each stage timed; then batched."""
    import torch

    from loopfm.serve_apps.lookup import FeatureTable
    from loopfm.serve_apps.model import VMScorer
    from loopfm.serve_apps.schemas import ScoreRequest

    torch.set_num_threads(1)
    table, scorer = FeatureTable(bundle), VMScorer(bundle)
    ScoreRequest.limit(1000, table.context_names, [bundle.features.vertical])
    raw = [json.dumps(b).encode() for b in bodies]
    for body in bodies[:20]:  # warm-up
        scorer.score([table.features(body["user_id"], body["items"], body["context"])])
    latencies, stages = [], {"parse": [], "lookup": [], "forward": [], "respond": []}
    with Timer() as total:
        for body in raw:
            t0 = time.perf_counter()
            req = ScoreRequest.model_validate(json.loads(body))
            t1 = time.perf_counter()
            features = table.features(req.user_id, req.items, req.context)
            t2 = time.perf_counter()
            out = scorer.score([features])[0]
            t3 = time.perf_counter()
            json.dumps({"scores": out["scores"].tolist(), "logits": out["logits"].tolist(),
                        "model_version": out["model_version"]}).encode()
            t4 = time.perf_counter()
            latencies.append(t4 - t0)
            for name, a, b in (("parse", t0, t1), ("lookup", t1, t2), ("forward", t2, t3), ("respond", t3, t4)):
                stages[name].append(b - a)
    with Timer() as batched:
        for k in range(0, len(bodies), batch):
            scorer.score([table.features(b["user_id"], b["items"], b["context"]) for b in bodies[k : k + batch]])
    return {"requests": len(bodies), **percentiles(latencies),
            "requests_per_s": round(len(bodies) / total.seconds, 1),
            "stages": {name: percentiles(v) for name, v in stages.items()},
            "batched_requests_per_s": round(len(bodies) / batched.seconds, 1), "batch": batch, "torch_threads": 1}


async def load(url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp

    latencies, errors, examples = [], 0, []
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup
    counter = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(session):
        nonlocal errors
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            body = bodies[next(counter) % len(bodies)]
            started = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
                    if not ok and len(examples) < 5:
                        examples.append(f"{r.status}: {(await r.text())[:200]}")
            except Exception as exc:  # transport failure: an error
                ok = False
                if len(examples) < 5:
                    examples.append(repr(exc))
            ended = time.perf_counter()
            if started >= measure_from:
                if ok:
                    latencies.append(ended - started)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    n = len(latencies)
    items = len(bodies[0]["items"])
    return {"concurrency": concurrency, "duration_s": duration, "requests": n, "errors": errors,
            "error_examples": examples, **percentiles(latencies),
            "requests_per_s": round(n / duration, 1), "candidates_per_s": round(n * items / duration)}


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_levels(cfg: LoopFMConfig, run: RunDir, bodies: list[dict], levels: list[int], duration: float,
                 warmup: float) -> dict:
    from ray import serve

    from loopfm.serve_apps.stage import deploy

    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with Timer() as up:
            args = deploy(cfg, run)
        url = f"http://127.0.0.1:{port}/v1/score"
        results = [asyncio.run(load(url, bodies, c, duration, warmup)) for c in levels]
    finally:
        serve.shutdown()
    return {"topology": cfg.serve.topology, "deploy_s": round(up.seconds, 2), "app_args": args, "levels": results}


def serve_floor(bodies: list[dict], answer: bytes, duration: float, warmup: float, most: int = 1) -> dict:
    """A trivial FastAPI deployment that reads the body and answers `answer` (the size of a real
    answer): alone (Serve's own cost per request), with one handle call to a trivial deployment
    (one hop more), and with a no-op `@serve.batch` call at 1 ms and at 0 wait (the batcher's cost
    when one request is in flight); all at 1 client. The trivial app alone also at `most` clients:
    the most requests/s Serve's proxy and the client reach on this machine with no model at all."""
    from ray import serve

    app = FastAPI()

    @serve.deployment(name="Echo")
    class Echo:
        async def __call__(self, x):
            return x

    @serve.deployment(name="Floor", max_ongoing_requests=256)  # as the app's own (Serve's default, 5, queues at c=16)
    @serve.ingress(app)
    class Floor:
        def __init__(self, inner=None, batch_wait_s=None):
            self.inner, self.batched = inner, batch_wait_s is not None
            if self.batched:
                self.noop.set_batch_wait_timeout_s(batch_wait_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
        async def noop(self, xs):
            return xs

        @app.post("/v1/score")
        async def score(self, request: Request):
            await request.body()
            if self.inner is not None:
                await self.inner.remote(1)
            if self.batched:
                await self.noop(1)
            return Response(answer, media_type="application/json")

    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/score"
    out = {}
    try:
        for name, app_ in (("http_floor", Floor.bind()), ("plus_one_hop", Floor.bind(Echo.bind())),
                           ("plus_batch_wait_1ms", Floor.bind(batch_wait_s=0.001)),
                           ("plus_batch_wait_0", Floor.bind(batch_wait_s=0.0))):
            serve.run(app_, name="floor", route_prefix="/")
            out[name] = asyncio.run(load(url, bodies, 1, duration, warmup))
            if name == "http_floor" and most > 1:
                out[f"http_floor_c{most}"] = asyncio.run(load(url, bodies, most, duration, warmup))
            serve.delete("floor")
    finally:
        serve.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="an existing run directory (default: a scratch run)")
    parser.add_argument("--config", help="config of --run (default: the run's config.yaml, else built-in defaults)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--events-per-user", type=int, default=60)
    parser.add_argument("--items", type=int, default=100, help="candidates per request")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop clients per level")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    parser.add_argument("--device", default=None, help="device label (default: cpu-<cores>core or the GPU)")
    parser.add_argument("--topology", default=None, help="comma-separated serve.topology values to measure "
                        "one after the other (default: the config's)")
    parser.add_argument("--breakdown", action="store_true", help="also Serve's floor (trivial app, 1 client), one "
                        "extra hop, and @serve.batch's own cost")
    parser.add_argument("--no-table", action="store_true", help="do not append a row to docs/BENCHMARKS.md")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. serve.max_batch_size=16")
    a = parser.parse_args()

    from loopfm.serve_apps.bundle import Bundle, latest_vm
    from loopfm.serve_apps.lookup import FeatureTable

    load_start = os.getloadavg()[0]
    ray_info = start_ray(a.num_cpus)
    scratch = None
    if a.run:
        run = RunDir(a.run)
        config = a.config or (run.config_path if run.config_path.is_file() else None)
        cfg = load_config(config, ["ray.progress_bars=false", *a.overrides])
    else:
        cfg = LoopFMConfig().updated({"ray.progress_bars": False, "train.epochs": 1, "train.num_workers": 0})
        from loopfm.config import parse_override

        cfg = cfg.updated(dict(parse_override(o) for o in a.overrides)) if a.overrides else cfg
        scratch = Path(tempfile.mkdtemp(prefix="bench_serve_"))
        with Timer() as build:
            run = scratch_run(cfg, scratch / "run", a.users, a.events_per_user)
        print(f"scratch run built in {build.seconds:.1f}s")
    try:
        vm_dir = latest_vm(run, cfg.serve.arm, cfg.serve.seed)
        bundle = Bundle.open(run.root, vm_dir)
        table = FeatureTable(bundle)
        bodies = make_requests(run, table, 2000, a.items)
        cold = sum(1 for b in bodies if b["user_id"] >= 10**12)
        inproc = in_process(bundle, bodies[:500])
        levels = [int(c) for c in a.concurrency.split(",")]
        topologies = a.topology.split(",") if a.topology else [cfg.serve.topology]
        served = [serve_levels(cfg.updated({"serve.topology": t}), run, bodies, levels, a.duration, a.warmup)
                  for t in topologies]
        breakdown = None
        if a.breakdown:
            answer = json.dumps({"scores": [0.123456789] * a.items, "logits": [-1.23456789] * a.items,
                                 "model_version": "0" * 16}).encode()
            breakdown = serve_floor(bodies, answer, min(a.duration, 10.0), a.warmup, max(levels))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    vm = bundle.vm
    result = {
        "benchmark": "serve", "device": device_name(a.device), **machine(), **ray_info,
        "load_avg_1m_end": round(os.getloadavg()[0], 2), "versions": versions(),
        "config": {"run": "scratch" if scratch else str(run.root), "users": a.users if scratch else None,
                   "events_per_user": a.events_per_user if scratch else None, "items_per_request": a.items,
                   "cold_start_share": round(cold / len(bodies), 3), "serve": cfg.serve.model_dump(mode="json"),
                   "vm": vm.vm, "arm": vm.arm, "seq_len": vm.seq_len, "seq_width": vm.seq_width,
                   "raw_seq_len": vm.raw_seq_len, "store_rows": table.store_rows, "dtype": bundle.features.dtype,
                   "duration_s": a.duration, "warmup_s": a.warmup, "client": "aiohttp, 1 event loop, same machine"},
        "in_process": inproc,
        "serve": served,
        "breakdown": breakdown,
    }
    result["load_avg_1m_start"] = round(load_start, 2)
    write_result("serve", result)
    if not a.no_table:
        append_row(time.strftime("%Y-%m-%d"), "serve (HTTP vs in-process)",
                   f"{result['device']}, Ray {versions()['ray']}",
                   table_result(result), table_details(result))


def table_result(r: dict) -> str:
    out = []
    for served in r["serve"]:
        parts = [f"c={lv['concurrency']}: p50 {lv.get('p50_ms')} / p99 {lv.get('p99_ms')} ms, "
                 f"{lv['requests_per_s']} req/s, {lv['errors']} errors" for lv in served["levels"]]
        out.append(f"{served['topology']}: " + "; ".join(parts))
    ip = r["in_process"]
    return "; ".join(out) + f" (in-process: p50 {ip['p50_ms']} / p99 {ip['p99_ms']} ms, {ip['requests_per_s']} req/s)"


def table_details(r: dict) -> str:
    c, s = r["config"], r["config"]["serve"]
    stages = ", ".join(f"{k} {v['p50_ms']}" for k, v in r["in_process"]["stages"].items())
    floor = ""
    if r.get("breakdown"):
        b = r["breakdown"]
        floor = (f"; Serve floor at c=1 (trivial app, same answer size) p50 {b['http_floor']['p50_ms']} ms, "
                 f"with one handle hop {b['plus_one_hop']['p50_ms']} ms, with a no-op @serve.batch call "
                 f"{b['plus_batch_wait_1ms']['p50_ms']} ms (wait 1 ms) / {b['plus_batch_wait_0']['p50_ms']} ms "
                 f"(wait 0)")
        most = [k for k in b if k.startswith("http_floor_c")]
        floor += "".join(f"; trivial app at c={k.removeprefix('http_floor_c')}: {b[k]['requests_per_s']} req/s, "
                         f"p50 {b[k]['p50_ms']} ms" for k in most)
    return (f"{c['items_per_request']} candidates/request, {c['duration_s']:g}s per level; VM {c['vm']['model']} "
            f"{c['vm']['hidden']} pooling {c['vm']['pooling']}, L={c['seq_len']} width {c['seq_width']} {c['dtype']}, "
            f"{c['store_rows']:,} store rows ({c['run']} run); Serve: {s['replicas']} replica per deployment, "
            f"max batch {s['max_batch_size']}, wait {s['batch_wait_timeout_s']}s; in-process stages p50 ms: {stages}; "
            f"in-process batched (32 requests per forward) {r['in_process']['batched_requests_per_s']} req/s{floor}; "
            f"client on the same cores; load avg {r['load_avg_1m_start']}->{r['load_avg_1m_end']}")


if __name__ == "__main__":
    main()
