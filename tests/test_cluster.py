"""cluster.yaml against the Ray cluster launcher's own schema, plus what distmeta needs of it."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def launcher_check(config):
    """What `ray up` does before touching the cloud: merge the provider's defaults, validate the schema."""
    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_launcher_accepts_it_and_rejects_broken_copies(cluster):
    launcher_check(cluster)
    no_node_config = copy.deepcopy(cluster)
    del no_node_config["available_node_types"]["gpu_worker"]["node_config"]
    typo = {**copy.deepcopy(cluster), "setup_comands": ["./setup.sh"]}
    for broken, named in ((no_node_config, "node_config"), (typo, "setup_comands")):
        with pytest.raises(Exception, match=named):
            launcher_check(broken)


def test_head_and_gpu_worker_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in workers)
    assert all(t["node_config"]["ImageId"] == types[cluster["head_node_type"]]["node_config"]["ImageId"] for t in workers)


def test_installs_with_the_readme_setup_command_and_starts_ray_from_the_venv_securely(cluster):
    readme = (ROOT / "README.md").read_text()
    assert "./setup.sh" in readme and any("./setup.sh" in c for c in cluster["setup_commands"])
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands and "distmeta/.venv/bin:$PATH" in commands
    assert "--dashboard-host=127.0.0.1" in head
    mounts = cluster["file_mounts"]
    assert {"/home/ubuntu/distmeta", "/home/ubuntu/corpus", "/home/ubuntu/runs/models"} <= set(mounts)
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
