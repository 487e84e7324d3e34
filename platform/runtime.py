"""How every command reaches Ray, picks a device and reports progress.

Commands connect to a cluster when one is named (`ray.address`, or RAY_ADDRESS, which
`ray job submit` sets), and otherwise start an embedded local Ray. On small machines the local
Ray gets more logical CPUs than cores (docs/DESIGN.md, 'Ray facts'): an actor pool or a Train worker that
reserves every CPU would otherwise starve Ray Data's read tasks and hang the pipeline.
"""

from __future__ import annotations

import os
import socket

import ray
import torch
from ray.data import DataContext

from loopfm.config import RayConfig
from loopfm.logs import log, setup_logging

__all__ = ["API_SERVER_ADDRESS", "free_port", "init_ray", "local_num_cpus", "log", "setup_logging", "start_local_ray",
           "torch_device", "use_gpu"]  # log and setup_logging: loopfm.logs's, for the stages


def local_num_cpus(cfg: RayConfig) -> int:
    return cfg.num_cpus or max(4, os.cpu_count() or 1)


API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int, dashboard: bool = True, log_to_driver: bool = True) -> None:
    """A new embedded Ray ("local": never another session's `ray start` cluster), its dashboard on
    a free loopback port that the State API of every process of this Ray is pointed at.

    Why the pointer: Ray Train V2 starts a PlacementGroupCleaner per fit that asks the State API
    every second whether the Train controller lives. Left to itself, the State API finds "the"
    cluster through /tmp/ray/ray_current_cluster, i.e. the newest `ray start` on the machine: when
    that one is gone each call blocks ~10 s and every fit ends 12 s late; when it is another live
    cluster, our controller looks dead there and the cleaner removes our placement group.
    RAY_API_SERVER_ADDRESS, set while the raylet starts, is inherited by it and every worker; this
    process gets its environment back after (the variable overrides the address of every State API
    and job-submission client, and a caller here may well mean another cluster).
    Without the dashboard the calls fail fast (the cleaner then logs a warning every second).
    """
    port = free_port()
    previous = os.environ.get(API_SERVER_ADDRESS)
    os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=log_to_driver)
    finally:
        if previous is None:
            del os.environ[API_SERVER_ADDRESS]
        else:
            os.environ[API_SERVER_ADDRESS] = previous


def init_ray(cfg: RayConfig) -> None:
    """Connect to (or start) Ray once per process and apply the Data settings we rely on."""
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            start_local_ray(local_num_cpus(cfg), dashboard=cfg.dashboard)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # Hash-shuffle groupby can hang on small clusters; the sort-based shuffle does not.
    ctx.shuffle_strategy = "sort_shuffle_pull_based"
    # Ray 2.60's default Parquet reader (DataSource V2) starts 32 footer-reader actors per
    # read_parquet: seconds of process start-up per read on a small machine. V1 lists in-task.
    ctx.use_datasource_v2 = False


def use_gpu(cfg: RayConfig) -> bool:
    """`auto` uses GPUs when the cluster (or this machine, before Ray starts) has any now.

    `auto` cannot see GPUs an autoscaler could add: on a cluster whose GPU worker type starts at
    zero nodes it resolves to CPU and nothing ever asks for a GPU node. `always` makes every GPU
    stage request one GPU per worker or actor, which is what makes the autoscaler start them
    (cluster.yaml's commands pass it)."""
    if cfg.use_gpu != "auto":
        return cfg.use_gpu == "always"
    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        if not gpus and sum(node["Alive"] for node in ray.nodes()) > 1:
            log.warning("ray.use_gpu=auto: this cluster has no GPU now, so the stage runs on CPU; if its GPU "
                        "workers start at zero nodes, pass --set ray.use_gpu=always to request them")
        return gpus
    return torch.cuda.is_available()


def torch_device(gpu: bool) -> torch.device:
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
