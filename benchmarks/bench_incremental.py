"""Incremental embedding of a one-day increment against a full re-embed of the whole log.

A synthetic log of `--days` days (the real generator, validation and split) whose last day is
held back; the FM (one epoch: its quality does not change the cost) and the full store are built
on the rest; the day is appended with `logs append`. Then, in one run on one device:

* **incremental**: `embed --incremental` (reads the log's user and ts columns, then only the
  users with new events, their last receptive field of old events, one FM pass, the delta sealed);
* **full**: the same FM and compressor over every event of the grown log, written as parquet
  (`union_rows`: what a full re-embed costs, without re-training the compressor).

The ratio incremental / full seconds is set against the data ratio (new events / all events).

    RAY_AUTH_MODE=disabled python benchmarks/bench_incremental.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, append_row, device_name, machine, start_ray, versions, write_result  # noqa: E402

from loopfm.config import load_config  # noqa: E402
from loopfm.rundir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def grown_log(cfg, run: RunDir, scratch: Path) -> tuple[Path, int, int]:
    """Generate, hold the last day back, validate + split + FM + full store; returns (day file, old, new rows)."""
    from loopfm.datasets.ingest import validate_stage
    from loopfm.datasets.splits import split_stage
    from loopfm.datasets.synthetic import generate_stage
    from loopfm.fm.embed import embed_stage
    from loopfm.fm.train import fm_train_stage

    generate_stage(cfg, run)
    files = sorted(run.source.glob("*.parquet"))
    log = pa.concat_tables([pq.read_table(f) for f in files])
    cut = pc.max(log["ts"]).as_py() - 86_400
    for f in files:
        f.unlink()
    old = log.filter(pc.less_equal(log["ts"], cut))
    pq.write_table(old, run.source / "part-00000.parquet")
    day = scratch / "last_day.parquet"
    new = log.filter(pc.greater(log["ts"], cut))
    pq.write_table(new, day)
    validate_stage(cfg, run)
    split_stage(cfg, run)
    fm_train_stage(cfg, run)
    embed_stage(cfg, run)
    return day, old.num_rows, new.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--events-per-user", type=int, default=80)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-table", action="store_true")
    args = parser.parse_args()

    from loopfm.datasets.append import logs_append_stage
    from loopfm.fm.embed import embed_stage
    from loopfm.fm.incremental import union_rows

    cfg = load_config(None, [f"data.synthetic.num_users={args.users}", f"data.synthetic.num_days={args.days}",
                             f"data.synthetic.events_per_user={args.events_per_user}", "fm.epochs=1",
                             "fm.num_workers=0", "embed.compress.epochs=3", "embed.compress.sample_events=10000",
                             "ray.progress_bars=false"])  # FM and compressor quality do not change the costs timed
    ray_info = start_ray(None)
    load_start = machine()
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        scratch = Path(tmp)
        run = RunDir(scratch / "run")
        with Timer() as setup:
            day, old_rows, new_rows = grown_log(cfg, run, scratch)
            logs_append_stage(cfg, run, [str(day)], "parquet")
        rounds = []
        for k in range(args.rounds):  # alternate, so neither path alone pays Ray's cold worker start-up
            with Timer() as full:
                union_rows(cfg, run).write_parquet(str(scratch / f"full{k}"))
            with Timer() as inc:
                delta = embed_stage(cfg, run, incremental=True, since="last")
            full_rows = sum(pq.read_metadata(f).num_rows for f in (scratch / f"full{k}").glob("*.parquet"))
            assert delta.rows == new_rows and full_rows == old_rows + new_rows, (delta.rows, new_rows, full_rows)
            rounds.append({"full_s": round(full.seconds, 2), "incremental_s": round(inc.seconds, 2)})
            shutil.rmtree(run.root / "store_deltas")  # the next round embeds the same increment again
    full_s = min(r["full_s"] for r in rounds)
    inc_s = min(r["incremental_s"] for r in rounds)
    device = device_name(args.device)
    result = {
        "benchmark": "incremental", "device": device, "date": time.strftime("%Y-%m-%d"),
        "machine": {**load_start, "load_avg_1m_end": round(__import__("os").getloadavg()[0], 2)},
        "versions": versions(), "ray": ray_info,
        "config": {"users": args.users, "days": args.days, "events_per_user": args.events_per_user,
                   "fm": cfg.fm.model_dump(), "embed": cfg.embed.model_dump(mode="json")},
        "events": {"old": old_rows, "new": new_rows, "all": old_rows + new_rows},
        "seconds": {"setup": round(setup.seconds, 2), "incremental": inc_s, "full": full_s}, "rounds": rounds,
        "data_ratio": round(new_rows / (old_rows + new_rows), 4),
        "time_ratio": round(inc_s / full_s, 4),
    }
    write_result("incremental", result)
    if not args.no_table:
        append_row(result["date"], "incremental embed vs full re-embed", f"{device}, Ray {versions()['ray']}",
                   f"{inc_s:.1f}s vs {full_s:.1f}s: time ratio {result['time_ratio']:.3f}x "
                   f"at data ratio {result['data_ratio']:.3f}",
                   f"{args.days}-day synthetic log, {args.users} users; increment = the last day ({new_rows:,} of "
                   f"{old_rows + new_rows:,} events); same FM (d={cfg.fm.d_model}, {cfg.fm.n_layers} layers, "
                   f"receptive field {cfg.fm.context}) and compressor, {cfg.embed.num_actors} actor(s); "
                   f"full = one pass "
                   f"over every event written as parquet (no compressor training); "
                   f"best of {args.rounds} alternating rounds. Load avg "
                   f"{load_start['load_avg_1m_start']}->{result['machine']['load_avg_1m_end']}")


if __name__ == "__main__":
    main()
