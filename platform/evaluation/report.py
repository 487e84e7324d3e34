"""The experiment report: per-arm metrics, TR, gain decomposition, paired evidence, gated claims.

`build_report` is pure (dicts in, a JSON-able dict out) so it is tested on fabricated numbers;
`write_report` renders it to report.json, report.md and PNGs. Runs are paired: (FM replicate r,
VM seed k) of every arm saw the same FM, store, data order and initialisation seed, so every
comparison is a paired difference over those pairs, reported as mean, 95% CI and p-value.

A claim holds only when its evidence does: p < ALPHA on its paired test with the difference in
the claimed direction; otherwise it reads "not shown" (or "reversed" when significant the other
way), its numbers kept. Anything that cannot be computed (an arm not run, a one-class metric) is
skipped and said so in `notes` and in the claims, never a crash: partial experiments still get
a report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loopfm.location import as_path
from loopfm.rundir import atomic_file, atomic_write_text

from .transfer import ARMS, CHANNELS, improvement, paired, summarize, transfer_ratio

__all__ = ["METRICS", "LABELS", "ALPHA", "VERTICAL_DIR", "build_report", "build_verticals_report", "write_report",
           "write_verticals_report", "write_ablation", "to_json"]

METRICS = ("auc", "gauc", "logloss", "ne")
TR_METRICS = ("ne", "auc")
ALPHA = 0.05
LABELS = {"base": "base VM", "kd": "+KD", "rawseq": "+raw history", "kd_rawseq": "+KD+raw history",
          "loopfm": "+LoopFM", "kd_loopfm": "+KD+LoopFM", "fm": "FM"}
COMPARISONS = {  # name -> (arm, against): "arm improves on against"
    "kd_vs_base": ("kd", "base"),
    "rawseq_vs_base": ("rawseq", "base"),
    "loopfm_vs_base": ("loopfm", "base"),
    "kd_loopfm_vs_base": ("kd_loopfm", "base"),
    "kd_loopfm_vs_kd": ("kd_loopfm", "kd"),
    "loopfm_vs_kd": ("loopfm", "kd"),
    "loopfm_vs_rawseq": ("loopfm", "rawseq"),
    "kd_loopfm_vs_kd_rawseq": ("kd_loopfm", "kd_rawseq"),
    "kd_loopfm_vs_rawseq": ("kd_loopfm", "rawseq"),
}
FM_KNOWLEDGE = ("loopfm_vs_rawseq", "kd_loopfm_vs_kd_rawseq", "kd_loopfm_vs_rawseq")
TR_DOUBLE_THRESHOLD = 1.5  # "about twice": TR(kd_loopfm) >= 1.5 x TR(kd)
NAN = float("nan")
VERTICAL_DIR = "vertical"  # report/vertical<v>/: one vertical's own report in a report over several
VERTICALS_PLOT = "verticals.png"  # the summary figure of a report over several verticals
SUMMARY_COMPARISONS = ("loopfm_vs_base", "loopfm_vs_rawseq", "kd_loopfm_vs_kd")  # the columns across verticals
SUMMARY_CHANNELS = ("kd", "kd_loopfm")  # their TR across verticals (the paper: +KD+LoopFM about twice +KD)


# ---------------------------------------------------------------- building

def _key(d: Mapping, i: int) -> tuple:
    """A run's pairing key: (FM replicate, VM seed) when tagged, else its position."""
    return (d.get("fm_seed", 0), d["seed"]) if "seed" in d else (0, i)


def _pairs(*runs: Sequence[Mapping]) -> list[tuple]:
    """Runs of several arms that share a pairing key, in the first arm's order."""
    by = [{_key(d, i): d for i, d in enumerate(r)} for r in runs]
    return [tuple(b[k] for b in by) for k in by[0] if all(k in b for b in by[1:])]


def _get(d: Mapping, metric: str) -> float:
    v = d.get(metric)
    return NAN if v is None else float(v)


def _ordered(arms: Mapping) -> list[str]:
    return [a for a in ARMS if a in arms] + [a for a in arms if a not in ARMS]


def _nan(*xs: float) -> bool:
    return any(x is None or math.isnan(x) for x in xs)


def _fm_of(fm_runs: Sequence[Mapping]) -> Callable[[Mapping], Optional[Mapping]]:
    """The FM metrics a run was paired with: its replicate's (one FM: that one)."""
    by = {d.get("fm_seed", 0): d for d in fm_runs}
    return lambda run: by.get(run.get("fm_seed", 0), fm_runs[0] if len(fm_runs) == 1 else None)


def _verdict(evidence: Mapping) -> str:
    m, p = evidence.get("mean", NAN), evidence.get("p", NAN)
    if _nan(m, p) or p >= ALPHA:
        return "not shown"
    return "holds" if m > 0 else "reversed"


def _claim(text: str, evidence: Optional[Mapping], describe: str) -> dict:
    """A claim with its verdict; evidence None = not computed (inputs missing, said in `describe`)."""
    verdict = "not computed" if evidence is None else _verdict(evidence)
    return {"claim": text, "verdict": verdict, "holds": verdict == "holds", "computed": evidence is not None,
            "evidence": describe, "test": dict(evidence) if evidence else None}


def _describe(ev: Mapping, unit: str = "AUC") -> str:
    lo, hi = ev["ci95"]
    return (f"{unit} {ev['mean']:+.4f} (95% CI {_f(lo)} to {_f(hi)}), paired p={_pv(ev['p'])} over {ev['n']} pairs")


def _claims(r: dict) -> list[dict]:
    out = []
    cmp = r["comparisons"]

    def better(name: str, text: str) -> None:
        a, b = COMPARISONS[name]
        ev = cmp.get(name, {}).get("auc")
        if ev is None:
            out.append(_claim(text, None, f"not computed: arm {a if a not in r['arms'] else b!r} not run"))
        else:
            out.append(_claim(text, ev, _describe(ev)))

    ev = r.get("fm_vs_base", {}).get("auc")
    text = "FM beats the base VM (AUC)"
    out.append(_claim(text, ev, _describe(ev)) if ev else _claim(text, None, "not computed: FM or base missing"))
    better("loopfm_vs_base", "+LoopFM beats the base VM (AUC)")
    better("loopfm_vs_kd", "+LoopFM beats +KD (AUC)")
    better("kd_loopfm_vs_kd", "+KD+LoopFM beats +KD (AUC)")
    better("loopfm_vs_rawseq", "FM knowledge over raw history: +LoopFM beats the same slots of raw tokens (AUC)")
    if "kd_loopfm_vs_kd_rawseq" in cmp:
        better("kd_loopfm_vs_kd_rawseq",
               "FM knowledge over raw history, with KD: +KD+LoopFM beats +KD+raw history (AUC)")

    text = "KD and LoopFM are complementary: interaction = gain_both - gain_kd - gain_loopfm > 0 (AUC)"
    ev = r["interaction"].get("auc")
    out.append(_claim(text, ev, _describe(ev)) if ev else
               _claim(text, None, "not computed: needs base, kd, loopfm and kd_loopfm"))

    text = f"TR(+KD+LoopFM) >= {TR_DOUBLE_THRESHOLD} x TR(+KD) on NE (the paper: about twice)"
    ev, gap = r.get("tr_double"), r.get("fm_vs_base", {}).get("ne", {}).get("mean", NAN)
    if ev is None:
        out.append(_claim(text, None, "not computed: TR(+KD) or TR(+KD+LoopFM) undefined"))
    elif _nan(gap) or gap <= 0:
        out.append(_claim(text, None, f"not computed: the FM does not beat the base VM on NE (FM NE - base NE "
                                      f"{-gap:+.4f}), so there is no advantage for a channel to transfer"))
    else:
        tr = r["tr_per_pair"]
        desc = (f"TR_NE +KD {_f(tr['kd']['ne']['mean'], 3)}, +KD+LoopFM {_f(tr['kd_loopfm']['ne']['mean'], 3)}; "
                f"TR(+KD+LoopFM) - {TR_DOUBLE_THRESHOLD} TR(+KD) = {_describe(ev, 'TR')}")
        out.append(_claim(text, ev, desc))
    return out


def build_report(arms: Mapping[str, Sequence[Mapping]], fm: Sequence[Mapping] | Mapping | None,
                 meta: Mapping[str, Any]) -> dict:
    """Summaries with CIs, TR (from means, and pair by pair with CIs), decomposition and its
    interaction test, paired comparisons and gated claims.

    `arms[arm]` are per-run test-metric dicts, each tagged with `seed` (and `fm_seed` with FM
    replicates; untagged runs pair by position); `fm` is the FM's test metrics (one dict, or one
    per replicate tagged with `fm_seed`).
    """
    arms = {a: list(arms[a]) for a in _ordered(arms) if arms[a]}
    fm_runs = [fm] if isinstance(fm, Mapping) else list(fm or [])
    fm_of = _fm_of(fm_runs) if fm_runs else (lambda run: None)
    notes: list[str] = [f"arm {a!r} not run" for a in ARMS if a not in arms]
    r: dict[str, Any] = {
        "meta": dict(meta), "alpha": ALPHA,
        "arms": {a: {m: summarize(_get(d, m) for d in runs) for m in METRICS} for a, runs in arms.items()},
        "fm": {m: summarize(_get(d, m) for d in fm_runs) for m in METRICS} if fm_runs else {},
        "tr": {}, "tr_per_pair": {}, "decomposition": {}, "interaction": {}, "comparisons": {}, "notes": notes,
    }
    mean = {a: {m: s["mean"] for m, s in ms.items()} for a, ms in r["arms"].items()}
    fm_mean = {m: s["mean"] for m, s in r["fm"].items()}

    for name, (a, b) in COMPARISONS.items():
        if a in arms and b in arms:
            pairs = _pairs(arms[a], arms[b])
            if len(pairs) < min(len(arms[a]), len(arms[b])):
                notes.append(f"{name}: only {len(pairs)} runs pair up")
            r["comparisons"][name] = {m: paired(improvement(y, x, m) for x, y in pairs) for m in METRICS}

    if "base" in arms and fm_runs:
        runs = [(run, fm_of(run)) for run in arms["base"]]
        r["fm_vs_base"] = {m: paired(improvement(b, f, m) for b, f in runs if f) for m in METRICS}
        for ch in (c for c in CHANNELS if c in arms):
            r["tr"][ch] = {m: transfer_ratio(mean["base"], mean[ch], fm_mean, m) for m in TR_METRICS}
            rows = [(b, c, fm_of(b)) for b, c in _pairs(arms["base"], arms[ch]) if fm_of(b)]
            r["tr_per_pair"][ch] = {m: summarize(transfer_ratio(b, c, f, m) for b, c, f in rows) for m in TR_METRICS}
        if "kd" in arms and "kd_loopfm" in arms:
            rows = [(b, k, both, fm_of(b)) for b, k, both in _pairs(arms["base"], arms["kd"], arms["kd_loopfm"])]
            r["tr_double"] = paired(transfer_ratio(b, both, f, "ne")
                                    - TR_DOUBLE_THRESHOLD * transfer_ratio(b, k, f, "ne")
                                    for b, k, both, f in rows if f)
    else:
        notes.append("TR not computed: needs the base arm and FM metrics")

    four = ("base", "kd", "loopfm", "kd_loopfm")
    if all(a in arms for a in four):
        for m in ("auc", "ne"):
            g = {k: improvement(mean["base"], mean[a], m) for k, a in
                 (("gain_kd", "kd"), ("gain_loopfm", "loopfm"), ("gain_both", "kd_loopfm"))}
            r["decomposition"][m] = {**g, "interaction": g["gain_both"] - g["gain_kd"] - g["gain_loopfm"]}
            r["interaction"][m] = paired(improvement(b, both, m) - improvement(b, k, m) - improvement(b, lf, m)
                                         for b, k, lf, both in _pairs(*(arms[a] for a in four)))
    r["fm_knowledge"] = {k: r["comparisons"][k] for k in FM_KNOWLEDGE if k in r["comparisons"]}
    r["claims"] = _claims(r)
    return r


def build_verticals_report(reports: Mapping[int, Mapping], meta: Mapping[str, Any]) -> dict:
    """The report over several verticals: each vertical's own `build_report` (under `verticals`,
    keyed by the vertical) and `summary`, one row per vertical: its test examples, AUC of each arm
    and of the FM, the paired ΔAUC of SUMMARY_COMPARISONS, TR on NE of SUMMARY_CHANNELS, and how
    many of its claims hold."""
    summary = []
    for v, r in reports.items():
        summary.append({
            "vertical": int(v), "test_examples": r.get("meta", {}).get("test_examples"),
            "auc": {a: s["auc"]["mean"] for a, s in r["arms"].items()},
            "fm_auc": r["fm"]["auc"]["mean"] if r["fm"] else NAN,
            "comparisons": {k: r["comparisons"][k]["auc"] for k in SUMMARY_COMPARISONS if k in r["comparisons"]},
            "tr_ne": {ch: r["tr"][ch]["ne"] for ch in SUMMARY_CHANNELS if ch in r["tr"]},
            "claims_holding": sum(c["holds"] for c in r["claims"]), "claims": len(r["claims"]),
        })
    return {"meta": dict(meta), "summary": summary, "verticals": {int(v): dict(r) for v, r in reports.items()}}


# ---------------------------------------------------------------- writing

def _clean(x: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so report.json is strict JSON."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def to_json(report: Mapping) -> str:
    """Strict JSON (undefined values as null)."""
    return json.dumps(_clean(report), indent=2, allow_nan=False)


def _f(x: Any, nd: int = 4) -> str:
    return "n/a" if x is None or _nan(float(x)) else f"{float(x):.{nd}f}"


def _ms(s: Mapping, nd: int = 4) -> str:
    """mean ± std; the mean alone for a single value (a std of 0 there would claim precision)."""
    if not s.get("n"):
        return "n/a"
    return _f(s["mean"], nd) if s["n"] == 1 else f"{_f(s['mean'], nd)} ± {_f(s['std'], nd)}"


def _pv(p: Any) -> str:
    return "n/a" if p is None or _nan(float(p)) else f"{float(p):.3g}"


def _ci(s: Mapping, nd: int = 4) -> str:
    lo, hi = s.get("ci95", [NAN, NAN])
    return "n/a" if _nan(lo, hi) else f"[{_f(lo, nd)}, {_f(hi, nd)}]"


def _comparison_row(key: str, ev: Mapping) -> str:
    """'| arm vs other | ΔAUC | CI | p | ΔNE | CI | p |' of one paired comparison."""
    a, b = COMPARISONS.get(key) or key.split("_vs_", 1)
    return (f"| {LABELS.get(a, a)} vs {LABELS.get(b, b)} | {_f(ev['auc']['mean'], 5)} | {_ci(ev['auc'], 5)} | "
            f"{_pv(ev['auc']['p'])} | {_f(ev['ne']['mean'], 5)} | {_ci(ev['ne'], 5)} | {_pv(ev['ne']['p'])} |")


def _markdown(r: Mapping) -> str:
    L = ["# LoopFM experiment report", ""]
    for k, v in r.get("meta", {}).items():
        L.append(f"- **{k}**: {json.dumps(_clean(v)) if isinstance(v, (Mapping, list, tuple)) else v}")
    L += ["", "## Test metrics (mean ± std over FM replicates x VM seeds; 95% CI of the mean)", "",
          "| arm | " + " | ".join(m.upper() for m in METRICS) + " | AUC 95% CI | runs |",
          "|---|" + "---:|" * (len(METRICS) + 2)]
    rows = [(LABELS.get(a, a), s) for a, s in r["arms"].items()] + ([("FM", r["fm"])] if r["fm"] else [])
    for name, s in rows:
        L.append(f"| {name} | " + " | ".join(_ms(s[m]) for m in METRICS) + f" | {_ci(s['auc'])} | {s['auc']['n']} |")
    L += ["", "NE is log loss over the entropy of the label rate: lower is better.", ""]
    if r.get("fm_knowledge"):
        L += ["## FM knowledge over raw history", "",
              "The LoopFM sequence against the same slots (same L, surfaces, lag, retention) filled with raw "
              "tokens the VM embeds itself: what the FM's embeddings add beyond access to the history.", "",
              "| comparison | ΔAUC | 95% CI | p | ΔNE (positive = better) | 95% CI | p | pairs |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        L += [_comparison_row(k, ev) + f" {ev['auc']['n']} |" for k, ev in r["fm_knowledge"].items()] + [""]
    if r["tr"]:
        L += ["## Transfer ratio", "",
              "TR = the channel's gain over the base VM / the FM's gain over the base VM (1 = all of the "
              "FM's advantage). From per-arm means, and pair by pair (mean and 95% CI).", "",
              "| channel | TR (NE) | TR (AUC) | per pair (NE) | 95% CI | per pair (AUC) | 95% CI |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for ch, t in r["tr"].items():
            ps = r["tr_per_pair"].get(ch, {})
            L.append(f"| {LABELS.get(ch, ch)} | {_f(t['ne'], 3)} | {_f(t['auc'], 3)} | "
                     f"{_ms(ps.get('ne', {}), 3)} | {_ci(ps.get('ne', {}), 3)} | {_ms(ps.get('auc', {}), 3)} | "
                     f"{_ci(ps.get('auc', {}), 3)} |")
        L.append("")
    if r["decomposition"]:
        L += ["## Gain decomposition (positive = better)", "",
              "| metric | gain_kd | gain_loopfm | gain_both | interaction | interaction 95% CI | p |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for m, d in r["decomposition"].items():
            it = r["interaction"][m]
            L.append(f"| {m.upper()} | " + " | ".join(_f(d[k], 5) for k in ("gain_kd", "gain_loopfm", "gain_both",
                                                                            "interaction"))
                     + f" | {_ci(it, 5)} | {_pv(it['p'])} |")
        L.append("")
    if r["comparisons"]:
        L += ["## Paired comparisons (difference = arm minus the other, positive = better)", "",
              "| comparison | ΔAUC | 95% CI | p | ΔNE | 95% CI | p |", "|---|---:|---:|---:|---:|---:|---:|"]
        L += [_comparison_row(k, ev) for k, ev in r["comparisons"].items()]
        L += ["", "p: two-sided paired t-test over the (FM replicate, VM seed) pairs; n/a below 2 pairs.", ""]
    L += ["## Claims", "",
          f"A claim holds only when its paired test gives p < {ALPHA} in the claimed direction; otherwise it is "
          "not shown (or reversed, when significant the other way). The numbers are kept either way.", ""]
    marks = {"holds": "✓ holds", "not shown": "– not shown", "reversed": "✗ reversed", "not computed": "· not computed"}
    for c in r["claims"]:
        L.append(f"- **{marks[c['verdict']]}**: {c['claim']}: {c['evidence']}")
    if r.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(L) + "\n"


def _figure(ncols: int, width: float = 5.0) -> tuple[Figure, list]:
    """A pyplot-free figure: no global backend state, safe inside Ray workers and threads."""
    fig = Figure(figsize=(width * ncols, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _zoom(ax, lows: list, highs: list) -> None:
    lo, hi = np.nanmin(lows), np.nanmax(highs)
    if np.isfinite(lo) and np.isfinite(hi):
        pad = 0.2 * (hi - lo) or 0.01
        ax.set_ylim(lo - pad, hi + pad)


def _plot_arms(r: Mapping, path: Path) -> Path:
    fig, axes = _figure(2)
    names = list(r["arms"])
    x = np.arange(len(names))
    for ax, m in zip(axes, ("auc", "ne")):
        mu = np.array([r["arms"][a][m]["mean"] for a in names], float)
        sd = np.nan_to_num(np.array([r["arms"][a][m]["std"] for a in names], float))
        ax.bar(x, mu, yerr=sd, capsize=4, color="#4C72B0")
        lows, highs = list(mu - sd), list(mu + sd)
        fm = r["fm"].get(m, {}).get("mean") if r["fm"] else None
        if fm is not None and not _nan(fm):
            ax.axhline(fm, ls="--", color="#C44E52", label=f"FM {fm:.4f}")
            ax.legend(loc="best")
            lows.append(fm)
            highs.append(fm)
        _zoom(ax, lows, highs)
        ax.set_xticks(x, [LABELS.get(a, a) for a in names], rotation=20)
        ax.set_title(f"{m.upper()} ({'higher' if m == 'auc' else 'lower'} is better)")
    return _save(fig, path)


def _plot_transfer(r: Mapping, path: Path) -> Path:
    fig, (ax,) = _figure(1, 6.0)
    chans = list(r["tr"])
    x = np.arange(len(chans))
    for i, m in enumerate(TR_METRICS):
        mu = [r["tr"][c][m] for c in chans]
        sd = np.nan_to_num([r["tr_per_pair"].get(c, {}).get(m, {}).get("std", 0.0) for c in chans])
        ax.bar(x + (i - 0.5) * 0.38, mu, width=0.38, yerr=sd, capsize=4, label=f"TR on {m.upper()}")
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, ls="--", color="#C44E52", label="FM (TR = 1)")
    ax.set_xticks(x, [LABELS.get(c, c) for c in chans])
    ax.set_title("Transfer ratio per channel (bars: from means; whiskers: per-pair std)", fontsize=10)
    ax.legend(loc="best")
    return _save(fig, path)


def write_report(report: Mapping, out_dir: Path) -> list[Path]:
    """report.json, report.md, arms.png and (when any TR exists) transfer.png; each written atomically."""
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write_text(out / "report.json", to_json(report)),
        atomic_write_text(out / "report.md", _markdown(report)),
    ]
    if report["arms"]:
        paths.append(_plot_arms(report, out / "arms.png"))
    if report["tr"]:
        paths.append(_plot_transfer(report, out / "transfer.png"))
    return paths


def _summary_markdown(report: Mapping) -> list[str]:
    """The table across verticals: one row per vertical, AUC columns for every arm any of them ran."""
    rows = report["summary"]
    arms = _ordered({a: None for row in rows for a in row["auc"]})
    pairs = [k for k in SUMMARY_COMPARISONS if any(k in row["comparisons"] for row in rows)]
    channels = [c for c in SUMMARY_CHANNELS if any(c in row["tr_ne"] for row in rows)]
    names = [f"{LABELS.get(COMPARISONS[k][0])} vs {LABELS.get(COMPARISONS[k][1])} ΔAUC (p)" for k in pairs]
    head = (["vertical", "test examples"] + [f"{LABELS.get(a, a)} AUC" for a in arms] + ["FM AUC"] + names
            + [f"TR NE {LABELS.get(c, c)}" for c in channels] + ["claims holding"])
    L = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cmp = row["comparisons"]
        cells = ([str(row["vertical"]), f"{row['test_examples']:,}" if row["test_examples"] is not None else "n/a"]
                 + [_f(row["auc"].get(a)) for a in arms] + [_f(row["fm_auc"])]
                 + [f"{_f(cmp[k]['mean'], 5)} ({_pv(cmp[k]['p'])})" if k in cmp else "n/a" for k in pairs]
                 + [_f(row["tr_ne"].get(c), 3) for c in channels]
                 + [f"{row['claims_holding']} of {row['claims']}"])
        L.append("| " + " | ".join(cells) + " |")
    return L


def _plot_verticals(report: Mapping, path: Path) -> Path:
    """Per vertical, the paired ΔAUC of each summary comparison with its 95% CI: which channels help
    on which surface, read off one figure."""
    rows = report["summary"]
    pairs = [k for k in SUMMARY_COMPARISONS if any(k in row["comparisons"] for row in rows)]
    fig, (ax,) = _figure(1, max(6.0, 1.6 * len(rows) * max(len(pairs), 1)))
    x, width = np.arange(len(rows)), 0.8 / max(len(pairs), 1)
    for i, k in enumerate(pairs):
        cmp = [row["comparisons"].get(k, {"mean": NAN, "ci95": [NAN, NAN]}) for row in rows]
        mu = np.array([c["mean"] for c in cmp], float)
        lo, hi = (np.array([c["ci95"][j] for c in cmp], float) for j in (0, 1))
        err = np.nan_to_num(np.vstack([mu - lo, hi - mu]))
        arm, against = COMPARISONS[k]
        ax.bar(x + (i - (len(pairs) - 1) / 2) * width, mu, width=width, yerr=err, capsize=4,
               label=f"{LABELS.get(arm, arm)} - {LABELS.get(against, against)}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [f"vertical {row['vertical']}" for row in rows])
    ax.set_ylabel("paired ΔAUC (positive: first is better)")
    ax.set_title("Across verticals: paired ΔAUC per comparison (whiskers: 95% CI)", fontsize=10)
    if pairs:  # a report whose arms give no summary comparison draws only the zero line
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _verticals_markdown(report: Mapping) -> str:
    """One document: the meta, the summary across verticals, then each vertical's own report as a
    section (its headings one level down, its plots linked from its folder)."""
    L = [f"# LoopFM experiment report: {len(report['verticals'])} verticals, one FM store", ""]
    for k, v in report.get("meta", {}).items():
        L.append(f"- **{k}**: {json.dumps(_clean(v)) if isinstance(v, (Mapping, list, tuple)) else v}")
    L += ["", "## Across verticals", "",
          "Each replicate's one FM and store serve every vertical; each vertical has its own features, VMs "
          "(`vm/<arm>/seed<k>-<fingerprint>/`, the manifest naming the vertical) and report (its section below, "
          f"and `{VERTICAL_DIR}<v>/`). ΔAUC: paired, arm minus the other (positive = better); p: paired t-test.",
          "", *_summary_markdown(report), "", f"![paired ΔAUC per vertical]({VERTICALS_PLOT})", ""]
    for v, r in report["verticals"].items():
        folder = f"{VERTICAL_DIR}{v}"
        L += [f"## Vertical {v}", "", f"Its files: `{folder}/` (report.json, report.md, plots).", ""]
        if r["arms"]:
            L.append(f"![arms, vertical {v}]({folder}/arms.png)")
        if r["tr"]:
            L.append(f"![transfer, vertical {v}]({folder}/transfer.png)")
        body = _markdown(r).splitlines()[1:]  # without its own title: the section heading says it
        L += ["#" + line if line.startswith("#") else line for line in body]
    return "\n".join(L) + "\n"


def write_verticals_report(report: Mapping, out_dir: Path) -> list[Path]:
    """Each vertical's report in `<out_dir>/vertical<v>/` (as `write_report` writes one), then
    report.json (every vertical and the summary) and report.md (all of it) in `out_dir`."""
    out = as_path(out_dir)
    paths = [p for v, r in report["verticals"].items() for p in write_report(r, out / f"{VERTICAL_DIR}{v}")]
    return [atomic_write_text(out / "report.json", to_json(report)),
            atomic_write_text(out / "report.md", _verticals_markdown(report)),
            _plot_verticals(report, out / VERTICALS_PLOT), *paths]


def write_ablation(rows: Sequence[Mapping], key: str, out_dir: Path, name: str,
                   metrics: Sequence[str] = ("auc", "ne"), comparisons: Optional[Mapping] = None) -> list[Path]:
    """A metric-vs-setting table (<name>.md, <name>.json) and plot (<name>.png).

    Each row holds `key` (the ablated setting: pooling, seq_len, layer set...) and, per metric,
    either a float or a `summarize` dict (mean/std over seeds). Rows are plotted in the given
    order, as categories, so numeric and named settings read the same way. `comparisons`:
    `{"b_vs_a": {"auc": paired(...), "ne": paired(...)}}`, seed-paired differences (positive: b is
    better), tabled with their CIs and p-values under the rows.
    """
    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in metrics if any(m in row for row in rows)]

    def ms(row: Mapping, m: str) -> tuple[float, float]:
        v = row.get(m)
        if isinstance(v, Mapping):
            return float(v.get("mean", NAN)), float(v.get("std") or 0.0)
        return (NAN if v is None else float(v)), 0.0

    def cell(row: Mapping, m: str) -> str:
        mu, sd = ms(row, m)
        return _ms({"mean": mu, "std": sd, "n": 2 if isinstance(row.get(m), Mapping) else 1})

    L = [f"# Ablation: {key}", "", f"| {key} | " + " | ".join(m.upper() for m in metrics) + " |",
         "|---|" + "---:|" * len(metrics)]
    for row in rows:
        L.append(f"| {row.get(key)} | " + " | ".join(cell(row, m) for m in metrics) + " |")
    if comparisons:
        L += ["", "Paired over seeds (positive: the first is better; NE improvement = lower NE):", "",
              "| comparison | ΔAUC | 95% CI | p | ΔNE | 95% CI | p |", "|---|---:|---|---:|---:|---|---:|"]
        L += [_comparison_row(k, ev) for k, ev in comparisons.items()]
    body = {"key": key, "rows": list(rows), **({"comparisons": dict(comparisons)} if comparisons else {})}
    paths = [atomic_write_text(out / f"{name}.md", "\n".join(L) + "\n"),
             atomic_write_text(out / f"{name}.json", json.dumps(_clean(body), indent=2, allow_nan=False))]
    fig, axes = _figure(max(len(metrics), 1), 4.5)
    x = np.arange(len(rows))
    for ax, m in zip(axes, metrics):
        mu, sd = zip(*(ms(row, m) for row in rows)) if rows else ((), ())
        ax.errorbar(x, mu, yerr=sd, marker="o", capsize=4)
        ax.set_xticks(x, [str(row.get(key)) for row in rows])
        ax.set_xlabel(key)
        ax.set_title(m.upper())
    paths.append(_save(fig, out / f"{name}.png"))
    return paths
