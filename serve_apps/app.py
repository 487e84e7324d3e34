"""The app builder used by `serve run`, `serve deploy` and `loopfm serve ...`.

    fused (default):  ScoringIngress (FastAPI + feature tables + VMs, @serve.batch)
    front:            ScoringIngress (FastAPI)  ->  ScoringBackend (feature tables + VMs, @serve.batch)

`build_app(args)` is an application builder (Serve calls it with the `args` of a config file):

    serve run loopfm.serve_apps.app:build_app run_dir=runs/smoke vm_dir=runs/smoke/vm/kd_loopfm/seed0-...
    serve deploy serve.yaml        # written by `loopfm serve build`

`run_dir`, `vm_dir` and `store_dir` may be URIs (`s3://bucket/runs/x`): every replica reads its bundle
from the run directory itself, resolving the URI with the credentials of the node it runs on.

`app_args(cfg, run)` fills the args from a LoopFM config and a run directory (the newest VM of
`serve.arm` / `serve.seed`, or one per vertical of `serve.verticals`), `deploy_config` wraps them
in the multi-application config that `serve deploy` takes (it validates against Ray's own `ServeDeploySchema`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from loopfm.config import LoopFMConfig
from loopfm.datasets.splits import SplitInfo
from loopfm.location import AnyPath, as_location
from loopfm.rundir import RunDir
from loopfm.runtime import use_gpu
from loopfm.serve_apps.bundle import latest_vm, open_bundles, vm_vertical
from loopfm.serve_apps.ingress import ScoringIngress
from loopfm.serve_apps.scoring import ScoringBackend

APP_NAME = "loopfm"
ROUTE_PREFIX = "/"
IMPORT_PATH = "loopfm.serve_apps.app:build_app"
# A redeploy (`loopfm serve reload`, `serve deploy`) replaces replicas stop-then-start at 1 replica:
# requests an old replica holds wait for the new backends, which take 10-25 s to start on a busy
# 2-core machine. Serve's default grace period (20 s) would then cut them off with a 500.
GRACE_S = 120.0


class AppArgs(BaseModel):
    """Everything a deployment of the app needs, JSON-able (it travels in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="the run directory (splits, features manifests, store)")
    vm_dir: Optional[str] = Field(None, description="the VM checkpoint to serve, vm/<arm>/seed<k>-<fingerprint>/ "
                                                   "(its vertical: the manifest's, else the split's)")
    vm_dirs: Optional[dict[int, str]] = Field(None, description="several VMs, one per vertical (vertical -> VM "
                                                                "dir), all on one store version; instead of vm_dir")
    topology: Literal["fused", "front"] = Field("fused", description="fused: one deployment parses, looks up "
                                                "and scores; front: an ingress ahead of ScoringBackend replicas, "
                                                "retrying a request whose replica died")
    store_dir: Optional[str] = Field(None,
                                     description="store directory (default: <run>/store/<the VM's store version>)")
    replicas: PositiveInt = 1
    autoscaling: Optional[dict[str, Any]] = None
    max_batch_size: PositiveInt = 32
    batch_wait_timeout_s: float = Field(0.001, ge=0)
    max_items: PositiveInt = 1000
    num_cpus: PositiveFloat = 1.0
    num_gpus: float = Field(0.0, ge=0, le=1, description="GPU share of one VM replica (0: the VM runs on the CPU)")
    frontend_cpus: PositiveFloat = 0.5
    max_ongoing_requests: PositiveInt = 256
    refresh_interval_s: float = Field(30.0, ge=0)
    staleness_sla_s: Optional[float] = None
    max_body_bytes: Optional[PositiveInt] = Field(None, description="longest request body (more: 413); default: "
                                                                     "enough for max_items ids however formatted")

    @model_validator(mode="after")
    def _one_way_to_name_the_vms(self) -> AppArgs:
        if (self.vm_dir is None) == (not self.vm_dirs):
            raise ValueError("vm_dir / vm_dirs: give exactly one (one VM, or one VM per vertical)")
        return self

    def served(self) -> dict[int, str]:
        """vertical -> VM dir of every VM the app serves."""
        if self.vm_dirs:
            return {int(v): d for v, d in self.vm_dirs.items()}
        return {vm_vertical(self.vm_dir, RunDir(self.run_dir)): self.vm_dir}


def app_args(cfg: LoopFMConfig, run: RunDir, vm_dir: Optional[AnyPath] = None) -> dict:
    """The app's args: `vm_dir`, else the newest VM of serve.arm / serve.seed for each vertical of
    `serve.verticals`, else the newest of that arm and seed."""
    s = cfg.serve
    if vm_dir or not s.verticals:
        vms = {"vm_dir": str(as_location(vm_dir or latest_vm(run, s.arm, s.seed)).resolve())}
    else:
        vms = {"vm_dirs": {v: str(latest_vm(run, s.arm, s.seed, v).resolve()) for v in s.verticals}}
    return AppArgs(
        run_dir=str(run.root), **vms, topology=s.topology, replicas=s.replicas,
        autoscaling=s.autoscaling.model_dump() if s.autoscaling else None, max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s, max_items=s.max_items, num_cpus=s.num_cpus,
        frontend_cpus=s.frontend_cpus, max_ongoing_requests=s.max_ongoing_requests,
        refresh_interval_s=s.refresh_interval_s, staleness_sla_s=s.staleness_sla_s, num_gpus=vm_gpus(cfg),
    ).model_dump()


def vm_gpus(cfg: LoopFMConfig) -> float:
    """GPU share of one VM replica: none unless `ray.use_gpu` says GPUs; then every replica (up to the
    autoscaler's most) gets an equal share of one, so they all fit on a one-GPU machine."""
    if not use_gpu(cfg.ray):
        return 0.0
    s = cfg.serve
    return 1.0 / (s.autoscaling.max_replicas if s.autoscaling else s.replicas)


def _scaling(a: AppArgs) -> dict:
    if a.autoscaling:
        return {"autoscaling_config": dict(a.autoscaling)}
    return {"num_replicas": a.replicas}


def build_app(args: dict) -> Application:
    """The Serve application for `args` (an `AppArgs` dict). The VMs are opened here too, so a set
    that cannot be served together (two store versions) fails the deploy, not the replicas."""
    a = AppArgs.model_validate(args)
    served = a.served()
    open_bundles(a.run_dir, served, a.store_dir)
    core = {"run_dir": a.run_dir, "vm_dirs": served, "store_dir": a.store_dir,
            "refresh_interval_s": a.refresh_interval_s, "max_batch_size": a.max_batch_size,
            "batch_wait_timeout_s": a.batch_wait_timeout_s, "gpu": a.num_gpus > 0}
    scoring = {**_scaling(a), "max_ongoing_requests": max(a.max_ongoing_requests, 2 * a.max_batch_size),
               "graceful_shutdown_timeout_s": GRACE_S,
               "ray_actor_options": {"num_cpus": a.num_cpus, **({"num_gpus": a.num_gpus} if a.num_gpus else {})}}
    face = {"verticals": sorted(served), "max_items": a.max_items,
            "context_columns": list(SplitInfo.load(RunDir(a.run_dir)).categorical),
            "staleness_sla_s": a.staleness_sla_s, "max_body_bytes": a.max_body_bytes}
    if a.topology == "fused":
        return ScoringIngress.options(**scoring).bind(**face, core_args=core)
    backend = ScoringBackend.options(**scoring).bind(**core)
    return ScoringIngress.options(
        **_scaling(a), max_ongoing_requests=a.max_ongoing_requests, graceful_shutdown_timeout_s=GRACE_S,
        ray_actor_options={"num_cpus": a.frontend_cpus},
    ).bind(**face, backend=backend)


def logging_config(cfg: LoopFMConfig) -> dict:
    return {"enable_access_log": cfg.serve.access_log}


def deploy_config(cfg: LoopFMConfig, run: RunDir, vm_dir: Optional[AnyPath] = None) -> dict:
    """The `serve deploy` config of this run's VM (validated with Ray's `ServeDeploySchema`)."""
    config = {
        "proxy_location": cfg.serve.proxy_location,
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": ROUTE_PREFIX,
            "import_path": IMPORT_PATH,
            "args": app_args(cfg, run, vm_dir),
            "logging_config": logging_config(cfg),
        }],
    }
    ServeDeploySchema.model_validate(config)
    return config
