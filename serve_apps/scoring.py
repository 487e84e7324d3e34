"""The scoring core: every served vertical's feature table and VM in one process, one batched forward.

A request's path is lookup -> forward, and both live here, so the features never cross a process
boundary: `FeatureTable.features` cuts the user's stored z and raw history at the request time,
then `@serve.batch` gathers the concurrent requests (up to `serve.max_batch_size`, waiting at most
`serve.batch_wait_timeout_s`) into one forward per vertical (`VMScorer.score`). The lookup and the
VM that answer a request were loaded together, so they always agree on the store version; a
reload replaces both at once (a new replica).

Several verticals: one VM per vertical, all reading one store version (`open_bundles` refuses
otherwise; a VM that reads no store fits any); VMs trained on the same feature set share one
table. `ScoringCore` is a plain class: the fused app holds one inside its HTTP ingress replica
(`ingress.ScoringIngress`), and the `front` topology runs it as its own deployment,
`ScoringBackend`, behind the ingress.

Metrics (`ray.serve.metrics`, exported by Ray's metrics agent): cold starts per vertical and the
store staleness (now minus the newest stored event) per vertical, refreshed every
`STALENESS_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import torch
from ray import serve
from ray.serve import metrics

from loopfm.serve_apps.bundle import open_bundles
from loopfm.serve_apps.lookup import LiveTable
from loopfm.serve_apps.model import STALE, VMScorer

STALENESS_EVERY_S = 5.0
TABLE_KEYS = ("store_head", "log_head", "store_rows", "store_deltas", "appended_batches", "newest_event_ts",
              "staleness_s", "users_with_history", "refresh_error")


class ScoringCore:
    def __init__(self, run_dir: str, vm_dirs: dict[int, str], store_dir: Optional[str] = None,
                 refresh_interval_s: float = 30.0, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.001,
                 torch_threads: Optional[int] = 1, gpu: bool = False):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"  # gpu: this replica holds a GPU share
        bundles = open_bundles(run_dir, vm_dirs, store_dir)
        shared: dict[tuple, LiveTable] = {}  # one table per feature set (and store, or none)
        self.tables: dict[int, LiveTable] = {}
        for v, b in bundles.items():
            key = (b.features.fingerprint, b.store_version)
            if key not in shared:
                shared[key] = LiveTable(b, refresh_interval_s)
            self.tables[v] = shared[key]
        self.scorers = {v: VMScorer(b, device) for v, b in bundles.items()}
        self.batch = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self._forward.set_max_batch_size(max_batch_size)
        self._forward.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.cold_starts = metrics.Counter("loopfm_serve_cold_starts", tag_keys=("vertical",),
                                           description="score requests of users with no history before their ts")
        self.staleness = metrics.Gauge("loopfm_serve_store_staleness_s", tag_keys=("vertical",),
                                       description="now minus the newest stored event the lookup holds")
        self._watch: Optional[asyncio.Task] = None

    @property
    def verticals(self) -> list[int]:
        return sorted(self.scorers)

    async def score(self, user_id: int, items: list[int], context: dict, vertical: int) -> dict:
        """One request: the lookup at `context['ts']`, then its share of a batched forward."""
        self._watch_staleness()
        features = self.tables[vertical].current().features(user_id, items, context)
        out = await self._forward((vertical, features))
        if features["cold_start"]:
            self.cold_starts.inc(tags={"vertical": str(vertical)})
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _forward(self, requests: list[tuple[int, dict]]) -> list[dict]:
        out: list[Optional[dict]] = [None] * len(requests)
        for vertical in {v for v, _ in requests}:
            mine = [i for i, (v, _) in enumerate(requests) if v == vertical]
            for i, answer in zip(mine, self.scorers[vertical].score([requests[i][1] for i in mine])):
                if answer.get(STALE):  # the table and the VM were loaded together: a bug if they disagree
                    raise RuntimeError(f"features of store {requests[i][1]['store_version']} reached VM "
                                       f"{answer['model_version']} of another store version")
                out[i] = {**answer, "vertical": vertical}
        return out

    def _watch_staleness(self) -> None:
        """Keep the staleness gauge current while the replica lives (started from the event loop)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._staleness_loop())

    async def _staleness_loop(self) -> None:
        while True:
            for vertical, live in self.tables.items():
                newest = live.table.newest_event_ts
                if newest is not None:
                    self.staleness.set(time.time() - newest, tags={"vertical": str(vertical)})
            await asyncio.sleep(STALENESS_EVERY_S)

    async def describe(self) -> list[dict]:
        """Each served VM with its table's state, in vertical order."""
        self._watch_staleness()
        out = []
        for vertical in self.verticals:
            table = await self.tables[vertical].describe()
            out.append({**self.scorers[vertical].describe(), **{k: table[k] for k in TABLE_KEYS},
                        "vertical": vertical, **self.batch})
        return out

    async def refresh(self) -> dict:
        """Reload every table whose store deltas or log batches changed; the state (one store version
        for all, so the first table's store state is every table's)."""
        states = [await live.refresh() for live in {id(t): t for t in self.tables.values()}.values()]
        return {**states[0], "tables": len(states)}


ScoringBackend = serve.deployment(name="ScoringBackend")(ScoringCore)
