from dataclasses import replace

import numpy as np
import pytest
import torch

from distmeta.listener.adapters import AdaptConfig, Episode, FineTune, RandomGuess, Similarity
from distmeta.metrics import multilabel_scores


def test_random_matches_its_analytic_expectation():
    # Dirichlet(1) coordinates are Beta(1, C-1): each class is predicted with q = (1 - 1/C)^(C-1)
    rng = np.random.default_rng(0)
    targets = (rng.random((128, 9)) < np.linspace(0.02, 0.4, 9)).astype(float)
    q = (8 / 9) ** 8
    pi = targets.mean(0)
    expected_ua = np.mean(q * pi + (1 - q) * (1 - pi))
    expected_mi = 2 * q * pi.sum() / (q * 9 + pi.sum())
    expected_ma = np.mean(2 * q * pi / (q + pi))
    scores = [multilabel_scores(RandomGuess().predict(Episode(s, [], None, ["u"] * 128)), targets) for s in range(400)]
    mean = {k: np.mean([s[k] for s in scores]) for k in ("maF1", "miF1", "UA")}
    assert mean["UA"] == pytest.approx(expected_ua, abs=0.003)
    assert mean["miF1"] == pytest.approx(expected_mi, abs=0.005)
    assert mean["maF1"] == pytest.approx(expected_ma, abs=0.01)


def test_similarity_against_numpy(setting):
    model, _, hidden, episode = setting
    probs = Similarity(model, hidden, AdaptConfig()).predict(episode)
    with torch.no_grad():
        s = model.embed(hidden.batch(episode.support)).numpy()
        q = model.embed(hidden.batch(episode.query)).numpy()
    labels = episode.support_targets > 0.5
    expected = np.zeros_like(probs)
    present = [c for c in range(9) if labels[:, c].any()]
    for i, x in enumerate(q):
        sims = []
        for c in present:
            centre = s[labels[:, c]].mean(0)
            sims.append(x @ centre / np.linalg.norm(x) / np.linalg.norm(centre))
        e = np.exp(np.array(sims) - max(sims))
        expected[i, present] = e / e.sum()
    assert np.allclose(probs, expected, atol=1e-5)


def test_fine_tune_fits_the_support_and_leaves_the_model_alone(setting):
    model, audio, hidden, episode = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AdaptConfig(steps=30, lr=1e-2)
    for scope, bank in (("entire", audio), ("linear", hidden)):
        adapter = FineTune("x", model, scope, bank, config)
        adapted = adapter.adapt(episode)
        targets = torch.as_tensor(episode.support_targets)
        with torch.no_grad():
            start = torch.nn.functional.cross_entropy(model(bank.batch(episode.support)), targets / targets.sum(1, keepdim=True))
            end = torch.nn.functional.cross_entropy(adapted(bank.batch(episode.support)), targets / targets.sum(1, keepdim=True))
        assert end < start, scope
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_meta_perser_fine_tuning_is_entire_fews_procedure_from_the_meta_trained_state(setting):
    from distmeta.features import input_bank
    from distmeta.listener.adapters import MetaPerSER
    from distmeta.meta.learner import MetaConfig
    from distmeta.listener.metatrain import meta_model_of

    model, audio, hidden, episode = setting
    meta = meta_model_of(model.clone(), MetaConfig())  # scope head: only the head was meta-trained
    with torch.no_grad():
        meta.model.head.classifier.bias.add_(torch.linspace(-1, 1, 9))  # a meta-trained state other than `model`'s
    before = {k: v.clone() for k, v in meta.state_dict().items()}
    config, inputs = MetaConfig(test_steps=4, test_lr=3e-3, test_rate_steps=0), input_bank(model.upstream, audio)
    ours = MetaPerSER("Meta-PerSER", meta, inputs, config).predict(episode)
    few = FineTune("Entire-Few", meta.model, "entire", inputs, AdaptConfig(steps=4, lr=3e-3)).predict(episode)
    assert np.allclose(ours, few, atol=1e-6)  # the whole model, AdamW: Entire-Few's steps from another start
    assert all(torch.equal(before[k], v) for k, v in meta.state_dict().items())
    zero = FineTune("x", meta.model, "entire", inputs, AdaptConfig(steps=0)).predict(episode)
    assert not np.allclose(ours, zero, atol=1e-3)
    # the MAML rule: the head alone with the learned rates, on pooled features
    rates = MetaPerSER("Meta-PerSER", meta, hidden, replace(config, test_adapt="rates")).predict(episode)
    assert not np.allclose(rates, ours, atol=1e-3)
    with pytest.raises(ValueError, match="test_adapt"):
        MetaConfig(test_adapt="entire")


def test_new_head_is_seeded_by_the_episode(setting):
    model, _, hidden, episode = setting
    adapter = FineTune("Multi-Few", model, "head", hidden, AdaptConfig(steps=2), new_head=True)
    a, b = adapter.predict(episode), adapter.predict(episode)
    assert np.array_equal(a, b)
    other = Episode(2, episode.support, episode.support_targets, episode.query)
    assert not np.allclose(adapter.predict(other), a)


def test_entire_all_trains_on_the_pool_only_and_stops_early(setting, small_corpus):
    from collections import Counter
    from distmeta.listener.adapters import CeilingConfig, FitAll
    from distmeta.data import rotation
    from distmeta.features import AudioBank, input_bank

    model, _, _, _ = setting
    task = rotation(small_corpus, "seen")[0].test_task(small_corpus)
    support, query = task.sample(8, 12, seed=1)
    rest = np.setdiff1d(np.arange(len(task)), query)[:40]
    pool = [task.utterances[i] for i in rest]
    queries = [task.utterances[i] for i in query]
    episode = Episode(1, [task.utterances[i] for i in support], task.targets[support], queries, pool, task.targets[rest])
    bank = input_bank(model.upstream, AudioBank(small_corpus, pool + queries))
    batches = []
    original = bank.batch
    bank.batch = lambda ids: batches.append(list(ids)) or original(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for select in ("loss", "maF1"):  # early stopping on the held-out loss, or on its macro-F1
        batches.clear()
        probs = FitAll(model, bank, CeilingConfig(lr=3e-3, max_epochs=4, patience=1, min_epochs=1, select=select)).predict(episode)
        assert probs.shape == (12, 9) and np.allclose(probs.sum(1), 1, atol=1e-5)
        # trained and stopped on the pool only; the queries appear once, in the one prediction batch
        with_queries = [b for b in batches if set(b) & set(queries)]
        assert with_queries == [queries], select
        assert all(set(b) <= set(pool) for b in batches if b is not with_queries[0])
        assert set().union(*[b for b in batches if b is not with_queries[0]]) == set(pool)
        # one pass per epoch over every pool item: the held-out score reuses the held-out loss's logits
        seen = Counter(u for b in batches if b is not with_queries[0] for u in b)
        assert len(set(seen.values())) == 1, select
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # batches: random ones by default (the reference: the permutation fit draws), or of similar length
    config = CeilingConfig(lr=3e-3, max_epochs=1, patience=1, min_epochs=1, batch_size=8)
    order = np.random.default_rng(episode.seed).permutation(len(pool))
    train = order[int(round(len(pool) * config.held_out)):]
    first = [pool[train[j]] for j in np.random.default_rng(episode.seed).permutation(len(train))]
    for buckets in (False, True):
        batches.clear()
        FitAll(model, bank, replace(config, length_buckets=buckets)).predict(episode)
        size = config.batch_size
        trained = batches[:len(train) // size]
        assert sum(map(len, trained)) == len(train) and set().union(*trained) == {pool[i] for i in train}
        if buckets:
            assert all([bank.length(u) for u in b] == sorted(bank.length(u) for u in b) for b in trained)
        else:
            assert trained == [first[i:i + size] for i in range(0, len(first), size)]
    with pytest.raises(ValueError, match="pool"):
        FitAll(model, bank, CeilingConfig()).predict(Episode(1, [], None, queries))
    with pytest.raises(ValueError, match="select"):
        FitAll(model, bank, CeilingConfig(select="miF1")).predict(episode)
    with pytest.raises(ValueError, match="protocol.ceiling.min_epochs"):
        CeilingConfig(max_epochs=4)  # the default warm-up (8 epochs) does not fit: said when the config is read


def test_oracles_are_the_generators_perception_models(small_corpus):
    from distmeta.listener.adapters import Oracle
    from distmeta.data.synthetic.listeners import perceive

    listeners = small_corpus.info["listeners"]
    ids = list(small_corpus.utterances.index[:20])
    heard = small_corpus.utterances.loc[ids]
    episode = Episode(0, [], None, ids)
    assert np.allclose(Oracle("Oracle-Listener", small_corpus, "E2").predict(episode), perceive(listeners["E2"], heard))
    average = np.mean([perceive(m, heard) for m in listeners.values()], axis=0)
    assert np.allclose(Oracle("Oracle-Aggregate", small_corpus, None).predict(episode), average)
    with pytest.raises(ValueError, match="no perception model"):
        Oracle("Oracle-Listener", small_corpus, "nobody").predict(episode)


def test_every_adapter_on_the_device_predicts_as_on_the_cpu(setting, small_corpus, device, assert_near):
    """Each few-shot method with its model on `--device`, fed the same CPU banks, against the CPU's run."""
    from distmeta.data import rotation
    from distmeta.features import AudioBank, input_bank
    from distmeta.listener.adapters import CeilingConfig, FitAll, MetaPerSER, ZeroShot
    from distmeta.meta.learner import MetaConfig
    from distmeta.listener.metatrain import meta_model_of

    model, _, pooled, episode = setting
    task = rotation(small_corpus, "seen")[0].test_task(small_corpus)
    rest = [i for i in range(len(task)) if task.utterances[i] not in episode.query][:24]
    episode = replace(episode, pool=[task.utterances[i] for i in rest], pool_targets=task.targets[rest])
    inputs = input_bank(model.upstream, AudioBank(small_corpus, list(episode.support) + list(episode.query) + list(episode.pool)))
    meta_config = MetaConfig(test_steps=3, test_lr=3e-3)

    def adapters(m):
        meta = meta_model_of(m.clone(), meta_config)
        few = AdaptConfig(steps=3, lr=1e-3)
        return {"Entire-Zero": ZeroShot("Entire-Zero", m, inputs, few),
                "Entire-Few": FineTune("Entire-Few", m, "entire", inputs, few),
                "Linear-Few": FineTune("Linear-Few", m, "linear", pooled, few),
                "Multi-Few": FineTune("Multi-Few", m, "head", pooled, few, new_head=True),
                "Entire-Sim": Similarity(m, pooled, few),
                "Entire-All": FitAll(m, inputs, CeilingConfig(lr=3e-3, max_epochs=2, patience=1, min_epochs=1, batch_size=8)),
                "Meta-PerSER (finetune)": MetaPerSER("Meta-PerSER", meta, inputs, meta_config),
                "Meta-PerSER (rates)": MetaPerSER("Meta-PerSER", meta, pooled, replace(meta_config, test_adapt="rates"))}

    on_cpu, on_device = adapters(model), adapters(model.clone().to(device))
    for name, adapter in on_cpu.items():
        assert_near(on_device[name].predict(episode), adapter.predict(episode), what=f"{name} ")
