"""Peers harness: outside CTR models on the very test events the platform's VMs are scored on.

    python benchmarks/peers.py --config CFG --out RUN_DIR [--seeds 3] [--quick]

Why: a VM's AUC means little without peers a ranking engineer would try first. On the run's own
`data/splits/{train,valid,test}`, restricted to the config's vertical (`data.vertical`: exactly the
VM's test events), this fits

  1. logistic regression (scikit-learn) on one-hot user and item ids;
  2. the same plus point-in-time counters (peers_features.py, an implementation independent of the
     pipeline's join): user smoothed positive rate overall and over the last 20 events, log1p of
     the user's past events, the item's past impressions (log1p) and smoothed CTR, each from the
     vertical's events with ts strictly before the event's (ties excluded), over train + valid +
     test in time order (history crosses split boundaries, as in serving);
  3. FuxiCTR 2.3.10 DeepFM on (user, item, category) and DIN (target attention over the user's
     last 20 positive items and their categories, strictly earlier, same tie rule). The wheel ships
     no DeepFM, and its DIN (model_zoo/LongCTR) expects another data pipeline, so both are composed
     here from the wheel's own blocks the way FuxiCTR builds them, trained by FuxiCTR's BaseModel
     (Adam, early stopping on valid AUC, best epoch kept) on its npz loader.

Everything is fitted on train; C, the grid setting and the epoch are picked on valid AUC only; test
is scored once per fitted model. FuxiCTR's picked setting is rerun on `--seeds` seeds (mean ± std).
NE = test log loss / entropy of the train positive rate (the base-rate predictor a model must beat
is the one known at training time); "NE (test rate)" normalizes by the test rate instead, as
`loopfm.evaluation.metrics.ne` and the platform's report do.

Writes docs/results/peers_<config name>.md and benchmarks/results/peers_<config name>.json.
Needs the optional extra: `pip install -c requirements/constraints.txt -e ".[peers]"`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import fuxictr
import numpy as np
import pandas as pd
import peers_features as pf  # this folder is on sys.path when the script runs
import pyarrow.parquet as pq
import scipy.sparse as sp
import sklearn
import torch
from fuxictr.features import FeatureMap
from fuxictr.pytorch.dataloaders.npz_dataloader import NpzDataLoader
from fuxictr.pytorch.layers import (
    DIN_Attention,
    FactorizationMachine,
    FeatureEmbedding,
    FeatureEmbeddingDict,
    MLP_Block,
)
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from loopfm.config import LoopFMConfig, load_config
from loopfm.datasets.schema import SPLITS
from loopfm.datasets.splits import SplitInfo
from loopfm.evaluation.metrics import auc, entropy, logloss
from loopfm.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["event_id", "user_id", "item_id", "category", "surface", "ts", "label",
           "user_id_idx", "item_id_idx", "category_idx"]
MODELS = ("logreg", "deepfm", "din")
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FUXI_GRID = [  # FuxiCTR's usual knobs: embedding size and the embedding L2 (its `embedding_regularizer`)
    {"embedding_dim": 16, "embedding_regularizer": 1e-5},
    {"embedding_dim": 16, "embedding_regularizer": 1e-3},
    {"embedding_dim": 32, "embedding_regularizer": 1e-5},
    {"embedding_dim": 32, "embedding_regularizer": 1e-3},
]
FUXI_TRAINING = {"learning_rate": 1e-3, "batch_size": 1024, "epochs": 10, "early_stop_patience": 2}
# FuxiCTR's DeepFM defaults
DEEPFM_DEFAULTS = {"hidden_units": [64, 64, 64], "hidden_activations": "ReLU", "net_dropout": 0.0}
# its DIN defaults
DIN_DEFAULTS = {"dnn_hidden_units": [512, 128, 64], "dnn_activations": "ReLU", "attention_hidden_units": [64],
                "attention_hidden_activations": "Dice", "din_use_softmax": False, "net_dropout": 0.0}


# -- data -------------------------------------------------------------------------------------


def read_split(run: RunDir, name: str, vertical: int) -> pd.DataFrame:
    """One split's events on the vertical (the VM's events), with their vocabulary indices."""
    folder = run.splits / name
    parts = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not parts:
        raise SystemExit(f"no parquet files in {folder}: run `loopfm data split` first")
    frame = pd.concat([pq.read_table(p, columns=COLUMNS).to_pandas() for p in parts], ignore_index=True)
    return frame[frame["surface"] == vertical].sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def add_history(splits: dict[str, pd.DataFrame], prior: float) -> None:
    """Point-in-time counters and DIN's positive history, computed over all splits together."""
    events = pd.concat([splits[s].assign(_split=s) for s in SPLITS], ignore_index=True)
    counters = pf.point_in_time_features(events, prior)
    items, categories = pf.positive_history(events["user_id"].to_numpy(), events["ts"].to_numpy(),
                                            events["label"].to_numpy(),
                                            [events["item_id_idx"].to_numpy(), events["category_idx"].to_numpy()])
    for name in SPLITS:
        rows = (events["_split"] == name).to_numpy()
        for column in pf.FEATURES:
            splits[name][column] = counters[column].to_numpy()[rows]
        splits[name]["hist_item"] = list(items[rows])
        splits[name]["hist_category"] = list(categories[rows])


def scores(label: np.ndarray, prob: np.ndarray, train_rate: float) -> dict:
    """AUC, log loss and both NEs of probabilities."""
    ll = logloss(label, prob)
    return {"auc": auc(label, prob), "logloss": ll, "ne": ll / entropy(train_rate),
            "ne_test_rate": ll / entropy(float(np.mean(label)))}


# -- logistic regression ----------------------------------------------------------------------


def one_hot_ids(frame: pd.DataFrame, sizes: dict[str, int]) -> sp.csr_matrix:
    """One-hot user and item vocabulary indices (OOV is a column of its own, unseen in train)."""
    n = len(frame)
    rows = np.r_[np.arange(n), np.arange(n)]
    cols = np.r_[frame["user_id_idx"].to_numpy(), sizes["user_id"] + frame["item_id_idx"].to_numpy()]
    return sp.csr_matrix((np.ones(2 * n), (rows, cols)), shape=(n, sizes["user_id"] + sizes["item_id"]))


def fit_logreg(x: dict[str, sp.csr_matrix], y: dict[str, np.ndarray], train_rate: float, grid: tuple) -> dict:
    """L2 logistic regression for each C on train; the C with the best valid AUC is scored on test."""
    best = None
    for c in grid:
        model = LogisticRegression(C=c, max_iter=2000, solver="lbfgs")
        model.fit(x["train"], y["train"])
        valid_auc = auc(y["valid"], model.predict_proba(x["valid"])[:, 1])
        if best is None or valid_auc > best[0]:
            best = (valid_auc, c, model)
    valid_auc, c, model = best
    if c in (grid[0], grid[-1]) and len(grid) > 2:
        print(f"peers: warning: C={c} is at the edge of the grid {grid}", flush=True)
    test = scores(y["test"], model.predict_proba(x["test"])[:, 1], train_rate)
    return {"settings": {"C": c}, "valid_auc": [valid_auc], "test": [test]}


# -- FuxiCTR models, composed from the wheel's blocks ------------------------------------------


class DeepFM(BaseModel):
    """FuxiCTR's DeepFM: an FM (first-order weights + pairwise interactions) plus an MLP over the same embeddings."""

    def __init__(self, feature_map: FeatureMap, model_id: str = "DeepFM", gpu: int = -1, learning_rate: float = 1e-3,
                 embedding_dim: int = 10, hidden_units: list[int] = (64, 64, 64), hidden_activations: str = "ReLU",
                 net_dropout: float = 0.0, batch_norm: bool = False, embedding_regularizer=None,
                 net_regularizer=None, **kwargs):
        super().__init__(feature_map, model_id=model_id, gpu=gpu, embedding_regularizer=embedding_regularizer,
                         net_regularizer=net_regularizer, **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1, hidden_units=list(hidden_units),
                             hidden_activations=hidden_activations, output_activation=None,
                             dropout_rates=net_dropout, batch_norm=batch_norm)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs: dict) -> dict:
        x = self.get_inputs(inputs)
        feature_emb = self.embedding_layer(x)
        y_pred = self.fm(x, feature_emb) + self.mlp(feature_emb.flatten(start_dim=1))
        return {"y_pred": self.output_activation(y_pred)}


class DIN(BaseModel):
    """FuxiCTR's DIN: each history field pair is replaced by its target-attention pooling, then an MLP."""

    def __init__(self, feature_map: FeatureMap, model_id: str = "DIN", gpu: int = -1,
                 dnn_hidden_units: list[int] = (512, 128, 64), dnn_activations: str = "ReLU",
                 attention_hidden_units: list[int] = (64,), attention_hidden_activations: str = "Dice",
                 attention_output_activation=None, attention_dropout: float = 0.0, learning_rate: float = 1e-3,
                 embedding_dim: int = 10, net_dropout: float = 0.0, batch_norm: bool = False,
                 din_target_field: list[tuple[str, ...]] = (("item_id", "category"),),
                 din_sequence_field: list[tuple[str, ...]] = (("hist_item", "hist_category"),),
                 din_use_softmax: bool = False, embedding_regularizer=None, net_regularizer=None, **kwargs):
        super().__init__(feature_map, model_id=model_id, gpu=gpu, embedding_regularizer=embedding_regularizer,
                         net_regularizer=net_regularizer, **kwargs)
        self.embedding_dim = embedding_dim
        self.din_target_field = [tuple(f) for f in din_target_field]
        self.din_sequence_field = [tuple(f) for f in din_sequence_field]
        self.embedding_layer = FeatureEmbeddingDict(feature_map, embedding_dim)
        self.attention_layers = nn.ModuleList([
            DIN_Attention(embedding_dim * len(target), attention_units=list(attention_hidden_units),
                          hidden_activations=attention_hidden_activations,
                          output_activation=attention_output_activation, dropout_rate=attention_dropout,
                          use_softmax=din_use_softmax)
            for target in self.din_target_field
        ])
        self.dnn = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                             hidden_units=list(dnn_hidden_units), hidden_activations=dnn_activations,
                             output_activation=self.output_activation, dropout_rates=net_dropout,
                             batch_norm=batch_norm)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs: dict) -> dict:
        x = self.get_inputs(inputs)
        emb = self.embedding_layer(x)
        for attention, target, sequence in zip(self.attention_layers, self.din_target_field, self.din_sequence_field):
            target_emb = torch.cat([emb[f] for f in target], dim=-1)
            sequence_emb = torch.cat([emb[f] for f in sequence], dim=-1)
            mask = x[sequence[0]].long() != 0  # padding index 0
            pooled = attention(target_emb, sequence_emb, mask)
            for field, field_emb in zip(sequence, pooled.split(self.embedding_dim, dim=-1)):
                emb[field] = field_emb
        return {"y_pred": self.dnn(self.embedding_layer.dict2tensor(emb, flatten_emb=True))}


def feature_map(root: Path, sizes: dict[str, int], history: bool, embedding_dim: int) -> FeatureMap:
    """A FeatureMap over the split's vocabulary indices (0 = padding, as FuxiCTR's `padding_idx`)."""
    fmap = FeatureMap("peers_din" if history else "peers_deepfm", str(root))
    spec = OrderedDict()
    spec["user_id"] = {"type": "categorical", "source": "user", "vocab_size": sizes["user_id"], "padding_idx": 0}
    spec["item_id"] = {"type": "categorical", "source": "item", "vocab_size": sizes["item_id"], "padding_idx": 0}
    spec["category"] = {"type": "categorical", "source": "item", "vocab_size": sizes["category"], "padding_idx": 0}
    if history:
        for field, shared in (("hist_item", "item_id"), ("hist_category", "category")):
            spec[field] = {"type": "sequence", "source": "user", "vocab_size": sizes[shared], "max_len": pf.WINDOW,
                           "padding_idx": 0, "share_embedding": shared, "feature_encoder": None}
    fmap.features = spec
    fmap.labels = ["label"]
    fmap.default_emb_dim = embedding_dim
    fmap.num_fields = fmap.get_num_fields()
    fmap.set_column_index()
    return fmap


def write_npz(splits: dict[str, pd.DataFrame], root: Path) -> dict[str, str]:
    """Each split as FuxiCTR's npz (one array per feature, sequences as (N, 20) matrices)."""
    paths = {}
    for name, frame in splits.items():
        path = root / f"{name}.npz"
        np.savez(path, user_id=frame["user_id_idx"].to_numpy(np.int64), item_id=frame["item_id_idx"].to_numpy(np.int64),
                 category=frame["category_idx"].to_numpy(np.int64),
                 hist_item=np.stack(frame["hist_item"].to_numpy()).astype(np.int64),
                 hist_category=np.stack(frame["hist_category"].to_numpy()).astype(np.int64),
                 label=frame["label"].to_numpy(np.int64))
        paths[name] = str(path)
    return paths


def fit_fuxictr(kind: str, setting: dict, seed: int, data: dict[str, str], sizes: dict[str, int],
                y: dict[str, np.ndarray], train_rate: float, root: Path, epochs: int) -> dict:
    """One FuxiCTR model: fit on train with early stopping on valid AUC, the best epoch scored."""
    seed_everything(seed)
    history = kind == "din"
    fmap = feature_map(root, sizes, history, setting["embedding_dim"])
    defaults = DIN_DEFAULTS if history else DEEPFM_DEFAULTS
    model_id = f"{kind}_d{setting['embedding_dim']}_r{setting['embedding_regularizer']:g}_s{seed}"
    os.makedirs(root / fmap.dataset_id, exist_ok=True)
    cls = DIN if history else DeepFM
    model = cls(fmap, model_id=model_id, gpu=-1, verbose=0, model_root=str(root), metrics=["AUC", "logloss"],
                optimizer="adam", loss="binary_crossentropy", monitor="AUC", monitor_mode="max",
                early_stop_patience=FUXI_TRAINING["early_stop_patience"],
                learning_rate=FUXI_TRAINING["learning_rate"], **defaults, **setting)

    def loader(name: str, shuffle: bool) -> NpzDataLoader:
        return NpzDataLoader(fmap, data[name], batch_size=FUXI_TRAINING["batch_size"], shuffle=shuffle, num_workers=0)

    model.fit(loader("train", True), epochs=epochs, validation_data=loader("valid", False))
    valid = model.predict(loader("valid", False))
    test = model.predict(loader("test", False))
    return {"valid_auc": auc(y["valid"], valid), "test": scores(y["test"], test, train_rate),
            "epochs_run": model._epoch_index + 1}


def run_fuxictr(kind: str, grid: list[dict], seeds: int, data: dict[str, str], sizes: dict[str, int],
                y: dict[str, np.ndarray], train_rate: float, root: Path, epochs: int) -> dict:
    """Grid on seed 0, picked on valid AUC; the picked setting on seeds 1.. as well."""
    tried = []
    for setting in grid:
        result = fit_fuxictr(kind, setting, 0, data, sizes, y, train_rate, root, epochs)
        tried.append({"settings": setting, "valid_auc": result["valid_auc"], "epochs_run": result["epochs_run"]})
        print(f"peers: {kind} {setting} valid AUC {result['valid_auc']:.4f} ({result['epochs_run']} epochs)",
              flush=True)
        if not tried[:-1] or result["valid_auc"] > max(t["valid_auc"] for t in tried[:-1]):
            best, best_result = setting, result
    runs = [best_result] + [fit_fuxictr(kind, best, s, data, sizes, y, train_rate, root, epochs)
                            for s in range(1, seeds)]
    return {"settings": best, "valid_auc": [r["valid_auc"] for r in runs], "test": [r["test"] for r in runs],
            "epochs_run": [r["epochs_run"] for r in runs], "grid": tried}


# -- report -----------------------------------------------------------------------------------


def summarize(name: str, result: dict, n_test: int, seconds: float) -> dict:
    """One table row: mean and std over seeds of each metric."""
    row = {"model": name, "settings": result["settings"], "n_test": n_test, "wall_s": round(seconds, 1),
           "seeds": len(result["test"])}
    row["valid_auc"] = {"mean": float(np.mean(result["valid_auc"])), "std": float(np.std(result["valid_auc"]))}
    for metric in ("auc", "logloss", "ne", "ne_test_rate"):
        values = [t[metric] for t in result["test"]]
        row[f"test_{metric}"] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    for key in ("grid", "epochs_run"):
        if key in result:
            row[key] = result[key]
    return row


def fmt(stat: dict, seeds: int) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if seeds > 1 else f"{stat['mean']:.4f}"


def markdown(report: dict) -> str:
    """docs/results/peers_<dataset>.md."""
    lines = [
        f"# Peers on `{report['dataset']}`",
        "",
        f"`python benchmarks/peers.py --config {report['config']} --out {report['run']} --seeds {report['seeds']}"
        + (" --quick" if report["quick"] else "") + "`",
        "",
        f"Vertical {report['vertical']}; events on it: train {report['rows']['train']:,}, valid "
        f"{report['rows']['valid']:,}, test {report['rows']['test']:,} (the VM's test events). Train positive rate "
        f"{report['train_rate']:.4f}, test {report['test_rate']:.4f}. {report['cold_test_share']:.1%} of test events "
        f"come from users with no train event on the vertical.",
        "",
        "Fitted on train; C, the grid setting and the epoch picked on valid AUC; test scored once per fitted "
        "model. ± is the std over seeds of the picked setting. NE = test log loss / H(train positive rate); "
        "NE (test rate) divides by H(test rate), as the platform's report does.",
        "",
        "| model | settings picked on valid | valid AUC | test AUC | test log loss | NE | NE (test rate) "
        "| n test | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows_table"]:
        s = row["seeds"]
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "-"
        seeds = f" ({s} seeds)" if s > 1 else ""
        lines.append(f"| {row['model']}{seeds} | {settings} | {fmt(row['valid_auc'], s)} | {fmt(row['test_auc'], s)} | "
                     f"{fmt(row['test_logloss'], s)} | {fmt(row['test_ne'], s)} | {fmt(row['test_ne_test_rate'], s)} | "
                     f"{row['n_test']:,} | {row['wall_s']:.0f} |")
    lines += [
        "",
        "Models: `logreg ids` = L2 logistic regression on one-hot user and item ids; `logreg ids + pit` adds the "
        f"point-in-time counters ({', '.join(pf.FEATURES)}; rates smoothed toward the train rate with "
        f"{pf.PRIOR_WEIGHT:g} pseudo-events, recent = last {pf.WINDOW} events; events strictly earlier on the "
        "vertical, over train + valid + test in time order); `fuxictr deepfm` on (user, item, category); `fuxictr din` "
        f"adds target attention over the user's last {pf.WINDOW} positive items and their categories (strictly "
        f"earlier). FuxiCTR: Adam lr {FUXI_TRAINING['learning_rate']:g}, batch {FUXI_TRAINING['batch_size']}, at most "
        f"{FUXI_TRAINING['epochs']} epochs with early stopping on valid AUC (patience "
        f"{FUXI_TRAINING['early_stop_patience']}, lr x0.1 on plateau, best epoch kept), DeepFM MLP "
        f"{DEEPFM_DEFAULTS['hidden_units']}, DIN MLP {DIN_DEFAULTS['dnn_hidden_units']} with Dice attention "
        f"{DIN_DEFAULTS['attention_hidden_units']} (the classes' defaults); grid over embedding_dim and "
        "embedding_regularizer (L2 on the embedding tables).",
        "",
        f"Versions: scikit-learn {report['versions']['scikit-learn']}, fuxictr {report['versions']['fuxictr']}, "
        f"torch {report['versions']['torch']}, python {report['versions']['python']}; "
        f"{report['versions']['cpus']} CPUs, {report['versions']['threads']} torch threads; "
        f"total {report['wall_s']:.0f} s wall, "
        f"{report['cpu_s']:.0f} s CPU (1-minute load average at the end: {report['load_avg_1m']}).",
        "",
    ]
    return "\n".join(lines)


def run(cfg: LoopFMConfig, config_path: str, out: Path, seeds: int, quick: bool, threads: int,
        models: tuple[str, ...] = MODELS) -> dict:
    """Every peer on the run's splits; writes the JSON and the markdown table, returns the report."""
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(threads)
    run_dir = RunDir(out)
    info = SplitInfo.load(run_dir)
    vertical = cfg.data.one_vertical("benchmarks/peers.py")
    splits = {name: read_split(run_dir, name, vertical) for name in SPLITS}
    y = {name: splits[name]["label"].to_numpy(np.int64) for name in SPLITS}
    train_rate = float(y["train"].mean())
    add_history(splits, train_rate)
    sizes = {c: int(info.vocab_sizes[c]) for c in ("user_id", "item_id", "category")}
    n_test = len(splits["test"])
    rows = []

    t = time.perf_counter()
    constant = {name: np.full(len(splits[name]), train_rate) for name in SPLITS}
    base = {"settings": {}, "valid_auc": [auc(y["valid"], constant["valid"])],
            "test": [scores(y["test"], constant["test"], train_rate)]}
    rows.append(summarize("train positive rate", base, n_test, time.perf_counter() - t))

    if "logreg" in models:
        grid = C_GRID[4:6] if quick else C_GRID
        ids = {name: one_hot_ids(splits[name], sizes) for name in SPLITS}
        t = time.perf_counter()
        rows.append(summarize("logreg ids", fit_logreg(ids, y, train_rate, grid), n_test, time.perf_counter() - t))
        print(f"peers: {rows[-1]['model']} test AUC {rows[-1]['test_auc']['mean']:.4f}", flush=True)
        t = time.perf_counter()
        scaler = StandardScaler().fit(splits["train"][list(pf.FEATURES)].to_numpy())
        dense = {name: sp.csr_matrix(scaler.transform(splits[name][list(pf.FEATURES)].to_numpy())) for name in SPLITS}
        with_pit = {name: sp.hstack([ids[name], dense[name]], format="csr") for name in SPLITS}
        rows.append(summarize("logreg ids + pit", fit_logreg(with_pit, y, train_rate, grid), n_test,
                              time.perf_counter() - t))
        print(f"peers: {rows[-1]['model']} test AUC {rows[-1]['test_auc']['mean']:.4f}", flush=True)

    fuxi_grid = FUXI_GRID[:1] if quick else FUXI_GRID
    epochs = 2 if quick else FUXI_TRAINING["epochs"]
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        data = write_npz(splits, Path(tmp))
        for kind in (m for m in ("deepfm", "din") if m in models):
            t = time.perf_counter()
            result = run_fuxictr(kind, fuxi_grid, 1 if quick else seeds, data, sizes, y, train_rate, Path(tmp), epochs)
            rows.append(summarize(f"fuxictr {kind}", result, n_test, time.perf_counter() - t))
            print(f"peers: {rows[-1]['model']} test AUC {fmt(rows[-1]['test_auc'], rows[-1]['seeds'])}", flush=True)

    train_users = set(splits["train"]["user_id"].unique())
    report = {
        "dataset": cfg.name, "config": config_path, "run": str(out), "vertical": vertical,
        "seeds": seeds, "quick": quick, "rows": {name: len(splits[name]) for name in SPLITS},
        "train_rate": train_rate, "test_rate": float(y["test"].mean()),
        "cold_test_share": float((~splits["test"]["user_id"].isin(train_users)).mean()),
        "boundaries": {"valid_start_ts": info.valid_start_ts, "test_start_ts": info.test_start_ts},
        "rows_table": rows,
        "versions": {"scikit-learn": sklearn.__version__, "fuxictr": fuxictr.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "threads": threads},
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["cpu_s"] = round(time.process_time() - cpu_started, 1)
    report["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return report


def write(report: dict, results: Path, docs: Path) -> tuple[Path, Path]:
    """benchmarks/results/peers_<dataset>.json and docs/results/peers_<dataset>.md."""
    results.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    json_path = results / f"peers_{report['dataset']}.json"
    md_path = docs / f"peers_{report['dataset']}.md"
    json_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config (its name names the outputs)")
    parser.add_argument("--out", required=True, help="run directory holding data/splits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of FuxiCTR's picked setting")
    parser.add_argument("--quick", action="store_true", help="one setting, one seed, 2 epochs: a plumbing check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the tensors are small)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which peers to fit")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--docs", default=str(REPO / "docs" / "results"))
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # FuxiCTR logs every epoch at INFO
    cfg = load_config(args.config)
    report = run(cfg, args.config, Path(args.out).resolve(), args.seeds, args.quick, args.threads, tuple(args.models))
    json_path, md_path = write(report, Path(args.results), Path(args.docs))
    print(markdown(report))
    print(f"peers: {json_path} and {md_path} written in {report['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
