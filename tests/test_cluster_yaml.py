"""cluster.yaml passes Ray's own cluster-launcher validation and says what the design needs."""

import copy

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
