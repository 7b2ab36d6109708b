"""Meta-PerSER's meta-test: adapt the meta-trained model to one person's labelled items, then predict.

    fast = adapt_to(meta, config, inputs, targets)   # a person's parameters, detached; the meta-model is untouched
    probs = query_probs(meta, bank, query_ids, fast) # eval mode (metatrain: validation predicts the same way)

`config.test_adapt` says how (the protocol's Meta-PerSER and `distmeta enroll` alike):
- `rates`: `test_steps` SGD steps of the scope's parameters with the learned per-layer per-step rates, the
  MAML rule meta-training trained (the paper's meta-test, `--preset paper`);
- `finetune` (the default): first `test_rate_steps` steps of that same rule, then the whole model but the frozen
  conv encoder fine-tuned for `test_steps` AdamW steps at `test_lr` (`training.fit.fine_tune`, the loop
  Entire-Few runs on SSL-E). With scope `head` only the head was meta-trained, and at AdamW's small rates it
  hardly moves in 10 steps, so without the rule first the learned rates would go unused at meta-test; the rule
  adapts the head on pooled features (the upstream is SSL-E's, frozen while the head trains), ~1 ms a step.
"""

import torch

from distmeta.meta.maml import MetaModel
from distmeta.meta.learner import SEEDED, MetaConfig, query_probs
from distmeta.models.ser import set_scope, trainable_parameters
from distmeta.training.fit import fine_tune


def learned_rate_steps(meta: MetaModel, inputs, targets: torch.Tensor, steps: int) -> dict:
    """The scope's parameters after `steps` steps with the learned rates, detached. Where no upstream parameter
    adapts (scope `head`), on the pooled features of `inputs` (eval mode, as at prediction: the same function,
    and the upstream's dropout would otherwise draw); otherwise on `inputs` themselves."""
    upstream_adapts = any(p.requires_grad for p in meta.model.upstream.parameters())
    if not upstream_adapts and "pooled" not in inputs:
        was_training = meta.training
        meta.eval()
        try:
            with torch.no_grad():
                inputs = {"pooled": meta.model.pooled(inputs)}
        finally:
            meta.train(was_training)
    return meta.adapt(inputs, targets, steps)


def adapt_to(meta: MetaModel, config: MetaConfig, inputs, targets: torch.Tensor) -> dict:
    """A person's parameters from their labelled items (`config.test_adapt`, detached): the trainable ones of
    the scope (rates), or every parameter of the model but the frozen conv encoder (finetune); `inputs`
    from `make_bank(..., test=True)`."""
    if config.test_adapt == "rates":
        return meta.adapt(inputs, targets, config.test_steps)
    start = meta.model.clone()
    if config.test_rate_steps:
        start.load_state_dict(learned_rate_steps(meta, inputs, targets, config.test_rate_steps), strict=False)
    with SEEDED, torch.random.fork_rng(devices=[]):  # dropout draws the same in any process
        torch.manual_seed(config.seed)
        model = fine_tune(set_scope(start, "entire"), inputs, targets, steps=config.test_steps, lr=config.test_lr)
    return {name: p.detach() for name, p in trainable_parameters(model).items()}


def adapted_probs(meta: MetaModel, config: MetaConfig, bank, support_ids, support_targets, query_ids) -> torch.Tensor:
    """Meta-test one episode: adapt on the support (`adapt_to`), then query probabilities."""
    fast = adapt_to(meta, config, bank.batch(support_ids), torch.as_tensor(support_targets))
    return query_probs(meta, bank, query_ids, fast)
