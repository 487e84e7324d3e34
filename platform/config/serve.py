"""Config of the Ray Serve application and of the local Ray runtime."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt

from .base import Section


class AutoscalingConfig(Section):
    min_replicas: PositiveInt = 1
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 4.0


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: PositiveInt = 1
    max_batch_size: PositiveInt = 32
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_items: PositiveInt = 1000
    autoscaling: Optional[AutoscalingConfig] = None
    arm: Literal["base", "kd", "loopfm", "kd_loopfm"] = "kd_loopfm"
    seed: int = 0


class RayConfig(Section):
    """How commands reach Ray: an address (cluster, `ray job submit`) or an embedded local one."""

    address: Optional[str] = Field(None, description="None: RAY_ADDRESS if set, else start a local Ray")
    num_cpus: Optional[PositiveInt] = Field(None, description="logical CPUs of a local Ray (default max(4, cores))")
    use_gpu: Literal["auto", "always", "never"] = "auto"
    progress_bars: bool = True
    dashboard: bool = Field(True, description="start the dashboard with a local Ray (the State API Ray Train uses needs it)")
