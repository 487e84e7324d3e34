"""Serving under a replica fault (issue 7, item 4): a scoring replica SIGKILLed under load over real HTTP.

The app runs in the `front` topology (`serve.topology`: an ingress ahead of the scoring replicas,
the layout that retries a request whose replica died) with 2 replicas of each deployment
(fractional CPUs: 2 x (0.25 + 0.5) = 1.5 of the test Ray's 4 logical CPUs, so the replacement
replica can start beside the survivors). A few
closed-loop client threads fire a steady, bounded load of real `POST /v1/score` requests at the
loopback port; mid-load the test SIGKILLs one ScoringBackend replica's worker process, the way the OOM
killer or a crash ends it. It then checks that
- no request failed: those inside the killed replica (each request waits there `BATCH_WAIT_S` for
  its batch, so the kill always finds some), and those the router still sent to it before it
  learned of the death, are retried on the survivor by the ingress (scoring is idempotent);
  without that retry they fail, so this test fails too;
- the survivor kept answering while the replacement started (the reason for 2 replicas);
- Serve replaced the killed replica (2 RUNNING, a new actor, the killed one DEAD);
- every answer, before and after the kill, carries the same scores for the same input.

Why SIGKILL of the pid and not `ray.kill(handle, no_restart=True)`: `ray.kill` is an intentional
kill that goes through the GCS, which records it as one before the process is gone; a crash or the
OOM killer just ends the process and the raylet finds out afterwards. SIGKILL is that path.

The reload half of item 4 (a new model version under load loses no request) is
`tests/test_serve.py::test_reload_picks_up_a_new_checkpoint_and_store_without_failed_requests`.

`LOOPFM_FAULT_REPLICAS=1 pytest tests/test_serve_faults.py` runs the same kill against 1 replica
per deployment, to see the test fail when the redundancy is removed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_serve
from test_serve import free_port, offline, request_of

# the module fixture of tests/test_serve.py (here a second instance): a copy of the smoke run with
# features and one trained VM
served_run = test_serve.served_run

pytestmark = pytest.mark.timeout(420)

APP, VM = "loopfm", "ScoringBackend"
REPLICAS = int(os.environ.get("LOOPFM_FAULT_REPLICAS", "2"))
CLIENTS = 4
CANDIDATES = 200
PACE_S = 0.04            # a client sends at most one request per PACE_S: a steady, bounded load
WARM_S, AFTER_S = 3.0, 5.0
MIN_REQUESTS = 200
# Each request waits this long inside its VM replica for a batch to fill (@serve.batch; 4 clients
# never fill one), so at any instant every VM replica holds requests: the kill always lands on some,
# and only the ingress's retry on the survivor saves them.
BATCH_WAIT_S = 0.25
RECOVER_S = 120.0        # Serve notices the death and starts a replica (5-25 s on the busy 2-core box)


def vm_replicas() -> dict[str, int]:
    """{actor id: pid} of the live ScoringBackend replica actors of this cluster (the GCS actor table; the
    State API needs the dashboard, which the test Ray runs without)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return {a["ActorID"]: a["Pid"] for a in actors if a["ActorClassName"] == f"ServeReplica:{APP}:{VM}"}


def actor_state(actor_id: str) -> str:
    from ray._private import state

    return state.actors(actor_id=actor_id).get("State", "?")


def running(deployment: str = VM) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def replicated_server(served_run, smoke_config):
    import httpx
    from ray import serve

    from conftest import ensure_local_ray
    from loopfm.serve_apps.stage import deploy

    serving = smoke_config.serve.model_copy(update={"replicas": REPLICAS, "num_cpus": 0.5, "frontend_cpus": 0.25,
                                                    "batch_wait_timeout_s": BATCH_WAIT_S, "topology": "front"})
    cfg = smoke_config.model_copy(update={"serve": serving})
    run, _, _ = served_run
    ensure_local_ray()  # the session's 4-CPU Ray, should an earlier module have shut it down
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = deploy(cfg, run)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        yield client, args
        client.close()
    finally:
        serve.shutdown()


class Load:
    """CLIENTS threads, each its own HTTP connection, firing `bodies` round-robin until stopped.
    Every request is recorded as (sent, done, body index, status, logits or error text)."""

    def __init__(self, base_url: str, bodies: list[dict]):
        self.base_url, self.bodies = base_url, bodies
        self.results: list[tuple] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._fire, args=(k,), daemon=True) for k in range(CLIENTS)]

    def _fire(self, k: int) -> None:
        import httpx

        i = k
        with httpx.Client(base_url=self.base_url, timeout=60) as c:
            while not self.stop.is_set():
                b = i % len(self.bodies)
                i += CLIENTS
                sent = time.monotonic()
                try:
                    r = c.post("/v1/score", json=self.bodies[b])
                    out = r.json()["logits"] if r.status_code == 200 else r.text[:300]
                    self.results.append((sent, time.monotonic(), b, r.status_code, out))
                except Exception as exc:  # noqa: BLE001 (a dropped connection or a timeout counts as a failure)
                    self.results.append((sent, time.monotonic(), b, -1, repr(exc)[:300]))
                time.sleep(max(0.0, PACE_S - (time.monotonic() - sent)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def test_vm_replica_killed_under_load_loses_no_request_and_recovers(replicated_server, served_run):
    client, args = replicated_server
    run, _, vm = served_run
    rows, offline_logits, _ = offline(run, Path(args["vm_dir"]), n=24)
    # 200 candidates a request (the test example's item first), so the kill finds requests in flight
    bodies = [request_of(rows, i) for i in range(len(offline_logits))]
    bodies = [{**b, "items": [*b["items"], *range(1, CANDIDATES)]} for b in bodies]

    deadline = time.monotonic() + RECOVER_S
    while (running() < REPLICAS or len(vm_replicas()) < REPLICAS) and time.monotonic() < deadline:
        time.sleep(0.25)
    before = vm_replicas()
    assert len(before) == REPLICAS and running() == REPLICAS, (before, running())
    # the scores before the fault, one request at a time: they equal the offline VM's
    baseline = [client.post("/v1/score", json=b).json()["logits"] for b in bodies]
    assert np.abs(np.array([x[0] for x in baseline]) - offline_logits).max() < 1e-5

    with Load(str(client.base_url), bodies) as load:
        time.sleep(WARM_S)
        victim, pid = next(iter(before.items()))
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered = None
        while time.monotonic() < killed + RECOVER_S:
            now = vm_replicas()
            if victim not in now and len(now) == REPLICAS and running() == REPLICAS:
                recovered = time.monotonic()
                break
            time.sleep(0.25)
        assert recovered is not None, f"Serve did not bring {VM} back to {REPLICAS} replicas in {RECOVER_S:.0f} s"
        # at least AFTER_S more, and MIN_REQUESTS in all: at most CLIENTS requests are in flight when
        # the replica dies (Serve's router re-routes those the dead replica had not accepted yet)
        while time.monotonic() < recovered + AFTER_S or (len(load.results) < MIN_REQUESTS
                                                          and time.monotonic() < recovered + RECOVER_S):
            time.sleep(0.25)
    results = sorted(load.results)

    failed = [r for r in results if r[3] != 200]
    t0 = results[0][0]
    in_flight = sum(1 for r in results if r[0] <= killed <= r[1])
    summary = (f"{len(results)} requests, {len(failed)} failed, {in_flight} in flight at the kill; "
               f"kill at {killed - t0:.1f} s, "
               f"recovered {recovered - killed:.1f} s later; first failures: "
               f"{[(round(r[0] - t0, 2), r[3], r[4]) for r in failed[:3]]}")
    print(summary)
    assert len(results) >= MIN_REQUESTS, f"the load barely ran: {summary}"
    assert in_flight >= 1, f"nothing was in flight at the kill: the retry went untested; {summary}"
    assert not failed, summary
    later = [r for r in results if r[0] >= recovered]
    assert len(later) >= 20, summary
    # the survivor kept serving while the replacement started: answers kept coming throughout
    done = sorted(r[1] for r in results if r[3] == 200 and killed <= r[1] <= recovered)
    gaps = np.diff([killed, *done, recovered])
    print(f"longest wait between answers while recovering: {gaps.max():.2f} s")
    assert gaps.max() < max(3.0, 0.5 * (recovered - killed)), f"service stalled {gaps.max():.1f} s; {summary}"
    # the killed replica stays dead; a new actor took its place
    after = vm_replicas()
    assert actor_state(victim) == "DEAD" and victim not in after and len(after) == REPLICAS
    assert set(after) - set(before), (before, after)
    # the same inputs get the same scores from every replica, before and after the kill
    for _, _, b, status, logits in results:
        if status == 200:
            assert np.abs(np.array(logits) - np.array(baseline[b])).max() < 1e-5, (b, logits, baseline[b])
    final = [client.post("/v1/score", json=b).json()["logits"] for b in bodies]
    assert np.abs(np.array(final) - np.array(baseline)).max() < 1e-5
    health = client.get("/healthz").json()
    assert (health["status"], health["model_version"], health["store_version"]) == (
        "ok", vm.model_version, vm.store_version)
