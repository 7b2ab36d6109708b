"""Table 1's headroom column and the paired comparison, against hand computations on a built results frame."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from distmeta.listener.protocol import paired, table1


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    rows = []
    for method, level in (("Entire-Zero", 0.20), ("Entire-Few", 0.22), ("Meta-PerSER", 0.24), ("Entire-All", 0.30),
                          ("Oracle-Listener", 0.6)):
        for annotator in ("E1", "E2", "E3"):
            for seed in range(4):
                noise = rng.normal(0, 0.01, 3)
                rows.append({"method": method, "scenario": "unseen", "upstream": "tiny", "annotator": annotator,
                             "seed": seed, "shots": 32, "maF1": level + noise[0], "miF1": level + 0.1 + noise[1],
                             "UA": 0.6 + noise[2]})
    return pd.DataFrame(rows)


def test_headroom_is_the_share_of_the_zero_to_all_gap(results):
    table = table1(results, 32)
    means = results.groupby("method")["maF1"].mean()
    room = means["Entire-All"] - means["Entire-Zero"]
    for method in ("Entire-Few", "Meta-PerSER", "Oracle-Listener"):
        expected = 100 * (means[method] - means["Entire-Zero"]) / room
        assert float(table.loc[method, ("unseen", "tiny", "headroom")]) == pytest.approx(expected, abs=0.5)
    assert table.loc["Entire-Zero", ("unseen", "tiny", "headroom")] == "0"
    assert table.loc["Entire-All", ("unseen", "tiny", "headroom")] == "100"
    assert list(table.index)[-3:] == ["Meta-PerSER", "Entire-All", "Oracle-Listener"]  # ceilings after the methods
    no_ceiling = table1(results[results["method"] != "Entire-All"], 32)
    assert "headroom" not in no_ceiling.columns.get_level_values(2)


def test_paired_differences_match_scipy(results):
    table = paired(results, "Meta-PerSER", "Entire-Few", 32)
    a = results[results["method"] == "Meta-PerSER"].set_index(["annotator", "seed"])
    b = results[results["method"] == "Entire-Few"].set_index(["annotator", "seed"])
    for metric in ("maF1", "miF1", "UA"):
        diff = 100 * (a[metric] - b[metric])
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        row = table.loc[("unseen", "tiny", metric)]
        assert row["mean"] == pytest.approx(diff.mean(), abs=0.01)
        assert row["low"] == pytest.approx(low, abs=0.01) and row["high"] == pytest.approx(high, abs=0.01)
        assert row["episodes"] == 12 and row["wins"] == int((diff > 0).sum())
    assert paired(results, "Meta-PerSER", "nobody", 32).empty


@pytest.mark.slow
def test_episode_workers_score_the_same_rows_as_the_driver_and_survive_a_lost_worker(small_corpus, tmp_path, ray_local):
    """Whole-model fine-tuning (Entire-Few, Entire-All) on two Ray actors against the serial protocol."""
    import torch

    from distmeta.data import rotation
    from distmeta.features import AudioBank, input_bank
    from distmeta.listener.adapters import AdaptConfig, CeilingConfig, FineTune, FitAll, Oracle, RandomGuess
    from distmeta.listener.protocol import ProtocolConfig, run_episodes
    from distmeta.listener.workers import EpisodeWorkers
    from distmeta.models import SERModel, Upstream, UpstreamConfig

    class DiesOnce:  # defined here, so it travels to the actors by value
        """An adapter whose process exits the first time it is asked (a marker file remembers): a worker lost
        mid-episode, as when a node is preempted."""

        name = "Dies-Once"

        def __init__(self, marker):
            self.marker = marker

        def predict(self, episode):
            import os

            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            return np.full((len(episode.query), 9), 1 / 9 + 0.01 * (episode.seed % 2))

    torch.manual_seed(0)
    model = SERModel(Upstream(UpstreamConfig()))
    task = rotation(small_corpus, "unseen")[0].test_task(small_corpus)
    bank = input_bank(model.upstream, AudioBank(small_corpus, task.utterances))
    adapters = {"Random": RandomGuess(), "Entire-Few": FineTune("Entire-Few", model, "entire", bank, AdaptConfig(steps=3)),
                "Entire-All": FitAll(model, bank, CeilingConfig(max_epochs=2, min_epochs=1, max_items=40)),
                "Oracle-Listener": Oracle("Oracle-Listener", small_corpus, task.annotator)}
    config = ProtocolConfig(seeds=2, shots=4, queries=8, methods=tuple(adapters), sweep_shots=(2, 4),
                            sweep_methods=("Entire-Few",), sweep_seeds=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU actor: the same arithmetic, so the same scores to the last bit
    try:
        serial = run_episodes(adapters, task, config, {"scenario": "unseen"}, log=None)
    finally:
        torch.set_num_threads(threads)
    workers = EpisodeWorkers(2)
    try:
        parallel = run_episodes(adapters, task, config, {"scenario": "unseen"}, log=None, workers=workers)
        assert len(parallel) == len(serial) == 2 * 4 + 2 * 1
        for mine, theirs in zip(parallel, serial):  # the same plan order and scores (actors: one thread each)
            assert {k: v for k, v in mine.items() if k != "seconds"} == pytest.approx(
                {k: v for k, v in theirs.items() if k != "seconds"}, abs=0)
        lost = {**adapters, "Dies-Once": DiesOnce(str(tmp_path / "died"))}
        again = run_episodes(lost, task, replace(config, methods=tuple(lost)), {}, log=None, workers=workers)
        assert (tmp_path / "died").exists() and len(again) == 2 * 5 + 2 * 1
        assert [r["method"] for r in again[:5]] == list(lost)
    finally:
        workers.shutdown()


def test_a_sweep_k_the_test_pool_cannot_hold_is_left_out_and_named_and_table_1s_k_must_fit():
    """A 20-item pool with Q=8 holds K=8 and K=12 beside the queries, not K=16: that K is left out (logged,
    and named in the sweep table's title); a Table 1 K that does not fit is an error naming the annotator."""
    from distmeta.data import Task, TooFewItems
    from distmeta.listener.protocol import ProtocolConfig, run_episodes, sweep_note

    class Uniform:
        def predict(self, episode):
            return np.full((len(episode.query), 2), 0.5)

    targets = np.eye(2, dtype=np.float32)[np.arange(20) % 2]
    small = Task("E5", "sessions [5]", tuple(f"u{i}" for i in range(20)), targets)
    config = ProtocolConfig(seeds=1, shots=8, queries=8, methods=("Entire-Few",), sweep_shots=(8, 12, 16),
                            sweep_methods=("Entire-Few",))
    said = []
    rows = run_episodes({"Entire-Few": Uniform()}, small, config, {"scenario": "unseen"}, log=said.append)
    assert sorted(r["shots"] for r in rows) == [8, 12]
    assert said[0] == "  E5: shots sweep K=[16] left out: 20 items in sessions [5], Q=8 of them queries"
    big = Task("E1", "sessions [5]", tuple(f"v{i}" for i in range(40)), np.eye(2, dtype=np.float32)[np.arange(40) % 2])
    rows += run_episodes({"Entire-Few": Uniform()}, big, config, {"scenario": "unseen"}, log=None)
    assert sweep_note(pd.DataFrame(rows), ["Entire-Few"], 8) == " (K=16 leaves out unseen E5: too few items in their test pools)"
    with pytest.raises(TooFewItems, match="'E5' has 20 labelled utterances"):
        run_episodes({"Entire-Few": Uniform()}, small, replace(config, shots=16), {"scenario": "unseen"}, log=None)


def test_names_sharing_one_adapter_score_each_episode_once_and_get_the_same_rows():
    """Meta-PerSER is Table 2's last row when the settings match: the job hands both names one adapter, and
    each episode is adapted once, its row copied under the second name (which cost nothing)."""
    from distmeta.data import Task
    from distmeta.listener.adapters import RandomGuess
    from distmeta.listener.protocol import ProtocolConfig, run_episodes

    class Counted(RandomGuess):
        calls = 0

        def predict(self, episode):
            Counted.calls += 1
            return super().predict(episode)

    targets = np.eye(9, dtype=np.float32)[np.arange(40) % 9]
    task = Task("E1", "sessions [5]", tuple(f"u{i}" for i in range(40)), targets)
    shared = Counted()
    adapters = {"Random": RandomGuess(), "Meta-PerSER": shared, "Meta[INI+CSMT+DA+LSLR]": shared}
    config = ProtocolConfig(seeds=2, shots=4, queries=8, methods=tuple(adapters), sweep_shots=(2, 4),
                            sweep_methods=("Meta-PerSER",), sweep_seeds=0)
    rows = run_episodes(adapters, task, config, {"scenario": "unseen"}, log=None)
    assert Counted.calls == 2 + 2  # Table 1's two seeds and the sweep's K=2 at each, for both names
    assert [(r["method"], r["shots"]) for r in rows[:3]] == [("Random", 4), ("Meta-PerSER", 4), ("Meta[INI+CSMT+DA+LSLR]", 4)]
    for seed in range(2):
        mine, copy = (next(r for r in rows if r["method"] == m and r["seed"] == seed and r["shots"] == 4)
                      for m in ("Meta-PerSER", "Meta[INI+CSMT+DA+LSLR]"))
        assert {k: v for k, v in copy.items() if k not in ("method", "seconds")} == \
            {k: v for k, v in mine.items() if k not in ("method", "seconds")}
        assert copy["seconds"] == 0.0
    assert len(rows) == 2 * 3 + 2 * 1


@pytest.mark.parametrize("sweep_seeds, swept", [(1, [0]), (2, [0, 1]), (0, [0, 1, 2]), (5, [0, 1, 2])])
def test_the_shots_sweep_runs_its_first_sweep_seeds_and_table_1_every_seed(sweep_seeds, swept):
    from distmeta.data import Task
    from distmeta.listener.adapters import RandomGuess
    from distmeta.listener.protocol import ProtocolConfig, run_episodes

    task = Task("E1", "sessions [5]", tuple(f"u{i}" for i in range(40)), np.eye(9, dtype=np.float32)[np.arange(40) % 9])
    config = ProtocolConfig(seeds=3, shots=4, queries=8, methods=("Random",), sweep_shots=(2, 4, 8),
                            sweep_methods=("Random",), sweep_seeds=sweep_seeds)
    rows = run_episodes({"Random": RandomGuess()}, task, config, {"scenario": "unseen"}, log=None)
    assert sorted(r["seed"] for r in rows if r["shots"] == 4) == [0, 1, 2]
    for k in (2, 8):
        assert sorted(r["seed"] for r in rows if r["shots"] == k) == swept
