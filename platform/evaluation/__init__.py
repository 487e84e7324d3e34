"""Metrics, transfer ratios, gain decomposition, paired tests, the report and its plots.

Pure numpy/scipy/pandas/matplotlib (pyplot-free Agg): importable in any Ray worker, no torch.
Re-exports are lazy so a training loop importing the metrics does not pay for matplotlib.
"""

import importlib

_EXPORTS = {
    "metrics": ("MetricAccumulator", "auc", "evaluate", "gauc", "logloss", "ne"),
    "transfer": ("gain_decomposition", "improvement", "paired_ttest", "summarize", "transfer_ratio"),
    "report": ("build_report", "write_ablation", "write_report"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
