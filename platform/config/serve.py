"""Config of the Ray Serve application and of the local Ray runtime."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt

from .base import Section
from .vm import Arm


class AutoscalingConfig(Section):
    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 4.0


class ServeConfig(Section):
    """`loopfm serve run|build|reload` (serve_apps/, docs/SERVING.md)."""

    host: str = Field("127.0.0.1", description="HTTP bind address; loopback unless set otherwise")
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="where Serve runs its HTTP proxies: HeadOnly (one machine) or EveryNode (a cluster "
        "behind a load balancer: every node answers on `port`; set `host: 0.0.0.0` with it)")
    replicas: PositiveInt = Field(1, description="replicas of each deployment")
    topology: Literal["fused", "front"] = Field(
        "fused", description="fused: one deployment parses, looks up features and runs the VM (one hop from the "
        "proxy); front: a FastAPI ingress ahead of the scoring replicas, one hop more, which retries a request "
        "whose scoring replica died (for replicas >= 2 that must not drop a request)")
    verticals: Optional[list[int]] = Field(
        None, description="serve one VM per vertical (the newest of arm/seed whose manifest names it), all on one "
        "store version; requests pick with `vertical` (None: the newest VM of arm/seed)")
    max_batch_size: PositiveInt = Field(32, description="@serve.batch: most requests per VM forward")
    batch_wait_timeout_s: float = Field(
        0.001, ge=0, description="@serve.batch: longest wait to fill a batch (queued requests batch anyway)")
    max_items: PositiveInt = Field(1000, description="most candidate items per request (more: 422)")
    autoscaling: Optional[AutoscalingConfig] = Field(None, description="replaces `replicas` when set")
    arm: Arm = "kd_loopfm"
    seed: int = 0
    num_cpus: PositiveFloat = Field(1.0, description="CPUs of one VM replica")
    frontend_cpus: PositiveFloat = Field(0.5, description="CPUs of one ingress or feature-lookup replica")
    max_ongoing_requests: PositiveInt = Field(256, description="per replica (Serve's default, 5, starves batching)")
    access_log: bool = Field(False, description="Serve's per-request access log lines (costly on small machines)")
    refresh_interval_s: float = Field(30.0, ge=0, description="how often the feature lookup looks for new store "
                                      "deltas and appended logs and reloads in the background (0: never)")
    staleness_sla_s: Optional[float] = Field(None, gt=0, description="/healthz says `degraded` when the newest "
                                             "stored event is older than this (None: no SLA)")


class RayConfig(Section):
    """How commands reach Ray: an address (cluster, `ray job submit`) or an embedded local one."""

    address: Optional[str] = Field(None, description="None: RAY_ADDRESS if set, else start a local Ray")
    num_cpus: Optional[PositiveInt] = Field(None, description="logical CPUs of a local Ray (default max(4, cores))")
    use_gpu: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: GPUs when the cluster has some when a stage starts (an autoscaler's GPU nodes "
        "at zero are not counted); always: GPU stages request a GPU each, so an autoscaler starts GPU nodes")
    progress_bars: bool = True
    dashboard: bool = Field(True, description="start the dashboard with a local Ray "
                            "(the State API Ray Train uses needs it)")
