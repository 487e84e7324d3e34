"""The soak: concurrent clients score for a bounded time while the loop runs under them.

A smoke run (the real generator, validation, split, FM, store, features and one VM of
`serve.arm`) whose last day is held back, served as `loopfm serve run` serves it (1 s refresh
interval). For `--duration` seconds `--clients` closed-loop HTTP clients (one thread each) post
`/v1/score` for users drawn from the log; every `--every` seconds one round of the loop lands under
them, in order:

1. a store delta: the next slice of the held-back day appended (`logs append`) and embedded
   (`embed --incremental`);
2. a refresh (`serve refresh`);
3. a reload that rolls the model to a new checkpoint (the served VM with every bias moved by 0.1 x
   the round: what a retrain writes; `serve reload`, a Serve rolling update).

Every answer names what scored it: `model_version`, `store_version`, `store_head` (the newest
store delta the features read) and `log_head` (the newest appended log batch). The soak counts
failed requests (a non-200 or a transport error), the states answers named, and answers that
disagree with the first answer to the same request under the same state (a mix of two models or
two store states would); latency percentiles per phase (steady, while a delta lands, while a
reload rolls).

    RAY_AUTH_MODE=disabled python benchmarks/soak.py
    python benchmarks/soak.py --clients 8 --duration 600 --every 60

Results: benchmarks/results/soak.json, the table benchmarks/results/soak.md, and a row in
docs/BENCHMARKS.md (`--no-table`: not). The suite's short version:
tests/test_serve_refresh.py::test_soak_a_delta_a_refresh_and_a_reload_under_load_fail_no_request.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import percentiles  # noqa: E402
from common import RESULTS, append_row, device_name, machine, start_ray, versions  # noqa: E402

from loopfm.config import LoopFMConfig, load_config  # noqa: E402
from loopfm.datasets.append import logs_append_stage  # noqa: E402
from loopfm.datasets.ingest import validate_stage  # noqa: E402
from loopfm.datasets.splits import split_stage  # noqa: E402
from loopfm.datasets.synthetic import generate_stage  # noqa: E402
from loopfm.features.stage import features_stage  # noqa: E402
from loopfm.fm.embed import embed_stage  # noqa: E402
from loopfm.fm.incremental import incremental_embed  # noqa: E402
from loopfm.fm.train import fm_train_stage  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402
from loopfm.runtime import free_port  # noqa: E402
from loopfm.serve_apps.bundle import latest_vm  # noqa: E402
from loopfm.serve_apps.stage import deploy, refresh, reload  # noqa: E402
from loopfm.training.checkpoint import VMManifest, save_vm  # noqa: E402
from loopfm.training.vm import arm_config, train_vm  # noqa: E402
from loopfm.weights import state_bytes, verified_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAY = 86_400


def held_back_run(cfg: LoopFMConfig, run: RunDir, scratch: Path, rounds: int) -> list[Path]:
    """The smoke pipeline on the log without its last day, up to one trained VM; returns the last
    day cut by time into `rounds` files, each newer than the one before (what `logs append` takes)."""
    generate_stage(cfg, run)
    files = sorted(run.source.glob("*.parquet"))
    log = pa.concat_tables([pq.read_table(f) for f in files])
    cut = pc.max(log["ts"]).as_py() - DAY
    for f in files:
        f.unlink()
    pq.write_table(log.filter(pc.less_equal(log["ts"], cut)), run.source / "part-00000.parquet")
    day = log.filter(pc.greater(log["ts"], cut)).sort_by("ts")
    edges = np.quantile(day["ts"].to_numpy(), np.linspace(0, 1, rounds + 1)[1:-1], method="higher")
    bounds = [cut, *edges.tolist(), pc.max(day["ts"]).as_py()]
    slices = []
    for k in range(rounds):
        part = day.filter(pc.and_(pc.greater(day["ts"], bounds[k]), pc.less_equal(day["ts"], bounds[k + 1])))
        slices.append(scratch / f"slice{k}.parquet")
        pq.write_table(part, slices[-1])
    validate_stage(cfg, run)
    split_stage(cfg, run)
    fm_train_stage(cfg, run)
    embed_stage(cfg, run)
    features = features_stage(cfg, run)
    train_vm(arm_config(cfg, cfg.serve.arm, cfg.serve.seed), run, features)
    return slices


def rolled_checkpoint(vm_dir: Path, k: int) -> Path:
    """A new checkpoint of the served arm and seed (every bias moved by 0.1 k): what a retrain writes."""
    manifest = VMManifest.read(vm_dir)
    state = verified_state(vm_dir, manifest.model_version)
    for key in [k for k in state if k.endswith("bias")]:
        state[key] = state[key] + 0.1 * k
    new = vm_dir.parent / f"seed{manifest.seed}-soak{k:04d}"
    new.mkdir()
    save_vm(new, state_bytes({name: torch.as_tensor(v) for name, v in state.items()}), manifest)
    return new


def request_bodies(run: RunDir, n: int, items: int, seed: int = 0) -> list[dict]:
    """n bodies for users drawn from the log (most have events in the held-back day, so their
    scores move with the deltas), `items` known items each; no `ts` (now: the whole history)."""
    rng = np.random.default_rng(seed)
    log = pads.dataset([str(f) for f in sorted(run.events.glob("*.parquet"))], format="parquet").to_table(
        columns=["user_id", "item_id"])
    users, known = np.unique(log["user_id"].to_numpy()), np.unique(log["item_id"].to_numpy())
    chosen = rng.choice(users, min(n, len(users)), replace=False)
    return [{"user_id": int(u), "items": [int(i) for i in rng.choice(known, items, replace=False)]} for u in chosen]


class Clients:
    """`n` closed-loop clients; each answer is recorded with its time, latency, body and state."""

    def __init__(self, base_url: str, bodies: list[dict], n: int):
        self.base_url, self.bodies = base_url, bodies
        self.answers: list[tuple] = []  # (t, seconds, body, status, state or error, logits)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._fire, args=(k,), daemon=True) for k in range(n)]

    def _fire(self, k: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self.stop.is_set():
                b, k = k % len(self.bodies), k + 1
                started = time.monotonic()
                try:
                    r = client.post("/v1/score", json=self.bodies[b])
                except Exception as exc:  # a dropped connection is a failed request
                    self.answers.append((started, time.monotonic() - started, b, -1, repr(exc), None))
                    continue
                seconds = time.monotonic() - started
                if r.status_code != 200:
                    self.answers.append((started, seconds, b, r.status_code, r.text[:300], None))
                    continue
                j = r.json()
                state = (j["model_version"], j["store_version"], j["store_head"], j["log_head"])
                self.answers.append((started, seconds, b, 200, state, np.array(j["logits"])))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def judge(answers: list[tuple], phases: list[tuple[str, float, float]]) -> dict:
    """Failures, states, disagreements within a (request, state) and latency per phase."""
    failed = [a for a in answers if a[3] != 200]
    first, disagree, states = {}, 0, {}
    for _, _, b, status, state, logits in answers:
        if status != 200:
            continue
        states[state] = states.get(state, 0) + 1
        seen = first.setdefault((b, state), logits)
        disagree += int(np.abs(logits - seen).max() > 1e-5)
    latency = {}
    for name in ("steady", "delta", "reload"):
        spans = [(s, e) for kind, s, e in phases if kind == name]
        inside = [a[1] for a in answers if a[3] == 200 and any(s <= a[0] <= e for s, e in spans)]
        if name == "steady":
            inside = [a[1] for a in answers if a[3] == 200
                      and not any(s <= a[0] <= e for kind, s, e in phases if kind != "steady")]
        latency[name] = {"requests": len(inside), **percentiles(inside)}
    return {"requests": len(answers), "failed": len(failed), "failures": [list(map(str, a[2:5])) for a in failed[:10]],
            "states": len(states), "answers_per_state": {"/".join(str(x) for x in k): v for k, v in states.items()},
            "disagreeing_answers": disagree, "latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=240.0, help="seconds the clients fire")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between rounds of the loop")
    parser.add_argument("--users", type=int, default=40, help="distinct request bodies")
    parser.add_argument("--items", type=int, default=20, help="candidate items per request")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-table", action="store_true")
    args = parser.parse_args()

    rounds = max(1, int(args.duration // args.every) - 1)
    ray_info = start_ray(args.num_cpus)
    scratch = Path(tempfile.mkdtemp(prefix="loopfm_soak_"))
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["ray.progress_bars=false", "fm.num_workers=0",
                                                         "serve.refresh_interval_s=1"])
    try:
        run = RunDir(scratch / "run")
        t0 = time.time()
        slices = held_back_run(cfg, run, scratch, rounds)
        setup_s = time.time() - t0
        bodies = request_bodies(run, args.users, args.items)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(cfg, run)
        phases, events = [], []
        with Clients(f"http://127.0.0.1:{port}", bodies, args.clients) as clients:
            started = time.monotonic()
            for k in range(rounds):
                time.sleep(max(0.0, started + (k + 1) * args.every - time.monotonic()))
                s = time.monotonic()
                logs_append_stage(cfg, run, [str(slices[k])], "parquet")
                delta = incremental_embed(cfg, run)
                state = refresh()
                phases.append(("delta", s, time.monotonic()))
                s = time.monotonic()
                rolled = rolled_checkpoint(latest_vm(run, cfg.serve.arm, cfg.serve.seed), k + 1)
                before, after = reload(cfg, run, rolled)
                phases.append(("reload", s, time.monotonic()))
                events.append({"round": k + 1, "delta_rows": delta.rows, "store_head": state["store_head"],
                               "delta_s": round(phases[-2][2] - phases[-2][1], 1),
                               "reload_s": round(phases[-1][2] - phases[-1][1], 1),
                               "model": f"{before.get('model_version')} -> {after.get('model_version')}"})
                print(f"soak: round {k + 1}: {events[-1]}", flush=True)
            time.sleep(max(0.0, started + args.duration - time.monotonic()))
            seconds = time.monotonic() - started
        serve.shutdown()
        verdict = judge(clients.answers, phases)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    device = device_name(args.device)
    result = {"benchmark": "soak", "device": device, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "versions": versions(), **ray_info, "config": {"clients": args.clients, "duration_s": args.duration,
                                                               "every_s": args.every, "users": args.users,
                                                               "items": args.items, "rounds": rounds},
              "setup_s": round(setup_s, 1), "seconds": round(seconds, 1), "rounds": events, **verdict,
              "requests_per_s": round(verdict["requests"] / seconds, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2))
    lat = verdict["latency"]
    table = ["| phase | requests | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    table += [f"| {name} | {lat[name]['requests']} | {lat[name].get('p50_ms', '-')} | {lat[name].get('p99_ms', '-')} | "
              f"{lat[name].get('max_ms', '-')} |" for name in ("steady", "delta", "reload")]
    summary = (f"{verdict['requests']} requests from {args.clients} clients in {seconds:.0f} s; {rounds} rounds of "
               f"delta + refresh + reload; {verdict['failed']} failed; {verdict['states']} model/store states; "
               f"{verdict['disagreeing_answers']} answers disagreeing with their state")
    (RESULTS / "soak.md").write_text(f"# Soak ({result['date']}, {device})\n\n{summary}\n\n" + "\n".join(table) + "\n")
    print(json.dumps(result, indent=2))
    if not args.no_table:
        append_row(result["date"], "soak", device, summary,
                   f"p99 steady / delta / reload: {lat['steady'].get('p99_ms')} / {lat['delta'].get('p99_ms')} / "
                   f"{lat['reload'].get('p99_ms')} ms; benchmarks/results/soak.json")


if __name__ == "__main__":
    main()
