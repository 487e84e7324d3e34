"""The `loopfm` command: one subcommand per pipeline stage.

Every command takes `--config` (YAML; defaults when omitted), `--out` (the run directory) and
`--set key.path=value` overrides, so the same line works locally and under
`ray job submit --working-dir . -- loopfm <stage> ...`. Stage code is imported lazily: `loopfm
--help` and `loopfm config show` do not pay for importing Ray and torch. argparse stops here: a
stage is a function of (config, run directory, its own options as typed keyword arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from loopfm.config import ARMS, ConfigError, LoopFMConfig, load_config
from loopfm.errors import LoopFMError, UnsupportedLocationError
from loopfm.logs import setup_logging
from loopfm.rundir import RunDir


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    help: str
    target: Optional[str]  # "module:function"; None = not built yet
    options: tuple[tuple[tuple[str, ...], dict], ...] = field(default=())
    passes: tuple[str, ...] = ()  # common options the function takes too (`bench`: config, overrides)
    uri: bool = False  # runs on a run directory given as a URI (s3://...); the others refuse one by name
    not_uri: str = ""  # why it refuses a URI, when it is more than not converted yet

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def load(self) -> Callable:
        if self.target is None:
            raise NotImplementedError(f"`loopfm {self.name}` is not built yet")
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


def comma_list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _opt(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return flags, kwargs


# Writers that must exclude each other take a file lock (`rundir.output_lock`); an object store has
# no lock (nor a conditional write pyarrow exposes) that excludes a writer on another machine.
NO_LOCK = "an object store gives no lock that excludes a writer on another machine"
APPEND_NOT_URI = (f"batches are checked against the log and numbered under one lock (two appends could each pass, "
                  f"then overlap), and {NO_LOCK}")
CHAIN_NOT_URI = (f"a store's delta chain has one writer at a time (a compaction must not fold a delta an increment is "
                 f"extending), and {NO_LOCK}")

COMMANDS: tuple[Command, ...] = (
    Command(("config", "show"), "print the resolved config", "loopfm.cli:show_config", uri=True),
    Command(("data", "generate"), "write the seeded synthetic multi-surface log",
            "loopfm.datasets.synthetic:generate_stage", uri=True),
    Command(("data", "validate"), "read the configured log, validate it, write normalized events",
            "loopfm.datasets.ingest:validate_stage", uri=True),
    Command(("data", "split"), "split events by time into train/valid/test and build the vocabulary",
            "loopfm.datasets.splits:split_stage", uri=True),
    Command(("fm", "train"), "train the foundation model with Ray Train", "loopfm.fm.train:fm_train_stage", uri=True),
    Command(("logs", "append"), "validate new event files and append them to the run's log as one batch",
            "loopfm.datasets.append:logs_append_stage", (
        _opt("--files", nargs="+", required=True, help="parquet or CSV files of new events (newer than the log)"),
        _opt("--format", choices=("auto", "parquet", "csv"), default="auto",
             help="file format (default: by extension)"),
    ), not_uri=APPEND_NOT_URI),
    Command(("embed",), "extract FM embeddings with Ray Data actors into the versioned store",
            "loopfm.fm.embed:embed_stage", (
        _opt("--incremental", action="store_true", help="embed only events newer than the store, as a delta"),
        _opt("--since", default="last", help="with --incremental: a ts, or `last` (newest stored event; default)"),
    ), uri=True),
    Command(("store", "compact"), "fold the store's deltas into one full store", "loopfm.store.deltas:compact_stage",
            not_uri=CHAIN_NOT_URI),
    Command(("drift",), "how far stored embeddings moved: between time slices, or between two stores",
            "loopfm.evaluation.drift:drift_stage", (
        _opt("--slices", type=int, default=4, help="time slices of the store chain compared in turn (default 4)"),
        _opt("--stores", type=comma_list, default=(),
             help="two store versions A,B compared on the events both hold (e.g. two FMs)"),
    ), uri=True),
    Command(("features",), "point-in-time join of stored embeddings into VM examples (one set per vertical)",
            "loopfm.features.stage:features_verticals_stage", uri=True),
    Command(("train",), "train one VM (one arm, one seed; one per vertical) with Ray Train",
            "loopfm.training.vm:train_stage", (
        _opt("--arm", choices=ARMS,
             help=f"one of {', '.join(ARMS)} (default: from train.use_kd/use_loopfm/use_rawseq)"),
        _opt("--seed", type=int, help="default: train.seed"),
    ), uri=True),
    Command(("report",), "train every arm on every seed, evaluate, write report.json, report.md and plots",
            "loopfm.training.experiment:report_stage", uri=True),
    Command(("ablate",), "vary one setting (e.g. vm.pooling) over values, train an arm on every seed, "
            "write a table and plot", "loopfm.training.ablation:ablate_stage", (
        _opt("--param", required=True, help="dotted config key, e.g. vm.pooling, embed.layers, features.seq_len"),
        _opt("--values", required=True, help="comma-separated values, YAML each, e.g. mean,sum,attention or [1],[2]"),
        _opt("--arm", choices=ARMS, default="loopfm", help="arm trained for each value (default: loopfm)"),
    ), uri=True),
    Command(("freshness",), "a fixed FM checkpoint against FMs retrained per time slice: drift and transfer",
            "loopfm.fm.freshness:freshness_stage", (
        _opt("--slices", type=int, default=3, help="time slices of the train period, one FM each (default 3)"),
        _opt("--arm", choices=ARMS, default="loopfm", help="arm trained on each store (default: loopfm)"),
    ), uri=True),
    Command(("scale",), "the FM capacity study: FMs of growing size (scale.fm_sizes), each with its own store; "
            "TR of every channel against FM parameters with CIs -> report/scale.{json,md,png}",
            "loopfm.training.scale:scale_stage", uri=True),
    Command(("tune",), "search KD and LoopFM settings with Ray Tune (Optuna + ASHA, W&B); re-run to resume",
            "loopfm.tune.stage:tune_stage", uri=True),
    Command(("serve", "run"), "serve the run's VM over HTTP with Ray Serve",
            "loopfm.serve_apps.stage:serve_run_stage", (
        _opt("--vm", help="VM checkpoint directory (default: the newest of serve.arm / serve.seed)"),
    ), uri=True),
    Command(("serve", "build"), "write a Serve config YAML for `serve deploy`",
            "loopfm.serve_apps.stage:serve_build_stage", (
        _opt("--vm", help="VM checkpoint directory (default: the newest of serve.arm / serve.seed)"),
        _opt("-o", "--output", help="YAML path (default: <run>/serve/serve.yaml)"),
    ), uri=True),
    Command(("serve", "reload"), "redeploy the running app with the newest VM and its store, no dropped requests",
            "loopfm.serve_apps.stage:serve_reload_stage", (
        _opt("--vm", help="VM checkpoint directory (default: the newest of serve.arm / serve.seed)"),
    ), uri=True),
    Command(("serve", "refresh"), "make the running app's feature lookup load new store deltas and appended logs now",
            "loopfm.serve_apps.stage:serve_refresh_stage", uri=True),
    Command(("cycle",), "the loop in one job: logs append, embed --incremental, then refresh a running app",
            "loopfm.pipeline:cycle_stage", (
        _opt("--files", nargs="+", required=True, help="parquet or CSV files of new events (newer than the log)"),
        _opt("--format", choices=("auto", "parquet", "csv"), default="auto",
             help="file format (default: by extension)"),
        _opt("--no-refresh", action="store_true", help="do not ask a running Serve app to refresh"),
    ), not_uri=f"it runs `logs append` and `embed --incremental`: {APPEND_NOT_URI}; {CHAIN_NOT_URI}"),
    Command(("run",), "run every stage end to end and write the report", "loopfm.pipeline:run_pipeline", uri=True),
    Command(("bench",),
            "run a performance harness of benchmarks/ (JSON in benchmarks/results/, a row in docs/BENCHMARKS.md)",
            "loopfm.bench:bench_stage", (
        _opt("benchmark",
             choices=("extract", "extract_scale", "train", "serve", "scaling", "memory", "features", "incremental",
                      "run", "all"),
             help="which harness (all = extract, train, serve, scaling, memory)"),
        _opt("harness_args", metavar="args", nargs=argparse.REMAINDER,
             help="after `--`: the harness's own flags, e.g. -- --users 2000"),
    ), passes=("config", "overrides")),
)


def show_config(cfg: LoopFMConfig, run: RunDir) -> None:
    print(cfg.to_yaml(), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopfm", description=__doc__.split("\n")[0])
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    groups[""] = top
    for cmd in COMMANDS:
        parent = ""
        for depth, word in enumerate(cmd.words[:-1]):
            key = " ".join(cmd.words[: depth + 1])
            if key not in groups:
                sub = groups[parent].add_parser(word, help=f"{word} commands")
                groups[key] = sub.add_subparsers(dest=f"sub_{depth}", metavar="<subcommand>", required=True)
            parent = key
        help_text = cmd.help + ("" if cmd.target else " (not built yet)")
        p = groups[parent].add_parser(cmd.words[-1], help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (defaults when omitted)")
        p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set vm.pooling=mean (repeatable)")
        dests = tuple(p.add_argument(*flags, **kwargs).dest for flags, kwargs in cmd.options)
        p.set_defaults(_command=cmd, _dests=dests + cmd.passes)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cmd: Command = args._command
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"loopfm: {err}", file=sys.stderr)
        return 2
    try:
        run = RunDir(args.out or f"runs/{cfg.name}")
        if run.remote and not cmd.uri:
            why = f": {cmd.not_uri}" if cmd.not_uri else " yet"
            raise UnsupportedLocationError(
                f"`loopfm {cmd.name}` does not run on a run directory given as a URI ({run.root}){why}; "
                f"give a local or mounted path; on a URI: {', '.join(c.name for c in COMMANDS if c.uri)}")
    except LoopFMError as err:
        print(f"loopfm: {err}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        fn = cmd.load()
    except NotImplementedError as err:
        print(f"loopfm: {err}", file=sys.stderr)
        return 2
    try:
        fn(cfg, run, **{dest: getattr(args, dest) for dest in args._dests})
    except (LoopFMError, ConfigError) as err:
        print(f"loopfm {cmd.name}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
