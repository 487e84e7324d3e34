"""`loopfm ablate --param KEY --values A,B,C`: one setting varied, everything else fixed.

Each value is a config override (`embed.layers=[2]`, `vm.pooling=mean`, `features.seq_len=8`,
`embed.compress.dtype=fp16`, `features.lag=3600`, `vm.loopfm_width=8`, ...). Only the stages the
key touches are re-run: an `embed.*` key builds its own store (the FM is shared), a `features.*`
key its own features, a `vm.*` or `train.*` key only new VMs. Every value trains the chosen arm
on every seed; the table and plot land in `report/ablation_<key>.{md,json,png}`.
"""

from __future__ import annotations

from loopfm.config import LoopFMConfig, parse_override
from loopfm.evaluation.report import write_ablation
from loopfm.evaluation.transfer import summarize
from loopfm.features.stage import features_stage
from loopfm.fm.embed import embed_stage
from loopfm.rundir import RunDir
from loopfm.runtime import init_ray, log
from loopfm.training.vm import arm_config, train_vms


def ablate_stage(cfg: LoopFMConfig, run: RunDir, param: str, values: str, arm: str = "loopfm") -> list[dict]:
    """`loopfm ablate --param KEY --values V1,V2,...`: `arm` trained on every seed for each value of
    `param` (`values`: comma-separated, each YAML)."""
    cfg.data.one_vertical("loopfm ablate")
    key, values = param, [parse_override(f"{param}={v}")[1] for v in _split(values)]
    init_ray(cfg.ray)
    rows = []
    for value in values:
        variant = cfg.updated({key: value})
        if key.startswith("embed."):
            embed_stage(variant, run)
        features = features_stage(variant, run)
        tests = [vm.metrics["test"] for vm in train_vms(
            [arm_config(variant, arm, seed) for seed in range(cfg.experiment.seeds)], run, features)]
        row = {key: value, **{m: summarize(t[m] for t in tests) for m in ("auc", "gauc", "logloss", "ne")}}
        log.info("ablate: %s=%s: %s auc %.4f ± %.4f, ne %.4f ± %.4f", key, value, arm, row["auc"]["mean"],
                 row["auc"]["std"], row["ne"]["mean"], row["ne"]["std"])
        rows.append(row)
    paths = write_ablation(rows, key, run.report, f"ablation_{key.replace('.', '_')}")
    log.info("ablate: %s", ", ".join(str(p) for p in paths))
    return rows


def _split(text: str) -> list[str]:
    """`mean,sum` -> ["mean", "sum"]; brackets keep lists whole: `[1],[1,2]` -> ["[1]", "[1,2]"]."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [p for p in [*parts, current.strip()] if p]
