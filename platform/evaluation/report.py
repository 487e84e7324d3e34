"""The experiment report: per-arm metrics over seeds, TR, gain decomposition, paired tests, claims.

`build_report` is pure (dicts in, a JSON-able dict out) so it is tested on fabricated numbers;
`write_report` renders it to report.json, report.md and PNGs. Seeds are paired: seed k of
every arm saw the same data order and initialisation seed, so comparisons use paired tests.
Anything that cannot be computed (an arm not run, a one-class metric) is skipped and said so
in `notes` and in the claims, never a crash: partial experiments still get a report.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .transfer import ARMS, CHANNELS, gain_decomposition, improvement, paired_ttest, summarize, transfer_ratio

__all__ = ["METRICS", "LABELS", "build_report", "write_report", "write_ablation", "to_json"]

METRICS = ("auc", "gauc", "logloss", "ne")
TR_METRICS = ("ne", "auc")
LABELS = {"base": "base VM", "kd": "+KD", "loopfm": "+LoopFM", "kd_loopfm": "+KD+LoopFM", "fm": "FM"}
P_PAIRS = {
    "kd_vs_base": ("kd", "base"),
    "loopfm_vs_base": ("loopfm", "base"),
    "kd_loopfm_vs_base": ("kd_loopfm", "base"),
    "kd_loopfm_vs_kd": ("kd_loopfm", "kd"),
    "loopfm_vs_kd": ("loopfm", "kd"),
}
TR_DOUBLE_THRESHOLD = 1.5  # "about twice": TR(kd_loopfm) >= 1.5 x TR(kd)
NAN = float("nan")


# ---------------------------------------------------------------- building

def _align(*runs: Sequence[Mapping]) -> list[tuple]:
    """Pair per-seed dicts: by their "seed" key when every dict has one, else by position."""
    if all("seed" in d for r in runs for d in r):
        by = [{d["seed"]: d for d in r} for r in runs]
        return [tuple(b[s] for b in by) for s in by[0] if all(s in b for b in by[1:])]
    return list(zip(*runs))


def _get(d: Mapping, metric: str) -> float:
    v = d.get(metric)
    return NAN if v is None else float(v)


def _ordered(arms: Mapping) -> list[str]:
    return [a for a in ARMS if a in arms] + [a for a in arms if a not in ARMS]


def _nan(*xs: float) -> bool:
    return any(x is None or math.isnan(x) for x in xs)


def _claim(text: str, holds: Optional[bool], evidence: str) -> dict:
    """`computed` is False when inputs were missing; then `holds` is False and evidence says why."""
    return {"claim": text, "holds": bool(holds), "computed": holds is not None, "evidence": evidence}


def _p(report: dict, key: str, metric: str) -> str:
    p = report["p_values"].get(key, {}).get(metric, NAN)
    return "paired p n/a" if _nan(p) else f"paired p={p:.3g}"


def _claims(r: dict) -> list[dict]:
    mean = {a: {m: s["mean"] for m, s in ms.items()} for a, ms in r["arms"].items()}
    fm = {m: s["mean"] for m, s in r["fm"].items()}
    out = []

    def beats(a: str, b: str, text: str, key: str) -> None:
        if a not in mean or b not in mean:
            out.append(_claim(text, None, f"not computed: arm {a if a not in mean else b!r} missing"))
        elif _nan(mean[a]["auc"], mean[b]["auc"]):
            out.append(_claim(text, None, "not computed: AUC undefined"))
        else:
            d = improvement(mean[b], mean[a], "auc")
            ev = f"AUC {mean[a]['auc']:.4f} vs {mean[b]['auc']:.4f} ({d:+.4f}), {_p(r, key, 'auc')}"
            out.append(_claim(text, d > 0, ev))

    text = "FM beats the base VM (AUC)"
    if not fm or "base" not in mean or _nan(fm["auc"], mean["base"]["auc"]):
        out.append(_claim(text, None, "not computed: FM or base metrics missing"))
    else:
        d = fm["auc"] - mean["base"]["auc"]
        out.append(_claim(text, d > 0, f"AUC {fm['auc']:.4f} vs {mean['base']['auc']:.4f} ({d:+.4f})"))

    beats("loopfm", "base", "+LoopFM beats the base VM (AUC)", "loopfm_vs_base")
    beats("loopfm", "kd", "+LoopFM beats +KD (AUC)", "loopfm_vs_kd")

    text = "+KD+LoopFM is at least as good as +KD and as +LoopFM alone (AUC)"
    need = [a for a in ("kd", "loopfm", "kd_loopfm") if a not in mean]
    if need or _nan(*(mean[a]["auc"] for a in ("kd", "loopfm", "kd_loopfm"))):
        out.append(_claim(text, None, f"not computed: missing {need or 'AUC'}"))
    else:
        both, kd, lf = (mean[a]["auc"] for a in ("kd_loopfm", "kd", "loopfm"))
        ev = f"AUC {both:.4f} vs +KD {kd:.4f}, +LoopFM {lf:.4f}; {_p(r, 'kd_loopfm_vs_kd', 'auc')} vs +KD"
        out.append(_claim(text, both >= kd and both >= lf, ev))

    text = "KD and LoopFM are complementary: gain_both > max(gain_kd, gain_loopfm) (AUC)"
    dec = r["decomposition"].get("auc")
    if dec is None or _nan(*dec.values()):
        out.append(_claim(text, None, "not computed: needs all four arms (base, kd, loopfm, kd_loopfm)"))
    else:
        ev = (f"gain_both {dec['gain_both']:+.4f}, gain_kd {dec['gain_kd']:+.4f}, "
              f"gain_loopfm {dec['gain_loopfm']:+.4f}, interaction {dec['interaction']:+.4f}")
        out.append(_claim(text, dec["gain_both"] > max(dec["gain_kd"], dec["gain_loopfm"]), ev))

    text = f"TR(+KD+LoopFM) is about twice TR(+KD) on NE (holds at ratio >= {TR_DOUBLE_THRESHOLD})"
    tr_kd, tr_both = (r["tr"].get(c, {}).get("ne", NAN) for c in ("kd", "kd_loopfm"))
    if _nan(tr_kd, tr_both):
        out.append(_claim(text, None, "not computed: TR(+KD) or TR(+KD+LoopFM) missing or undefined"))
    else:
        ratio = tr_both / tr_kd if tr_kd != 0 else NAN
        rs = "undefined (TR(+KD) <= 0)" if tr_kd <= 0 else f"{ratio:.2f}"
        ev = f"TR_NE +KD {tr_kd:.3f}, +KD+LoopFM {tr_both:.3f}, ratio {rs} (paper: about 2)"
        # One rule for both signs of TR(+KD): both > 0 and both >= 1.5 x kd.
        out.append(_claim(text, tr_both > 0 and tr_both >= TR_DOUBLE_THRESHOLD * tr_kd, ev))
    return out


def build_report(arms: Mapping[str, Sequence[Mapping]], fm: Sequence[Mapping] | Mapping | None,
                 meta: Mapping[str, Any]) -> dict:
    """Summaries, TR (from per-arm means, and seed by seed), decomposition, p-values and claims.

    `arms[arm]` are per-seed metric dicts (paired across arms by a "seed" key when present,
    else by position); `fm` is the FM's test metrics (one dict, or one per seed).
    """
    arms = {a: list(arms[a]) for a in _ordered(arms) if arms[a]}
    fm_runs = [fm] if isinstance(fm, Mapping) else list(fm or [])
    notes: list[str] = [f"arm {a!r} not run" for a in ARMS if a not in arms]
    r: dict[str, Any] = {
        "meta": dict(meta),
        "arms": {a: {m: summarize(_get(d, m) for d in runs) for m in METRICS} for a, runs in arms.items()},
        "fm": {m: summarize(_get(d, m) for d in fm_runs) for m in METRICS} if fm_runs else {},
        "tr": {}, "tr_per_seed": {}, "decomposition": {}, "p_values": {}, "notes": notes,
    }
    mean = {a: {m: s["mean"] for m, s in ms.items()} for a, ms in r["arms"].items()}
    fm_mean = {m: s["mean"] for m, s in r["fm"].items()}

    if "base" in arms and fm_runs:
        for ch in (c for c in CHANNELS if c in arms):
            r["tr"][ch] = {m: transfer_ratio(mean["base"], mean[ch], fm_mean, m) for m in TR_METRICS}
            if len(fm_runs) == 1:
                rows = [(b, c, fm_runs[0]) for b, c in _align(arms["base"], arms[ch])]
            else:
                rows = _align(arms["base"], arms[ch], fm_runs)
            r["tr_per_seed"][ch] = {m: summarize(transfer_ratio(b, c, f, m) for b, c, f in rows) for m in TR_METRICS}
    else:
        notes.append("TR not computed: needs the base arm and FM metrics")

    if all(a in arms for a in ARMS):
        r["decomposition"] = {m: gain_decomposition(*(mean[a] for a in ARMS), m) for m in ("auc", "ne")}

    for key, (a, b) in P_PAIRS.items():
        if a in arms and b in arms:
            pairs = _align(arms[a], arms[b])
            if len(pairs) < min(len(arms[a]), len(arms[b])):
                notes.append(f"{key}: only {len(pairs)} seeds pair up")
            r["p_values"][key] = {m: paired_ttest([_get(x, m) for x, _ in pairs], [_get(y, m) for _, y in pairs])
                                  for m in ("auc", "ne")}
    r["claims"] = _claims(r)
    return r


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


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write to a hidden temp name beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _f(x: Any, nd: int = 4) -> str:
    return "n/a" if x is None or _nan(float(x)) else f"{float(x):.{nd}f}"


def _ms(s: Mapping, nd: int = 4) -> str:
    """mean ± std; the mean alone for a single value (a std of 0 there would claim precision)."""
    if not s.get("n"):
        return "n/a"
    return _f(s["mean"], nd) if s["n"] == 1 else f"{_f(s['mean'], nd)} ± {_f(s['std'], nd)}"


def _pv(p: Any) -> str:
    return "n/a" if p is None or _nan(float(p)) else f"{float(p):.3g}"


def _markdown(r: Mapping) -> str:
    L = ["# LoopFM experiment report", ""]
    for k, v in r.get("meta", {}).items():
        L.append(f"- **{k}**: {json.dumps(_clean(v)) if isinstance(v, (Mapping, list, tuple)) else v}")
    L += ["", "## Test metrics (mean ± std over seeds)", "",
          "| arm | " + " | ".join(m.upper() for m in METRICS) + " | seeds |",
          "|---|" + "---:|" * (len(METRICS) + 1)]
    rows = [(LABELS.get(a, a), s) for a, s in r["arms"].items()] + ([("FM", r["fm"])] if r["fm"] else [])
    for name, s in rows:
        L.append(f"| {name} | " + " | ".join(_ms(s[m]) for m in METRICS) + f" | {s['auc']['n']} |")
    L += ["", "NE is log loss over the entropy of the label rate: lower is better.", ""]
    if r["tr"]:
        L += ["## Transfer ratio", "",
              "TR = the channel's gain over the base VM / the FM's gain over the base VM (1 = all of the "
              "FM's advantage). From per-arm means, and seed by seed (mean ± std).", "",
              "| channel | TR (NE) | TR (AUC) | per seed (NE) | per seed (AUC) |", "|---|---:|---:|---:|---:|"]
        for ch, t in r["tr"].items():
            ps = r["tr_per_seed"].get(ch, {})
            L.append(f"| {LABELS.get(ch, ch)} | {_f(t['ne'], 3)} | {_f(t['auc'], 3)} | "
                     f"{_ms(ps.get('ne', {}), 3)} | {_ms(ps.get('auc', {}), 3)} |")
        L.append("")
    if r["decomposition"]:
        L += ["## Gain decomposition (positive = better)", "",
              "| metric | gain_kd | gain_loopfm | gain_both | interaction |", "|---|---:|---:|---:|---:|"]
        for m, d in r["decomposition"].items():
            L.append(f"| {m.upper()} | " + " | ".join(_f(d[k], 5) for k in
                                                      ("gain_kd", "gain_loopfm", "gain_both", "interaction")) + " |")
        L.append("")
    if r["p_values"]:
        L += ["## Paired t-tests across seeds (two-sided p)", "", "| comparison | AUC | NE |", "|---|---:|---:|"]
        for k, p in r["p_values"].items():
            a, b = P_PAIRS.get(k, (k, ""))
            L.append(f"| {LABELS.get(a, a)} vs {LABELS.get(b, b)} | {_pv(p['auc'])} | {_pv(p['ne'])} |")
        L += ["", "n/a: fewer than 2 paired seeds, or every seed moved by exactly the same amount.", ""]
    L += ["## Claims", "", "A claim is judged on the seed means; the paired p-value says how sure that is.", ""]
    for c in r["claims"]:
        mark = "✓" if c["holds"] else ("✗" if c.get("computed", True) else "–")
        L.append(f"- {mark} {c['claim']}: {c['evidence']}")
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
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


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
        ax.set_xticks(x, [LABELS.get(a, a) for a in names])
        ax.set_title(f"{m.upper()} ({'higher' if m == 'auc' else 'lower'} is better)")
    return _save(fig, path)


def _plot_transfer(r: Mapping, path: Path) -> Path:
    fig, (ax,) = _figure(1, 6.0)
    chans = list(r["tr"])
    x = np.arange(len(chans))
    for i, m in enumerate(TR_METRICS):
        mu = [r["tr"][c][m] for c in chans]
        sd = np.nan_to_num([r["tr_per_seed"].get(c, {}).get(m, {}).get("std", 0.0) for c in chans])
        ax.bar(x + (i - 0.5) * 0.38, mu, width=0.38, yerr=sd, capsize=4, label=f"TR on {m.upper()}")
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, ls="--", color="#C44E52", label="FM (TR = 1)")
    ax.set_xticks(x, [LABELS.get(c, c) for c in chans])
    ax.set_title("Transfer ratio per channel (bars: from means; whiskers: per-seed std)", fontsize=10)
    ax.legend(loc="best")
    return _save(fig, path)


def write_report(report: Mapping, out_dir: Path) -> list[Path]:
    """report.json, report.md, arms.png and (when any TR exists) transfer.png; each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _atomic(out / "report.json", lambda p: p.write_text(to_json(report), encoding="utf-8")),
        _atomic(out / "report.md", lambda p: p.write_text(_markdown(report), encoding="utf-8")),
    ]
    if report["arms"]:
        paths.append(_plot_arms(report, out / "arms.png"))
    if report["tr"]:
        paths.append(_plot_transfer(report, out / "transfer.png"))
    return paths


def write_ablation(rows: Sequence[Mapping], key: str, out_dir: Path, name: str,
                   metrics: Sequence[str] = ("auc", "ne")) -> list[Path]:
    """A metric-vs-setting table (<name>.md, <name>.json) and plot (<name>.png).

    Each row holds `key` (the ablated setting: pooling, seq_len, layer set...) and, per metric,
    either a float or a `summarize` dict (mean/std over seeds). Rows are plotted in the given
    order, as categories, so numeric and named settings read the same way.
    """
    out = Path(out_dir)
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
    paths = [_atomic(out / f"{name}.md", lambda p: p.write_text("\n".join(L) + "\n", encoding="utf-8")),
             _atomic(out / f"{name}.json",
                     lambda p: p.write_text(json.dumps(_clean({"key": key, "rows": list(rows)}), indent=2,
                                                       allow_nan=False), encoding="utf-8"))]
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
