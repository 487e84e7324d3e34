"""`loopfm serve run | build | reload`: the CLI side of the scoring service (docs/SERVING.md).

- `serve run` starts (or joins) Ray, starts Serve's HTTP proxy on `serve.host:serve.port`
  (127.0.0.1 by default), deploys the newest VM of `serve.arm` / `serve.seed` with its store, and
  blocks until Ctrl-C. It writes the Ray address to `<run>/serve/ray_address` for `serve reload`.
- `serve build` writes `<run>/serve/serve.yaml` (or `--output`): the config `serve deploy` takes,
  checked against Ray's `ServeDeploySchema`.
- `serve reload` re-resolves the newest VM (and so its store version) and redeploys the running
  app as a Serve rolling update. At 1 replica Serve stops the old replica before the new one is
  up: requests queue meanwhile and finish on the new replicas (none fail; they wait for the
  start-up, which is why the replicas' grace period is `app.GRACE_S`). Redeploying an edited
  serve.yaml with `serve deploy` does the same on a cluster.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import ray
import yaml
from ray import serve

from loopfm.config import LoopFMConfig
from loopfm.errors import MissingInputError
from loopfm.location import AnyPath, as_location, is_remote
from loopfm.rundir import RunDir, atomic_write_text
from loopfm.runtime import init_ray, log
from loopfm.serve_apps.app import APP_NAME, ROUTE_PREFIX, app_args, build_app, deploy_config, logging_config

ADDRESS_FILE = "ray_address"
INGRESS = "ScoringIngress"  # the deployment every topology answers HTTP and handle calls with


def serve_dir(run: RunDir) -> AnyPath:
    return run.root / "serve"


def start_http(cfg: LoopFMConfig) -> None:
    serve.start(proxy_location=cfg.serve.proxy_location, http_options={"host": cfg.serve.host, "port": cfg.serve.port})


def deploy(cfg: LoopFMConfig, run: RunDir, vm_dir: Optional[AnyPath] = None) -> dict:
    """Deploy (or redeploy, rolling) the app for the run's newest VM; returns the app args."""
    args = app_args(cfg, run, vm_dir)
    serve.run(build_app(args), name=APP_NAME, route_prefix=ROUTE_PREFIX, logging_config=logging_config(cfg))
    return args


def served_version() -> Optional[dict]:
    """What the running app serves: its (first) VM's description with every VM under `models`; None
    when no app runs."""
    try:
        handle = serve.get_deployment_handle(INGRESS, APP_NAME)
        models = handle.describe.remote().result(timeout_s=30)
    except Exception:
        return None
    return {**models[0], "models": models}


def serve_run_stage(cfg: LoopFMConfig, run: RunDir, vm: Optional[str | os.PathLike] = None) -> None:
    """`loopfm serve run [--vm DIR]`: serve `vm` (default: the newest of serve.arm / serve.seed) until Ctrl-C."""
    init_ray(cfg.ray)
    start_http(cfg)
    deployed = deploy(cfg, run, as_location(vm) if vm else None)
    serve_dir(run).mkdir(parents=True, exist_ok=True)
    atomic_write_text(serve_dir(run) / ADDRESS_FILE, ray.get_runtime_context().gcs_address)
    info = served_version() or {}
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    log.info("serve: VM %s (%s seed %s, store %s) from %s", info.get("model_version"), info.get("arm"),
             info.get("seed"), info.get("store_version"), deployed["vm_dir"] or deployed["vm_dirs"])
    log.info("serve: listening on %s  (POST /v1/score, GET /healthz, GET /v1/models, docs at %s/docs); Ctrl-C stops",
             url, url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("serve: shutting down")
    finally:
        serve.shutdown()
        (serve_dir(run) / ADDRESS_FILE).unlink(missing_ok=True)


def serve_build_stage(cfg: LoopFMConfig, run: RunDir, vm: Optional[str | os.PathLike] = None,
                      output: Optional[str | os.PathLike] = None) -> AnyPath:
    """`loopfm serve build [--vm DIR] [-o YAML]`: the Serve config of `vm`, at `output`
    (default: <run>/serve/serve.yaml; in the bucket when the run directory is a URI)."""
    config = deploy_config(cfg, run, as_location(vm) if vm else None)
    out = as_location(output) if output else serve_dir(run) / "serve.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    # `serve deploy` reads a local file: a config in a bucket is copied down first
    deploy_with = f"`serve deploy {out}`" if not is_remote(out) else f"`serve deploy serve.yaml` (a copy of {out})"
    header = ("# Ray Serve config written by `loopfm serve build`; deploy with " + deploy_with + "\n"
              "# (needs `loopfm` installed on the cluster and the run directory readable by it).\n")
    atomic_write_text(out, header + yaml.safe_dump(config, sort_keys=False))
    args = config["applications"][0]["args"]
    log.info("serve build: %s (VM %s) -> %s", APP_NAME, args["vm_dir"] or args["vm_dirs"], out)
    return out


def reload(cfg: LoopFMConfig, run: RunDir, vm_dir: Optional[AnyPath] = None) -> tuple[Optional[dict], dict]:
    """Redeploy the running app with the newest VM (and its store); (before, after) of `served_version`."""
    before = served_version()
    if before is None:
        raise MissingInputError(f"no Serve app {APP_NAME!r} is running on this Ray cluster: `loopfm serve run` first")
    deploy(cfg, run, vm_dir)
    return before, served_version() or {}


def connect(cfg: LoopFMConfig, run: RunDir) -> None:
    """Join the Ray cluster a running app lives on: ray.address, RAY_ADDRESS, or what `serve run` saved."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    saved = serve_dir(run) / ADDRESS_FILE
    if not address and saved.is_file():
        address = saved.read_text().strip()
    if not address:
        raise MissingInputError(f"no Ray address: set ray.address or RAY_ADDRESS, or start `loopfm serve run "
                                f"--out {run.root}` (it writes {saved})")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def serve_reload_stage(cfg: LoopFMConfig, run: RunDir, vm: Optional[str | os.PathLike] = None) -> None:
    """`loopfm serve reload [--vm DIR]`: redeploy the running app with `vm` (default: the newest)."""
    connect(cfg, run)
    before, after = reload(cfg, run, as_location(vm) if vm else None)
    log.info("serve reload: VM %s (store %s) -> VM %s (store %s)", before.get("model_version"),
             before.get("store_version"), after.get("model_version"), after.get("store_version"))


def refresh() -> dict:
    """Ask the running app's feature tables to load new store deltas and appended logs now (one
    replica answers; the others find them within `serve.refresh_interval_s`)."""
    try:
        handle = serve.get_deployment_handle(INGRESS, APP_NAME)
    except Exception as err:
        raise MissingInputError(
            f"no Serve app {APP_NAME!r} is running on this Ray cluster ({type(err).__name__})") from err
    return handle.refresh.remote().result(timeout_s=600)


def serve_refresh_stage(cfg: LoopFMConfig, run: RunDir) -> dict:
    connect(cfg, run)
    state = refresh()
    log.info("serve refresh: store %s + %d deltas, %d appended batches, newest event ts %s (%.0fs old)",
             state["store_version"], state["store_deltas"], state["appended_batches"], state["newest_event_ts"],
             state["staleness_s"] or 0)
    return state
