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


def submitted(text: str) -> list[str]:
    """The words of the `python jobs/meta_train.py ...` command in a text (comment marks and line breaks out)."""
    flat = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines())
    start = flat.index("python jobs/meta_train.py --preset paper")
    return flat[start:flat.index("storage=", start)].split() + ["storage"]


def test_the_docs_recipe_cluster_yaml_and_the_paper_preset_agree(cluster):
    """One recipe: docs/cluster.md and cluster.yaml submit the same command, with --preset paper and nothing that
    overrides what the preset places; the preset's actors fit the GPUs cluster.yaml's workers have."""
    from distmeta.config import load
    from distmeta.settings import MetaTrainConfig

    docs = submitted((ROOT / "docs" / "cluster.md").read_text())
    assert docs == submitted((ROOT / "cluster.yaml").read_text())
    paper = load(MetaTrainConfig, preset=ROOT / "configs" / "meta_train" / "paper.yaml")
    overridden = {word.split("=")[0] for word in docs if "=" in word}
    assert not overridden & {"meta.scope", "actors.num_gpus", "protocol.worker_gpus", "pretrain.use_gpu"}
    gpus = cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"]
    assert "80GB" in (ROOT / "cluster.yaml").read_text() and paper.actors.num_gpus * 80 >= 53.1  # GiB, docs/gpu.md
    assert paper.meta.scope == "entire" and paper.pretrain.use_gpu and paper.protocol.queries == 128
    assert gpus / paper.actors.num_gpus >= 8 and 1 / paper.protocol.worker_gpus == 2  # actors per worker, per GPU
