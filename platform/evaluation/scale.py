"""The FM capacity study's report: TR of every channel against FM parameters, with CIs and gated claims.

`build_scale` is pure (dicts in, a JSON-able dict out), like `build_report`, so it is tested on
fabricated numbers; `write_scale` renders scale.json, scale.md and scale.png. Each FM size is
judged by the experiment report's own code (`build_report`: arm summaries, FM vs base, TR from
means and pair by pair with 95% CIs, that size's claims), so a size reads exactly as `loopfm
report` would read it. Across sizes, the runs stay paired: (FM replicate, VM seed) of every size
shares its base and rawseq VMs, so a channel's TR at each size forms one curve per pair, and the
trend is that curve's least-squares slope against log10(FM parameters), tested over pairs with
`paired` (mean, 95% CI, p). Trend claims go through the report's own verdict rule (`_claim`:
holds only at p < ALPHA in the claimed direction).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from loopfm.location import as_path
from loopfm.rundir import atomic_write_text

from .report import ALPHA, LABELS, _ci, _claim, _describe, _f, _figure, _pv, _save, build_report, to_json
from .transfer import ARMS, CHANNELS, improvement, paired, transfer_ratio

__all__ = ["TR_METRICS", "build_scale", "write_scale", "slope"]

TR_METRICS = ("ne", "auc")
NAN = float("nan")
SIZE_KEYS = ("name", "d_model", "n_layers", "n_heads", "d_ff", "parameters", "embedding_parameters")


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x over the finite points; NaN below 2 points or with one x."""
    pts = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pts) < 2:
        return NAN
    xs, ys = np.array(pts, np.float64).T
    var = float(((xs - xs.mean()) ** 2).sum())
    return NAN if var == 0 else float(((xs - xs.mean()) * (ys - ys.mean())).sum() / var)


def _key(run: Mapping) -> tuple:
    return run.get("fm_seed", 0), run["seed"]


def _per_pair(size: Mapping, arm: str, value) -> dict:
    """{(fm_seed, seed): value(base run, arm run, FM metrics)} of one size, over the pairs it has."""
    fm = {d.get("fm_seed", 0): d for d in size["fm"]}
    base = {_key(r): r for r in size["arms"].get("base", [])}
    out = {}
    for run in size["arms"].get(arm, []):
        k = _key(run)
        if k in base and k[0] in fm:
            out[k] = value(base[k], run, fm[k[0]])
    return out


def _trend(sizes: Sequence[Mapping], logp: Sequence[float], per_size: Sequence[dict]) -> dict:
    """Slope per pair of a per-pair quantity against log10(parameters), tested over the pairs."""
    keys = sorted(set().union(*(d.keys() for d in per_size))) if per_size else []
    slopes = [slope(logp, [d.get(k, NAN) for d in per_size]) for k in keys]
    return {**paired(slopes), "slopes": slopes}


def _fm_beats_base_everywhere(rows: Sequence[Mapping]) -> Optional[str]:
    """None when the FM beats the base VM on NE (means) at every size; else the sizes where it does not."""
    bad = [r["name"] for r in rows if not (r["fm_vs_base"].get("ne", {}).get("mean", NAN) > 0)]
    return ", ".join(bad) or None


def build_scale(sizes: Sequence[Mapping], meta: Mapping[str, Any]) -> dict:
    """Per size: the experiment report's summaries and TR; across sizes: trends and gated claims.

    `sizes[i]` holds the shape and parameter count of FM size i (`SIZE_KEYS`), `fm` (its test
    metrics per FM replicate, tagged `fm_seed`) and `arms` (arm -> test-metric dicts tagged
    `seed` and `fm_seed`), as `run_experiment` returns them; sizes in growing parameter order.
    """
    sizes = sorted(sizes, key=lambda s: s["parameters"])
    rows, notes = [], {}  # note -> the sizes it applies to
    for s in sizes:
        rep = build_report(s["arms"], s["fm"], {})
        rows.append({
            **{k: s[k] for k in SIZE_KEYS},
            **{k: s[k] for k in ("fm_versions", "store_versions", "features") if k in s},
            "fm": rep["fm"], "fm_runs": list(s["fm"]), "arms": rep["arms"], "fm_vs_base": rep.get("fm_vs_base", {}),
            "tr": rep["tr"], "tr_per_pair": rep["tr_per_pair"], "comparisons": rep["comparisons"],
            "claims": rep["claims"],
        })
        for n in rep["notes"]:
            notes.setdefault(n, []).append(s["name"])
    logp = [math.log10(s["parameters"]) for s in sizes]
    channels = [c for c in CHANNELS if any(c in s["arms"] for s in sizes)]

    trend: dict[str, Any] = {"tr": {}, "gain": {}}
    for ch in channels:
        trend["tr"][ch] = {m: _trend(sizes, logp, [_per_pair(s, ch, lambda b, c, f, m=m: transfer_ratio(b, c, f, m))
                                                   for s in sizes]) for m in TR_METRICS}
        trend["gain"][ch] = {"auc": _trend(sizes, logp, [_per_pair(s, ch, lambda b, c, f: improvement(b, c, "auc"))
                                                         for s in sizes])}
    fm_by_seed = [{d.get("fm_seed", 0): float(d.get("auc", NAN)) for d in s["fm"]} for s in sizes]
    trend["fm_auc"] = _trend(sizes, logp, fm_by_seed)
    if all("loopfm" in s["arms"] and "rawseq" in s["arms"] for s in sizes):
        knowledge = []
        for s in sizes:
            raw = {_key(r): r for r in s["arms"]["rawseq"]}
            knowledge.append({_key(r): improvement(raw[_key(r)], r, "auc") for r in s["arms"]["loopfm"]
                              if _key(r) in raw})
        trend["fm_knowledge_auc"] = _trend(sizes, logp, knowledge)

    notes = [n if len(names) == len(sizes) else f"{', '.join(names)}: {n}" for n, names in notes.items()]
    r = {"meta": dict(meta), "alpha": ALPHA, "sizes": rows, "channels": channels, "trend": trend, "notes": notes,
         "parameter_span": sizes[-1]["parameters"] / sizes[0]["parameters"] if sizes else NAN}
    r["claims"] = _claims(r, sizes, logp)
    r["statement"] = _statement(r)
    return r


def _difference(sizes, logp, a: str, b: str) -> dict:
    """Slope of TR_NE(a) - TR_NE(b) per pair: does a's share fall slower than b's as the FM grows?"""
    per = []
    for s in sizes:
        ta = _per_pair(s, a, lambda x, y, f: transfer_ratio(x, y, f, "ne"))
        tb = _per_pair(s, b, lambda x, y, f: transfer_ratio(x, y, f, "ne"))
        per.append({k: ta[k] - tb[k] for k in ta if k in tb})
    return _trend(sizes, logp, per)


def _negated(ev: Mapping) -> dict:
    lo, hi = ev["ci95"]
    return {**ev, "mean": -ev["mean"], "ci95": [-hi, -lo]}


def _claims(r: dict, sizes, logp) -> list[dict]:
    unit = "slope per decade of FM parameters"
    out = []
    ev = r["trend"]["fm_auc"]
    text = "The FM gets better with size: FM test AUC rises with log10(parameters)"
    out.append(_claim(text, ev, _describe(ev, unit) + " (pairs = FM replicates)") if ev["n"] >= 2 else
               _claim(text, None, f"not computed: {ev['n']} FM replicate(s), a test over replicates needs 2 "
                                  f"(experiment.fm_seeds); FM AUC per size is in the table"))
    missing = _fm_beats_base_everywhere(r["sizes"])
    tr = r["trend"]["tr"]

    def tr_claim(text: str, arms: tuple[str, ...], evidence, unit: str) -> None:
        if any(a not in r["channels"] for a in arms):
            out.append(_claim(text, None,
                              f"not computed: arm(s) {', '.join(a for a in arms if a not in r['channels'])} "
                              "not run"))
        elif missing:
            out.append(_claim(text, None, f"not computed: the FM does not beat the base VM on NE at size(s) {missing}, "
                                          "so TR has no FM advantage to measure there"))
        else:
            ev = evidence()
            out.append(_claim(text, ev, _describe(ev, unit)))

    tr_claim("TR(+KD) on NE falls as the FM grows (the paper: KD's share shrinks)", ("kd",),
             lambda: _negated(tr["kd"]["ne"]), "fall of TR(+KD) per decade of FM parameters")
    tr_claim("TR(+LoopFM) on NE falls less than TR(+KD) as the FM grows", ("kd", "loopfm"),
             lambda: _difference(sizes, logp, "loopfm", "kd"),
             "slope of TR(+LoopFM) - TR(+KD) per decade of FM parameters")
    tr_claim("TR(+KD+LoopFM) on NE falls less than TR(+KD) as the FM grows", ("kd", "kd_loopfm"),
             lambda: _difference(sizes, logp, "kd_loopfm", "kd"),
             "slope of TR(+KD+LoopFM) - TR(+KD) per decade of FM parameters")
    text = "FM knowledge over raw history grows with the FM: (+LoopFM - raw history) AUC rises with log10(parameters)"
    ev = r["trend"].get("fm_knowledge_auc")
    out.append(_claim(text, ev, _describe(ev, unit)) if ev else
               _claim(text, None, "not computed: needs the loopfm and rawseq arms"))
    return out


def _statement(r: Mapping) -> str:
    """What came out, in plain words, from the numbers above it (test metrics; nothing chosen on them)."""
    rows = r["sizes"]
    if not rows:
        return "No FM size was run."
    first, last = rows[0], rows[-1]
    fm_auc = [row["fm"].get("auc", {}).get("mean", NAN) for row in rows]
    beats = [row["name"] for row in rows if row["fm_vs_base"].get("auc", {}).get("p", NAN) < ALPHA
             and row["fm_vs_base"]["auc"]["mean"] > 0]
    L = [f"{len(rows)} FM sizes from {first['parameters']:,} to {last['parameters']:,} parameters "
         f"({r['parameter_span']:.1f}x). FM test AUC: " + ", ".join(f"{row['name']} {_f(a)}" for row, a in
                                                                     zip(rows, fm_auc)) + "."]
    L.append(f"The FM beats the base VM (AUC, paired p < {ALPHA}) at {len(beats)} of {len(rows)} sizes"
             + (f" ({', '.join(beats)})." if beats else "."))
    for ch in r["channels"]:
        t = r["trend"]["tr"][ch]["ne"]
        ends = [row["tr_per_pair"].get(ch, {}).get("ne", {}).get("mean", NAN) for row in (first, last)]
        L.append(f"TR({LABELS.get(ch, ch)}) on NE goes from {_f(ends[0], 3)} ({first['name']}) to {_f(ends[1], 3)} "
                 f"({last['name']}); slope per decade {_f(t['mean'], 3)} (95% CI {_ci(t, 3)}, p {_pv(t['p'])}).")
    verdicts: dict[str, list[str]] = {}
    for c in r["claims"]:
        verdicts.setdefault(c["verdict"], []).append(c["claim"])
    for v in ("holds", "reversed", "not shown", "not computed"):
        if verdicts.get(v):
            L.append(f"{v.capitalize()}: " + "; ".join(verdicts[v]) + ".")
    return " ".join(L)


# ---------------------------------------------------------------- writing

def _tr_cell(ps: Mapping) -> str:
    if not ps or not ps.get("n"):
        return "n/a"
    return _f(ps["mean"], 3) + ("" if ps["n"] < 2 else f" {_ci(ps, 3)}")


def _markdown(r: Mapping) -> str:
    L = ["# FM capacity study", ""]
    for k, v in r.get("meta", {}).items():
        L.append(f"- **{k}**: {json.dumps(v, default=str) if isinstance(v, (Mapping, list, tuple)) else v}")
    L += ["", "## What came out", "", r["statement"], "",
          "## FM sizes", "",
          "FM parameters are counted on the built model (embeddings included; their share in brackets). "
          "FM - base: the FM's AUC over the base VM's on the same test events, paired over runs.", "",
          "| size | d_model | layers | heads | d_ff | FM parameters (embeddings) | FM test AUC | FM test NE | "
          "FM - base AUC | 95% CI | p |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["sizes"]:
        fb = row["fm_vs_base"].get("auc", {})
        L.append(f"| {row['name']} | {row['d_model']} | {row['n_layers']} | {row['n_heads']} | {row['d_ff']} | "
                 f"{row['parameters']:,} ({row['embedding_parameters'] / row['parameters']:.0%}) | "
                 f"{_f(row['fm'].get('auc', {}).get('mean'))} | {_f(row['fm'].get('ne', {}).get('mean'))} | "
                 f"{_f(fb.get('mean'), 4)} | {_ci(fb) if fb else 'n/a'} | {_pv(fb.get('p'))} |")
    for m in TR_METRICS:
        L += ["", f"## Transfer ratio on {m.upper()} against FM size", "",
              "TR = the channel's gain over the base VM / the FM's gain over the base VM, pair by pair: mean "
              "[95% CI]. It has no meaning where the FM does not beat the base VM.", "",
              "| size | FM parameters | " + " | ".join(f"TR({LABELS.get(c, c)})" for c in r["channels"]) + " |",
              "|---|---:|" + "---:|" * len(r["channels"])]
        for row in r["sizes"]:
            L.append(f"| {row['name']} | {row['parameters']:,} | " + " | ".join(
                _tr_cell(row["tr_per_pair"].get(c, {}).get(m, {})) for c in r["channels"]) + " |")
    if r.get("meta", {}).get("fm_free_arms_shared"):
        L += ["", "The base VM and the raw-history control read nothing the FM writes: the same VMs serve every "
              "size (their inputs checked equal), so their gains are constant and TR(+raw history) moves only "
              "with the FM's own gain."]
    arms = [a for a in r["sizes"][0]["arms"]] if r["sizes"] else []
    L += ["", "## Test AUC per arm", "", "| size | " + " | ".join(LABELS.get(a, a) for a in arms) + " | FM |",
          "|---|" + "---:|" * (len(arms) + 1)]
    for row in r["sizes"]:
        L.append(f"| {row['name']} | " + " | ".join(_f(row["arms"][a]["auc"]["mean"]) for a in arms)
                 + f" | {_f(row['fm'].get('auc', {}).get('mean'))} |")
    L += ["", "## Trends against log10(FM parameters)", "",
          "Least-squares slope per (FM replicate, VM seed) pair over the sizes, then mean, 95% CI and paired p "
          "over pairs.", "", "| quantity | slope per decade | 95% CI | p | pairs |", "|---|---:|---:|---:|---:|"]
    t = r["trend"]
    lines = [(f"TR({LABELS.get(c, c)}) on {m.upper()}", t["tr"][c][m]) for c in r["channels"] for m in TR_METRICS]
    lines += [(f"AUC gain of {LABELS.get(c, c)} over the base VM", t["gain"][c]["auc"]) for c in r["channels"]]
    lines.append(("FM test AUC (pairs = FM replicates)", t["fm_auc"]))
    if "fm_knowledge_auc" in t:
        lines.append(("+LoopFM - raw history AUC", t["fm_knowledge_auc"]))
    for name, ev in lines:
        L.append(f"| {name} | {_f(ev['mean'], 4)} | {_ci(ev, 4)} | {_pv(ev['p'])} | {ev['n']} |")
    L += ["", "## Claims", "",
          f"A claim holds only when its paired test gives p < {ALPHA} in the claimed direction; otherwise it is "
          "not shown (or reversed). Each size's own claims, as `loopfm report` words them, are in scale.json.", ""]
    marks = {"holds": "✓ holds", "not shown": "– not shown", "reversed": "✗ reversed", "not computed": "· not computed"}
    L += [f"- **{marks[c['verdict']]}**: {c['claim']}: {c['evidence']}" for c in r["claims"]]
    if r.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(L) + "\n"


def _color(arm: str) -> str:
    """One colour per arm in every panel."""
    return f"C{ARMS.index(arm)}" if arm in ARMS else "gray"


def _plot(r: Mapping, path: Path) -> Path:
    """TR on NE and on AUC against FM parameters (log x, 95% CI bars), and test AUC of the FM and arms."""
    fig, axes = _figure(3, 5.0)
    rows = r["sizes"]
    params = np.array([row["parameters"] for row in rows], np.float64)
    for ax, m in zip(axes[:2], TR_METRICS):
        means = [0.0, 1.0]  # the axis shows 0 (nothing carried), 1 (all of it) and every mean; wide CIs are cut
        for i, ch in enumerate(r["channels"]):
            ps = [row["tr_per_pair"].get(ch, {}).get(m, {}) for row in rows]
            mu = np.array([p.get("mean", NAN) for p in ps], np.float64)
            lo = np.array([p.get("ci95", [NAN, NAN])[0] for p in ps], np.float64)
            hi = np.array([p.get("ci95", [NAN, NAN])[1] for p in ps], np.float64)
            err = np.nan_to_num(np.vstack([mu - lo, hi - mu]))
            ax.errorbar(params * 1.04 ** (i - len(r["channels"]) / 2), mu, yerr=err, marker="o", capsize=3,
                        label=LABELS.get(ch, ch), color=_color(ch))
            means += [v for v in mu if np.isfinite(v)]
        pad = 0.15 * (max(means) - min(means))
        ax.set_ylim(min(means) - pad, max(means) + pad)
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(1, ls="--", color="#C44E52", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("FM parameters")
        ax.set_title(f"TR on {m.upper()} (bars: 95% CI over pairs)", fontsize=10)
        ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    fm = [row["fm"].get("auc", {}) for row in rows]
    mu = np.array([s.get("mean", NAN) for s in fm], np.float64)
    lo = np.array([s.get("ci95", [NAN, NAN])[0] for s in fm], np.float64)
    ax.errorbar(params, mu, yerr=np.nan_to_num(mu - lo), marker="s", color="#C44E52", capsize=3, label="FM")
    for a in (rows[0]["arms"] if rows else {}):
        ax.plot(params, [row["arms"][a]["auc"]["mean"] for row in rows], marker=".", lw=1, label=LABELS.get(a, a),
                color=_color(a))
    ax.set_xscale("log")
    ax.set_xlabel("FM parameters")
    ax.set_title("Test AUC", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def write_scale(report: Mapping, out_dir: Path, name: str = "scale") -> list[Path]:
    """<name>.json, <name>.md and <name>.png, each written atomically."""
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [atomic_write_text(out / f"{name}.json", to_json(report)),
            atomic_write_text(out / f"{name}.md", _markdown(report)),
            _plot(report, out / f"{name}.png")]
