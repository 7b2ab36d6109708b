"""The launcher's sharing of requests among Ray Train runs side by side."""

from distmeta.training.launcher import share_out


def request(name: str, init: str = "") -> dict:
    return {"out_path": name, "init": init, "settings": {}}


def test_requests_are_dealt_in_turn_and_a_model_joins_the_run_of_the_model_it_starts_from():
    todo = [request("a"), request("b", init="a"), request("c"), request("d", init="c"), request("e"), request("f", init="saved")]
    shares = share_out(todo, 2)
    assert [[r["out_path"] for r in share] for share in shares] == [["a", "b", "e"], ["c", "d", "f"]]
    assert share_out(todo, 1) == [todo]
    assert [len(share) for share in share_out(todo[:1], 3)] == [1]  # never an empty run


def test_ray_train_workers_the_cluster_cannot_hold_are_refused_before_any_run_starts(ray_local, tmp_path):
    """On the tests' 2-CPU cluster: three one-CPU workers, or a GPU worker, would leave a run pending forever."""
    from types import SimpleNamespace

    import pytest

    from distmeta.training.launcher import train_many

    todo = [{"settings": {"x": 1}, "out_path": str(tmp_path / "m.safetensors"), "init": ""}]
    for scaling, message in ((SimpleNamespace(num_workers=3, use_gpu=False, cpus_per_worker=1), "3 Ray Train workers of 1 CPU each, but the cluster holds 2"),
                             (SimpleNamespace(num_workers=1, use_gpu=True, cpus_per_worker=1), "ask for 1 GPU each, but no node")):
        with pytest.raises(ValueError, match=message):
            train_many(lambda worker: None, todo, {}, scaling, str(tmp_path / "ray"), "test")
