"""Episode actors on a cluster of one CPU and one (logical) GPU: they request the GPU share configured, a pool
larger than the cluster finishes with the actors it gets, a pool none of whose actors can be placed scores in
the driver, and a demand no node can meet is refused naming the resource; the rows are always the serial ones."""

import pytest

from distmeta.data import rotation
from distmeta.listener.adapters import Oracle, RandomGuess
from distmeta.listener.protocol import ProtocolConfig, run_episodes
from distmeta.listener.workers import EpisodeWorkers


@pytest.fixture(scope="module")
def tiny_cluster():
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def episodes(small_corpus):
    task = rotation(small_corpus, "unseen")[0].test_task(small_corpus)
    adapters = {"Random": RandomGuess(), "Oracle-Listener": Oracle("Oracle-Listener", small_corpus, task.annotator)}
    config = ProtocolConfig(seeds=3, shots=4, queries=8, methods=tuple(adapters), sweep_shots=(), sweep_methods=())
    serial = run_episodes(adapters, task, config, {"scenario": "unseen"}, log=None)
    return adapters, task, config, serial


def run_on(workers, episodes) -> list[dict]:
    adapters, task, config, serial = episodes
    try:
        rows = run_episodes(adapters, task, config, {"scenario": "unseen"}, log=None, workers=workers)
    finally:
        workers.shutdown()
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in serial]
    return rows


@pytest.mark.slow
def test_episode_actors_take_the_gpu_share_configured(tiny_cluster, episodes):
    import ray

    workers = EpisodeWorkers(2, num_cpus=0.5, num_gpus=0.5)
    workers.actors = [workers._start() for _ in range(2)]
    assert [ray.get(a.gpu_ids.remote()) for a in workers.actors] == [["0"], ["0"]]  # both packed on the one GPU
    run_on(workers, episodes)  # without CUDA the models stay on the CPU: the same rows


@pytest.mark.slow
def test_a_pool_larger_than_the_cluster_or_with_no_room_at_all_still_finishes(tiny_cluster, episodes):
    import ray

    run_on(EpisodeWorkers(3, num_cpus=0.5), episodes)  # room for two of three: they score everything

    @ray.remote(num_cpus=1)
    class Holder:  # another phase's actor holding the only CPU, as task actors do
        def ping(self):
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    try:
        run_on(EpisodeWorkers(2, num_cpus=1), episodes)  # none placed: the driver scores them, never a hang
    finally:
        ray.kill(holder)


def test_a_demand_no_node_can_meet_is_refused_naming_the_resource(tiny_cluster, episodes):
    adapters, task, config, _ = episodes
    for workers, resource in ((EpisodeWorkers(1, num_cpus=2), "2 CPU each, but no node of the Ray cluster has more than 1 CPU"),
                              (EpisodeWorkers(1, num_gpus=2), "2 GPU each, but no node of the Ray cluster has more than 1 GPU")):
        with pytest.raises(ValueError, match=resource):
            run_episodes(adapters, task, config, {}, log=None, workers=workers)
        assert workers.actors == []
