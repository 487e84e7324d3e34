"""cluster.yaml passes Ray's own cluster-launcher validation and says what the design needs."""

import copy
import json
import shlex

import pytest
import yaml

from conftest import REPO


def _load():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load()))


def test_validator_would_catch_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(_load())
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_node_types_and_setup():
    cfg = _load()
    types = cfg["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert types["head"]["resources"] == {"CPU": 0}
    setup = " ".join(cfg["setup_commands"])
    gpu_setup = " ".join(types["gpu_worker"]["worker_setup_commands"])
    for commands in (setup, gpu_setup):
        assert "pip install" in commands and "-e ~/loopfm" in commands and "constraints.txt" in commands
    assert "whl/cpu" in setup and "whl/cu" in gpu_setup


def test_ray_starts_with_the_project_venv_on_path():
    """`ray job submit -- loopfm run ...` runs its entrypoint in Ray's environment: `loopfm` must resolve."""
    cfg = _load()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all(c.startswith("export PATH=$HOME/loopfm-venv/bin:$PATH;") for c in start), key


def _header_command(prefix: str) -> str:
    lines = [line.removeprefix("#").strip() for line in (REPO / "cluster.yaml").read_text().splitlines()
             if line.startswith("#")]
    return next(line for line in lines if line.startswith(prefix))


def test_the_job_ships_its_code_and_writes_to_the_bucket():
    """The header's job runs the code `make ship` lays out (not the nodes' install from `ray up`) on a
    run directory in the bucket every node reaches; README gives the same line."""
    submit = _header_command("ray job submit")
    runtime_env = json.loads(shlex.split(submit)[shlex.split(submit).index("--runtime-env-json") + 1])
    assert runtime_env == {"py_modules": ["dist/loopfm"]}
    assert "--out s3://$LOOPFM_BUCKET/" in submit and "--set ray.use_gpu=always" in submit
    makefile = (REPO / "Makefile").read_text()
    assert "DIST ?= dist" in makefile and "\nship: " in makefile
    assert submit.split(" -- ", 1)[1] in (REPO / "README.md").read_text().replace("\\\n    ", "")


def test_every_node_reaches_the_bucket_through_the_launchers_instance_profile():
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_IAM_ROLE

    types = _load()["available_node_types"]
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["node_config"]["IamInstanceProfile"] == {"Name": DEFAULT_RAY_IAM_ROLE}, name
