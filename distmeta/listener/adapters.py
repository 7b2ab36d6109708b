"""Few-shot methods behind one interface: given an episode, return query probabilities.

    adapter.predict(episode) -> np.ndarray [Q, C]

An Episode holds one test annotator's K support utterances (with labels) and Q
query utterances for one seed. The baselines of the paper (section 2.4):

Random       uniform random probability vectors (Dirichlet(1)); needs no model
Entire-Zero  SSL-E as is
Entire-Few   SSL-E fine-tuned entirely on the support set
Linear-Few   the Linear model (frozen upstream) with layer weights + classifier fine-tuned
Multi-Few    the multi-task model's upstream with a new head from random init trained on the support
Entire-Sim   cosine similarity of SSL-E embeddings to per-emotion centres of the support, softmax
Meta-PerSER  the meta-trained model: steps with its learned per-layer per-step rates (LSLR), then fine-tuned
             entirely as Entire-Few (`meta.test_adapt: finetune`); or the learned rates alone (`rates`)

Ceilings: how much personalization was possible at all.
Entire-All        SSL-E fine-tuned entirely on everything the annotator labelled in the test pool
                  except the episode's queries, until a held-out part of it stops improving (judged from
                  epoch `min_epochs` on)
Oracle-Listener   synthetic corpora: the annotator's own perception model applied to the true emotion
Oracle-Aggregate  synthetic corpora: the average listener's perception model (what aggregation learns at best)
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from distmeta.labels import NUM_CLASSES
from distmeta.metrics import multilabel_scores
from distmeta.models.ser import SERHead, SERModel, set_scope
from distmeta.training.fit import fine_tune, fit


@dataclass
class AdaptConfig:
    # Entire-Few's 10 steps at 5e-4 are what its validation annotators pick within a budget of 10 steps
    # (benchmarks/bench_test_time.py, docs/results/listener.md; Meta-PerSER's pick is meta.test_*). Without
    # the budget they pick 50 at 1e-4: `--preset paper`.
    steps: int = 10  # gradient steps on the one support batch
    lr: float = 5e-4  # AdamW, fine-tuning baselines
    weight_decay: float = 0.0
    batch_size: int = 32  # query prediction batch


@dataclass
class CeilingConfig:
    """Entire-All: fine-tuning on the annotator's whole test pool (minus the queries) with early stopping."""
    lr: float = 1e-3  # 1e-4 (Entire-Few's) stopped within a few epochs below Entire-Few on unseen E1/E4
    max_epochs: int = 30
    patience: int = 3  # epochs without a better held-out score before stopping
    # Epochs before the held-out share may pick or stop: its macro-F1 on ~30-50 items is noisy enough to stop
    # a still-improving model after a few epochs.
    min_epochs: int = 8
    held_out: float = 0.2  # share of the pool kept for early stopping
    # What the held-out share scores: maF1 (macro-F1, what Table 1 reports) or loss (class-balanced; it stops
    # training while macro- and micro-F1 still rise).
    select: str = "maF1"
    max_items: int = 400  # a random subset (seeded by the episode) of larger pools; seen pools hold ~1,700
    batch_size: int = 32
    # Batches of utterances of similar length (training.fit): faster, but a lower ceiling than random batches
    # (docs/results/listener.md), so off.
    length_buckets: bool = False

    def __post_init__(self):
        if not 0 <= self.min_epochs <= self.max_epochs:
            raise ValueError(f"protocol.ceiling.min_epochs ({self.min_epochs}) must be between 0 and "
                             f"protocol.ceiling.max_epochs ({self.max_epochs})")


@dataclass
class Episode:
    seed: int
    support: list[str]
    support_targets: np.ndarray
    query: list[str]
    pool: list[str] = ()  # every item of the annotator's test pool except the queries (for Entire-All)
    pool_targets: np.ndarray | None = None


def _probs(model, bank, ids, batch_size: int) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [torch.softmax(model(bank.batch(ids[i:i + batch_size])), -1) for i in range(0, len(ids), batch_size)]
    return torch.cat(out).cpu().numpy()


class RandomGuess:
    name = "Random"

    def predict(self, episode: Episode) -> np.ndarray:
        return np.random.default_rng(episode.seed).dirichlet(np.ones(NUM_CLASSES), size=len(episode.query))


class ZeroShot:
    def __init__(self, name: str, model, bank, config: AdaptConfig):
        self.name, self.model, self.bank, self.config = name, model, bank, config

    def predict(self, episode: Episode) -> np.ndarray:
        return _probs(self.model, self.bank, episode.query, self.config.batch_size)


class FineTune:
    """Copy the model, train `scope` on the support batch for `steps` AdamW steps, predict the queries.

    With `new_head`, the head is replaced by a freshly initialised one (seeded by the episode) first.
    """

    def __init__(self, name: str, model: SERModel, scope: str, bank, config: AdaptConfig, new_head: bool = False):
        self.name, self.model, self.scope, self.bank, self.config, self.new_head = name, model, scope, bank, config, new_head

    def adapt(self, episode: Episode) -> SERModel:
        model = self.model.clone()
        if self.new_head:
            torch.manual_seed(episode.seed)
            model.head = SERHead(model.upstream.num_layers, model.upstream.dim).to(model.upstream.device)
        set_scope(model, self.scope)
        return fine_tune(model, self.bank.batch(episode.support), torch.as_tensor(episode.support_targets),
                         steps=self.config.steps, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def predict(self, episode: Episode) -> np.ndarray:
        return _probs(self.adapt(episode), self.bank, episode.query, self.config.batch_size)


class FitAll:
    """Entire-All: SSL-E fine-tuned entirely on the episode's pool (a held-out share of it decides when to
    stop, seeded by the episode), then the queries predicted."""

    name = "Entire-All"

    def __init__(self, model: SERModel, bank, config: CeilingConfig):
        self.model, self.bank, self.config = model, bank, config

    def predict(self, episode: Episode) -> np.ndarray:
        if not len(episode.pool):
            raise ValueError("Entire-All needs the episode's pool (run_episodes fills it)")
        config, ids = self.config, list(episode.pool)
        order = np.random.default_rng(episode.seed).permutation(len(ids))[:config.max_items or None]
        cut = max(1, int(round(len(order) * config.held_out)))
        held, train = order[:cut], order[cut:]
        if config.select not in ("loss", "maF1"):
            raise ValueError(f"protocol.ceiling.select must be loss or maF1, got {config.select!r}")
        model = set_scope(self.model.clone(), "entire")
        torch.manual_seed(episode.seed)
        held_ids, held_targets = [ids[i] for i in held], episode.pool_targets[held]
        score = None
        if config.select == "maF1":
            def score(logits):
                return multilabel_scores(torch.softmax(logits, -1), held_targets)["maF1"]
        result = fit(model, lambda idx: self.bank.batch([ids[train[i]] for i in idx]), episode.pool_targets[train],
                     held_targets, lambda idx: self.bank.batch([held_ids[i] for i in idx]),
                     epochs=config.max_epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=0.0,
                     seed=episode.seed, patience=config.patience, min_epochs=config.min_epochs, log=None,
                     lengths=[self.bank.length(ids[i]) for i in train] if config.length_buckets else None,
                     val_lengths=[self.bank.length(i) for i in held_ids],
                     val_score=score)
        model.load_state_dict(result["best_state"])
        return _probs(model, self.bank, episode.query, config.batch_size)


class Oracle:
    """The generator's ground truth for the queries: the annotator's own perception model, or the
    average listener's (`annotator=None`)."""

    def __init__(self, name: str, corpus, annotator: str | None):
        self.name, self.corpus, self.annotator = name, corpus, annotator

    def predict(self, episode: Episode) -> np.ndarray:
        from distmeta.data.synthetic.listeners import oracle_probs

        return oracle_probs(self.corpus, episode.query, self.annotator)


class Similarity:
    """Entire-Sim: p(e|x) = softmax_e cos(f(x), c_e) over the emotions present in the support set.

    A multi-label support item counts towards each of its classes; emotions with
    no support item have no centre and get probability 0.
    """

    name = "Entire-Sim"

    def __init__(self, model: SERModel, bank, config: AdaptConfig):
        self.model, self.bank, self.config = model, bank, config

    def _embed(self, ids) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            size = self.config.batch_size
            return torch.cat([self.model.embed(self.bank.batch(ids[i:i + size])) for i in range(0, len(ids), size)]).cpu()

    def predict(self, episode: Episode) -> np.ndarray:
        support, query = self._embed(episode.support), self._embed(episode.query)
        labels = torch.as_tensor(episode.support_targets) > 0.5
        present = labels.any(0)
        centres = (labels.T.float() @ support) / labels.sum(0).clamp(min=1)[:, None]
        sim = torch.nn.functional.cosine_similarity(query[:, None, :], centres[None, :, :], dim=-1)
        sim = sim.masked_fill(~present[None, :], float("-inf"))
        return torch.softmax(sim, -1).numpy()


class MetaPerSER:
    """Adapt the meta-trained model to the support set as `config.test_adapt` says (metatest.adapt_to): the
    learned LSLR rates (steps past the trained ones reuse the last trained rate), then (finetune) the whole
    model fine-tuned as Entire-Few fine-tunes SSL-E."""

    def __init__(self, name: str, meta, bank, config):
        self.name, self.meta, self.bank, self.config = name, meta, bank, config

    def predict(self, episode: Episode) -> np.ndarray:
        from distmeta.listener.metatest import adapted_probs

        return adapted_probs(self.meta, self.config, self.bank, episode.support, episode.support_targets,
                             episode.query).numpy()


def meta_adapter(name: str, corpus, split, upstream_config, state: dict, meta_config, max_seconds, inputs=None) -> MetaPerSER:
    """A MetaPerSER adapter for the split's test task from a meta-trained state (a MetaModel state dict)."""
    from distmeta.listener.metatrain import build_meta_model, make_bank

    meta = build_meta_model(upstream_config, None, replace(meta_config, ini=False))
    meta.load_state_dict(state)
    bank = make_bank(meta, corpus, split.test_task(corpus).utterances, meta_config, max_seconds, inputs, test=True)
    return MetaPerSER(name, meta, bank, meta_config)


ORACLES = ("Oracle-Listener", "Oracle-Aggregate")


def baseline_adapters(methods, corpus, split, checkpoints: dict, upstream_config, config: AdaptConfig,
                      max_seconds: float | None, ceiling: CeilingConfig | None = None, inputs=None) -> dict:
    """The requested baselines and ceilings for one split, from pretrained checkpoints
    {"ssl_e"|"linear"|"multi": path}. The oracles need a synthetic corpus; elsewhere they are left out.
    `inputs`: a job-wide input bank to take the test pool's inputs from (see features.inputs_for)."""
    from distmeta.features import inputs_for, pooled_for
    from distmeta.listener.pretrain import load_pretrained

    test = split.test_task(corpus)
    adapters = {}
    if "Random" in methods:
        adapters["Random"] = RandomGuess()
    if {"Entire-Zero", "Entire-Few", "Entire-Sim", "Entire-All"} & set(methods):
        ssl_e = load_pretrained("ssl_e", upstream_config, checkpoints["ssl_e"])
        ssl_e_inputs = inputs_for(ssl_e.upstream, test.utterances, inputs, corpus, max_seconds)
        # Zero and Sim: SSL-E is fixed. Without a job-wide bank, from the inputs just built (not the audio again).
        ssl_e_pooled = pooled_for(ssl_e.upstream, test.utterances, ssl_e_inputs if inputs is None else inputs)
        adapters["Entire-Zero"] = ZeroShot("Entire-Zero", ssl_e, ssl_e_pooled, config)
        adapters["Entire-Few"] = FineTune("Entire-Few", ssl_e, "entire", ssl_e_inputs, config)
        adapters["Entire-Sim"] = Similarity(ssl_e, ssl_e_pooled, config)
        adapters["Entire-All"] = FitAll(ssl_e, ssl_e_inputs, ceiling or CeilingConfig())
    if set(ORACLES) & set(methods) and corpus.info.get("listeners"):
        adapters["Oracle-Listener"] = Oracle("Oracle-Listener", corpus, split.test_annotator)
        adapters["Oracle-Aggregate"] = Oracle("Oracle-Aggregate", corpus, None)
    if {"Linear-Few", "Multi-Few"} & set(methods):
        linear = load_pretrained("linear", upstream_config, checkpoints["linear"])
        raw_pooled = pooled_for(linear.upstream, test.utterances, inputs, corpus, max_seconds)  # shared by both
        adapters["Linear-Few"] = FineTune("Linear-Few", linear, "linear", raw_pooled, config)
        if "Multi-Few" in methods:
            multi = load_pretrained("multi", upstream_config, checkpoints["multi"], len(split.train_annotators))
            shared = SERModel(multi.upstream)
            adapters["Multi-Few"] = FineTune("Multi-Few", shared, "head", raw_pooled, config, new_head=True)
    return {name: adapters[name] for name in methods if name in adapters}
