"""Search spaces from YAML: every key and value checked against the job config, errors naming file and key."""

import textwrap

import numpy as np
import pandas as pd
import pytest

from distmeta.config import ConfigError
from distmeta.settings import MetaTrainConfig
from distmeta.meta.actors import ActorConfig
from distmeta.meta.learner import selection
from distmeta.sweep import load_space, sweep_table, trial_resources, with_params


@pytest.fixture(scope="module")
def job_config():
    """The main job's config class: what space keys are checked against."""
    return MetaTrainConfig


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_distributions_sample_inside_their_bounds(tmp_path, job_config):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_space(write(tmp_path, """
        meta.inner_lr: {loguniform: [1.0e-4, 1.0e-1]}
        meta.da_first_order_fraction: {uniform: [0.1, 0.5]}
        meta.shots: {choice: [8, 16, 32]}
        meta.inner_steps: {randint: [2, 5]}
        meta.tasks_per_step: 4
    """), job_config)
    assert isinstance(space["meta.inner_lr"], Float) and isinstance(space["meta.shots"], Categorical)
    assert isinstance(space["meta.inner_steps"], Integer) and space["meta.tasks_per_step"] == 4
    rng = np.random.default_rng(0)
    lr = np.array(space["meta.inner_lr"].sample(size=4000, random_state=rng))
    assert lr.min() >= 1e-4 and lr.max() <= 1e-1
    # log-uniform: log10 is uniform on [-4, -1], so its mean is -2.5 and a quarter lies below 10^-3.25
    assert abs(np.log10(lr).mean() + 2.5) < 0.05 and abs((lr < 10 ** -3.25).mean() - 0.25) < 0.03
    fraction = np.array(space["meta.da_first_order_fraction"].sample(size=1000, random_state=rng))
    assert fraction.min() >= 0.1 and fraction.max() <= 0.5
    assert set(space["meta.shots"].sample(size=200, random_state=rng)) == {8, 16, 32}
    assert set(space["meta.inner_steps"].sample(size=200, random_state=rng)) == {2, 3, 4}


@pytest.mark.parametrize("text, message", [
    ("meta.inner_lrr: {loguniform: [1.0e-4, 1.0e-2]}", "unknown key(s) meta.inner_lrr"),
    ("meta.inner_lr: {gaussian: [0.0, 1.0]}", "give one of loguniform"),
    ("meta.inner_lr: {loguniform: [1.0e-2, 1.0e-4]}", "low < high"),
    ("meta.inner_lr: {loguniform: [0.0, 1.0e-2]}", "low > 0"),
    ("meta.inner_steps: {choice: [3, 2.5]}", "meta.inner_steps must be int"),
    ("meta.inner_steps: {randint: [1.5, 4]}", "integer bounds"),
    ("meta.shots: {choice: []}", "non-empty list"),
    ("meta.csmt: {uniform: [0, 1]}", "meta.csmt must be bool"),
    ("- meta.inner_lr", "a mapping of config keys"),
])
def test_bad_spaces_name_the_file_and_key(tmp_path, job_config, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path, job_config)
    assert message in str(err.value) and str(path) in str(err.value)


def test_with_params_sets_nested_keys_and_leaves_the_base_alone():
    base = {"meta": {"inner_lr": 1.0, "shots": 32}, "out": "x"}
    merged = with_params(base, {"meta.inner_lr": 0.5, "out": "y"})
    assert merged == {"meta": {"inner_lr": 0.5, "shots": 32}, "out": "y"}
    assert base == {"meta": {"inner_lr": 1.0, "shots": 32}, "out": "x"}


def test_trial_reserves_its_actors():
    assert trial_resources(1.0, ActorConfig(), 9).bundles == [{"CPU": 1.0}]
    bundles = trial_resources(0.5, ActorConfig(num_cpus=1.0, num_gpus=0.25), 3).bundles
    assert bundles == [{"CPU": 0.5}] + [{"CPU": 1.0, "GPU": 0.25}] * 3


def test_shot_counts_a_task_cannot_supply_are_refused_before_any_trial(tmp_path, job_config, small_corpus):
    from distmeta.data.scenarios import rotation
    from distmeta.meta.learner import MetaConfig
    from distmeta.sweep import check_shots

    tasks = rotation(small_corpus, "unseen")[0].train_tasks(small_corpus)
    smallest = min(tasks, key=len)
    fits = load_space(write(tmp_path, f"meta.shots: {{choice: [2, {len(smallest)}]}}"), job_config)
    check_shots(fits, MetaConfig(), tasks)
    too_many = load_space(write(tmp_path, f"meta.shots: {{choice: [2, {len(smallest) + 1}]}}"), job_config)
    with pytest.raises(ConfigError, match=f"{smallest.annotator} \\({len(smallest)}\\)"):
        check_shots(too_many, MetaConfig(), tasks)
    with pytest.raises(ConfigError, match=f"up to {len(smallest)} \\({2 * len(smallest)} items per task\\)"):  # no CSMT: K + K
        check_shots(fits, MetaConfig(csmt=False), tasks)


def test_the_objective_follows_the_meta_trainers_model_selection():
    from types import SimpleNamespace

    assert selection("maF1") == ("val_maF1", "max") and selection("loss") == ("val_loss", "min")
    with pytest.raises(ValueError, match="meta.select"):
        selection("miF1")
    # two trials: a has the lower loss, b the higher macro-F1 (at another step than its lowest loss)
    histories = {"a": {"step": [1, 2], "val_loss": [0.8, 0.6], "val_maF1": [0.30, 0.35], "val_miF1": [0.4, 0.5]},
                 "b": {"step": [1, 2], "val_loss": [0.7, 0.9], "val_maF1": [0.45, 0.40], "val_miF1": [0.6, 0.5]}}
    results = [SimpleNamespace(metrics_dataframe=pd.DataFrame(h), config={"meta.inner_lr": i}, metrics={"trial_id": t},
                               path=t, error=None) for i, (t, h) in enumerate(histories.items())]
    by_f1 = sweep_table(results, {"meta.inner_lr": None}, 2, *selection("maF1"))
    assert list(by_f1["trial"]) == ["b", "a"] and list(by_f1["best val_maF1"]) == [0.45, 0.35]
    assert by_f1.loc[0, "best step"] == 1 and by_f1.loc[0, "val_loss"] == 0.7  # the other scores at that step
    by_loss = sweep_table(results, {"meta.inner_lr": None}, 2, *selection("loss"))
    assert list(by_loss["trial"]) == ["a", "b"] and list(by_loss["best val_loss"]) == [0.6, 0.7]


def test_concurrent_trials_are_what_the_cluster_holds_and_a_trial_it_cannot_hold_is_refused(ray_local):
    from distmeta.sweep import concurrent_trials

    # the tests' cluster: 2 CPUs, no GPU
    assert concurrent_trials([{"CPU": 0.5}, {"CPU": 0.5}], 4) == 2  # 1 CPU a trial
    assert concurrent_trials([{"CPU": 1.0}], 1) == 1
    with pytest.raises(ValueError, match="needs 3 CPU and 0 GPU in all"):
        concurrent_trials([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], 2)
    with pytest.raises(ValueError, match="ask for 0.25 GPU each"):
        concurrent_trials([{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.25}], 2)
