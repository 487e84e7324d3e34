"""The local Ray the commands start: its State API must answer for this Ray, from any process.

Ray Train V2's PlacementGroupCleaner asks the State API, from a worker, whether the Train
controller lives (see `loopfm.runtime.start_local_ray`). Pointed at another cluster, or at a
dead `ray start` head named in /tmp/ray/ray_current_cluster, it would answer "dead" or hang.
"""

from __future__ import annotations

import os

import pytest


@pytest.mark.timeout(120)
def test_the_state_api_of_a_worker_finds_this_rays_actors_and_the_driver_env_is_untouched(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def seen_by_a_worker(actor_id: str):
        from ray.util.state import get_actor

        seen = get_actor(actor_id, timeout=10)
        return os.environ.get("RAY_API_SERVER_ADDRESS"), seen.state if seen else None

    probe = Probe.remote()
    assert ray.get(probe.ping.remote()) == 1
    address, state = ray.get(seen_by_a_worker.remote(probe._actor_id.hex()), timeout=60)
    assert address.startswith("http://127.0.0.1:") and state == "ALIVE"
    # this process keeps its own environment: a job client here may mean another cluster
    assert os.environ.get("RAY_API_SERVER_ADDRESS") != address
    ray.kill(probe)
