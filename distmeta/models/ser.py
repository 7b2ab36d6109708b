"""The SER model of Meta-PerSER, small enough to read in one sitting.

    waveform -> upstream (s3prl) -> hidden states [L, B, F, D]
             -> softmax-weighted sum over L -> per-frame Linear(D, 256)
             -> mean over valid frames -> Linear(256, C) -> logits

Inputs are a dict: {"wavs": [B, T], "lengths": [B]} runs the upstream;
{"conv": [B, C, F'], "lengths": [B]} runs it from its cached, frozen conv
features (`features.ConvFeatureBank`, same result);
{"hidden": [L, B, F, D], "frames": [B]} starts from hidden states; {"pooled":
[L, B, D]} from each layer's mean over valid frames. The projection is affine
and the weighted sum and the mean are averages, so pooling first is exactly
the same function, ~F times cheaper: frozen-upstream scopes cache pooled
features (`features.PooledBank`). Adaptation scopes choose what trains:
entire (everything), head (everything after the upstream), linear (layer
weights + classifier).
"""

import pickle
from typing import Literal

import cloudpickle
import torch
import torch.nn.functional as F
from torch import nn

from distmeta.labels import NUM_CLASSES
from distmeta.models.upstream import Upstream

Scope = Literal["entire", "head", "linear"]
PROJECTION_DIM = 256
# A batch runs through the upstream in up to this many groups of rows of similar length, each padded only to
# its own longest row. Attention, quadratic in the padded length, then pays far less for a random batch's
# padding, and each row's features are nearer its features alone (s3prl's padding mask lets a frame that
# overlaps the padding into attention, ~1e-3 on the logits; batch composition still decides the rest).
LENGTH_GROUPS = 3


class SERHead(nn.Module):
    def __init__(self, num_layers: int, dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))
        self.projector = nn.Linear(dim, PROJECTION_DIM)
        self.classifier = nn.Linear(PROJECTION_DIM, num_classes)

    @staticmethod
    def pool(hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Each layer's mean over the valid frames: [L, B, F, D] -> [L, B, D]."""
        valid = (torch.arange(hidden.shape[2], device=hidden.device)[None, :] < frames[:, None]).to(hidden.dtype)
        return torch.einsum("lbfd,bf->lbd", hidden, valid) / valid.sum(1)[None, :, None]

    def mix(self, pooled: torch.Tensor) -> torch.Tensor:
        """The softmax-weighted sum of the pooled layers: [L, B, D] -> [B, D]."""
        return torch.einsum("l,lbd->bd", torch.softmax(self.layer_weights, dim=0), pooled)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Utterance embeddings [B, 256] from pooled layers: weighted layer sum, then the projection."""
        return self.projector(self.mix(pooled))

    def embed(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.embed_pooled(self.pool(hidden, frames))

    def logits_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from pooled layers. The projection and the classifier are both affine with nothing
        between them, so this applies their product: the same function as classifier(embed_pooled(pooled)),
        whose gradients skip the 256-wide projection of every item (most of an inner step on pooled features:
        meta-training runs ~1.3x faster)."""
        weight = self.classifier.weight @ self.projector.weight
        bias = self.classifier.weight @ self.projector.bias + self.classifier.bias
        return F.linear(self.mix(pooled), weight, bias)

    def forward(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.logits_pooled(self.pool(hidden, frames))


class SERModel(nn.Module):
    def __init__(self, upstream: Upstream, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.upstream = upstream
        self.head = SERHead(upstream.num_layers, upstream.dim, num_classes)

    def pooled(self, inputs: dict) -> torch.Tensor:
        # Banks hand out CPU tensors; the inputs follow the model to its device (a no-op when they are there).
        device = self.head.classifier.weight.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if "pooled" in inputs:
            return inputs["pooled"]
        if "hidden" in inputs:
            return self.head.pool(inputs["hidden"], inputs["frames"])
        lengths = inputs["lengths"]
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in torch.tensor_split(order, min(LENGTH_GROUPS, len(order))):
            longest = lengths[rows].max()
            wavs = inputs.get("wavs")
            conv = inputs.get("conv")
            if conv is not None:
                conv = conv[rows, :, :int(self.upstream.frame_counts(longest[None])[0])]
            else:
                wavs = wavs[rows, :int(longest)]
            parts.append(self.head.pool(*self.upstream(wavs, lengths[rows], conv=conv)))
        pooled = torch.cat(parts, dim=1)
        return pooled[:, torch.argsort(order)]  # back to the batch's row order

    def embed(self, inputs: dict) -> torch.Tensor:
        return self.head.embed_pooled(self.pooled(inputs))

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.head.logits_pooled(self.pooled(inputs))

    def clone(self) -> "SERModel":
        """An independent copy, made in memory (nothing is read from disk, so a model that reached another
        node through Ray clones there too). copy.deepcopy is wrong here: s3prl's forward hooks are closures
        it does not copy, so they would still write the copy's hidden states into the original's buffer; a
        cloudpickle round trip copies them along with the modules they belong to."""
        return pickle.loads(cloudpickle.dumps(self))


def set_scope(model: SERModel, scope: Scope) -> SERModel:
    """Make exactly the scope's parameters trainable (requires_grad), freeze the rest. The upstream's frozen
    conv feature encoder (`Upstream.frozen_names`) stays frozen in every scope."""
    frozen = {f"upstream.{name}" for name in model.upstream.frozen_names()}
    trainable = {
        "entire": lambda name: name not in frozen,
        "head": lambda name: name.startswith("head."),
        "linear": lambda name: name in ("head.layer_weights", "head.classifier.weight", "head.classifier.bias"),
    }
    if scope not in trainable:
        raise ValueError(f"scope must be one of {list(trainable)}, got {scope!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[scope](name))
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
