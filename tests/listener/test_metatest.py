from dataclasses import replace

import numpy as np
import pytest
import torch

from distmeta.features import input_bank
from distmeta.listener.adapters import AdaptConfig, FineTune
from distmeta.listener.metatest import adapted_probs, learned_rate_steps
from distmeta.meta.learner import MetaConfig
from distmeta.listener.metatrain import meta_model_of


@pytest.fixture(scope="module")
def meta_trained(setting):
    """A scope-head meta-model whose head and rates differ from what they start as."""
    model, audio, _, _ = setting
    meta = meta_model_of(model.clone(), MetaConfig())
    with torch.no_grad():
        meta.model.head.classifier.bias.add_(torch.linspace(-1, 1, 9))
        for rate in meta.rates.parameters():
            rate.mul_(torch.linspace(2.0, 0.5, rate.numel()).reshape(rate.shape))  # per-step rates that differ
    return meta, input_bank(model.upstream, audio)


def test_rate_steps_then_fine_tuning_is_the_maml_rule_then_entire_fews_procedure(setting, meta_trained):
    _, _, _, episode = setting
    meta, inputs = meta_trained
    before = {k: v.clone() for k, v in meta.state_dict().items()}
    config = MetaConfig(test_steps=4, test_lr=3e-3, test_rate_steps=3)
    ours = adapted_probs(meta, config, inputs, episode.support, episode.support_targets, episode.query).numpy()
    assert all(torch.equal(before[k], v) for k, v in meta.state_dict().items())  # the meta-model is untouched
    # The reference: the rule through the whole model (not on cached pooled features), dropout off, then
    # Entire-Few's fine-tuning from the adapted head.
    meta.eval()
    head = meta.adapt(inputs.batch(episode.support), torch.as_tensor(episode.support_targets), 3)
    meta.train()
    assert set(head) == {n for n, p in meta.model.named_parameters() if p.requires_grad}  # scope head: the head
    start = meta.model.clone()
    start.load_state_dict(head, strict=False)
    few = FineTune("Entire-Few", start, "entire", inputs, AdaptConfig(steps=4, lr=3e-3)).predict(episode)
    assert np.allclose(ours, few, atol=1e-5)
    plain = adapted_probs(meta, replace(config, test_rate_steps=0), inputs, episode.support, episode.support_targets,
                          episode.query).numpy()
    assert not np.allclose(plain, ours, atol=1e-3)  # the rule moved the head


def test_learned_rate_steps_on_pooled_features_equal_the_rule_on_inputs(setting, meta_trained):
    _, _, hidden, episode = setting
    meta, inputs = meta_trained
    targets = torch.as_tensor(episode.support_targets)
    from_inputs = learned_rate_steps(meta, inputs.batch(episode.support), targets, 5)
    from_pooled = learned_rate_steps(meta, hidden.batch(episode.support), targets, 5)  # a PooledBank's batch
    assert meta.training  # the mode is left as it was
    for name, value in from_inputs.items():
        assert torch.allclose(value, from_pooled[name], atol=1e-5), name
    assert not torch.allclose(from_inputs["head.classifier.bias"], meta.model.head.classifier.bias)


def test_rate_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="test_rate_steps"):
        MetaConfig(test_rate_steps=-1)
