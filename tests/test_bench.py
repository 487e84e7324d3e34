"""`loopfm bench`, the benchmark config and the harnesses' shared arithmetic (fast: no Ray, no stage runs)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopfm.bench import ALL, NAMES, SCRIPTS, BenchmarkError, command, config_flags, find_repo, loglog_slope
from loopfm.cli import COMMANDS, build_parser
from loopfm.config import LoopFMConfig, load_config
from loopfm.models.fm import CausalFM

REPO = Path(__file__).resolve().parents[1]
BENCH_YAML = REPO / "configs" / "bench.yaml"


# -- the slope fit ------------------------------------------------------------------------------
@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.3, 2.0])
def test_loglog_slope_recovers_a_power_law(exponent):
    x = np.array([6e4, 2e5, 6e5, 2e6])
    fit = loglog_slope(x, 3.7 * x**exponent)
    assert fit["slope"] == pytest.approx(exponent, abs=1e-3)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-6)


def test_loglog_slope_sees_fixed_cost_and_noise():
    x = np.array([6e4, 2e5, 6e5])
    fixed = loglog_slope(x, 30.0 + 1e-4 * x)  # a start-up cost dominates the small sizes: well below 1
    assert fixed["slope"] < 0.6
    rng = np.random.default_rng(0)
    noisy = loglog_slope(np.geomspace(1e4, 1e6, 12), np.geomspace(1e4, 1e6, 12) * rng.lognormal(0, 0.3, 12))
    assert noisy["r2"] < 0.999 and abs(noisy["slope"] - 1.0) < 0.3


@pytest.mark.parametrize("x, y", [([1e5], [2.0]), ([1e5, 1e5], [1.0, 2.0]), ([0, 1e5], [1.0, 2.0]),
                                  ([1e4, 1e5], [0.0, 2.0])])
def test_loglog_slope_refuses_what_it_cannot_fit(x, y):
    with pytest.raises(ValueError):
        loglog_slope(x, y)


# -- the command ----------------------------------------------------------------------------------
@pytest.mark.ray
def test_unknown_benchmark_exits_nonzero_naming_it():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from loopfm.cli import main; sys.exit(main())",
                           "bench", "warpdrive"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode != 0
    assert "warpdrive" in proc.stderr


def test_every_cli_command_loads_its_function():
    """A command names its stage as a string (imported only when run): a moved stage must fail here,
    not when a user runs it."""
    built = [c for c in COMMANDS if c.target is not None]
    assert len(built) > 10
    for cmd in built:
        assert callable(cmd.load()), cmd.name


def test_every_stage_takes_exactly_its_commands_options_as_typed_arguments():
    """argparse stops at the CLI: a stage is (cfg, run, *its options*), each option a named
    parameter, so library code and tests call it with plain values, never a namespace."""
    parser = build_parser()
    for cmd in (c for c in COMMANDS if c.target is not None):
        args = parser.parse_args([*cmd.words, *_required(cmd)])
        params = list(inspect.signature(cmd.load()).parameters.values())
        assert [p.name for p in params[:2]] == ["cfg", "run"], cmd.name
        names = {p.name for p in params[2:]}
        assert set(args._dests) <= names, (cmd.name, args._dests, names)
        extra = [p for p in params[2:] if p.name not in args._dests]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (cmd.name, extra)
        assert "args" not in names, cmd.name


def _required(cmd) -> list[str]:
    """Values for a command's required options (enough to parse it)."""
    out = []
    for flags, kwargs in cmd.options:
        if not flags[0].startswith("-"):
            out += [kwargs.get("choices", ("x",))[0]]
        elif kwargs.get("required"):
            out += [flags[-1], "x"]
    return out


def test_parser_and_stage_agree_on_the_names():
    bench = next(c for c in COMMANDS if c.words == ("bench",))
    choices = next(kw["choices"] for flags, kw in bench.options if flags == ("benchmark",))
    assert set(choices) == set(NAMES) and set(ALL) <= set(SCRIPTS)
    args = build_parser().parse_args(["bench", "--config", str(BENCH_YAML), "extract", "--", "--users", "200",
                                      "--no-sweep"])
    assert (args.benchmark, args.harness_args, args.config) == ("extract", ["--users", "200", "--no-sweep"],
                                                                str(BENCH_YAML))
    for name in SCRIPTS:
        assert (REPO / "benchmarks" / SCRIPTS[name]).is_file(), name


def test_stage_refuses_unknown_names_and_arguments_to_all(tmp_path):
    from loopfm.bench import bench_stage

    with pytest.raises(BenchmarkError, match="warpdrive"):
        bench_stage(LoopFMConfig(), None, "warpdrive")
    with pytest.raises(BenchmarkError, match="all"):
        bench_stage(LoopFMConfig(), None, "all", ["--users", "5"])


def test_flags_after_dashes_come_last_so_they_win():
    cfg = load_config(str(BENCH_YAML))
    cmd = command("extract", REPO, ["--users", "200"], str(BENCH_YAML), cfg)
    assert cmd[0] == sys.executable and cmd[1].endswith("bench_extract.py")
    assert cmd[-2:] == ["--users", "200"] and cmd.index("--users") < len(cmd) - 2  # the config's, then ours
    assert cmd[cmd.index("--d-model") + 1] == "768"
    assert command("extract", REPO, ["--no-sweep"]) == [sys.executable, str(REPO / "benchmarks" / "bench_extract.py"),
                                                        "--no-sweep"]
    assert command("scaling", REPO, [], str(BENCH_YAML), cfg)[2:4] == ["--config", str(BENCH_YAML.resolve())]
    assert "--epochs" in config_flags("train", cfg)


def test_missing_benchmarks_folder_is_named(tmp_path, monkeypatch):
    import loopfm.bench as bench

    monkeypatch.delenv("LOOPFM_REPO", raising=False)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "loopfm" / "bench.py"))
    with pytest.raises(BenchmarkError, match="benchmarks folder not found"):
        find_repo(tmp_path)
    monkeypatch.setenv("LOOPFM_REPO", str(REPO))
    assert find_repo(tmp_path) == REPO


# -- the benchmark config ---------------------------------------------------------------------------
def test_bench_config_is_at_scale():
    cfg = load_config(str(BENCH_YAML))
    s = cfg.data.synthetic
    assert s.num_users * s.events_per_user >= 5_000_000  # the generator's per-user counts have this mean
    with torch.device("meta"):  # shapes only: no 44M-parameter allocation
        fm = CausalFM(cfg.fm, {"item_id": s.num_items + 2, "category": s.num_categories + 2}, s.num_surfaces)
    assert sum(p.numel() for p in fm.blocks.parameters()) >= 20_000_000  # without the token embeddings
    assert cfg.fm.chunk_len > cfg.fm.context
