"""The ICL paper's classifier baselines (section III-A, Eq. 1-5), on frames computed once.

    frames [B, F, D] -> attentive pooling -> h [B, D]
    Personalized: the same pooling of R reference utterances of the target's speaker,
                  concatenated after h in a fixed order -> [B, (1 + R) D]
                  (N: one neutral utterance [11]; A: one utterance of each emotion [13])
    -> Linear -> logits over the emotions

Pretrained and the Personalized models read the frozen (pretrained) speech
encoder's frames, the ones the speech LM reads. Scratch is the encoder's own
pretraining model (speaker/encoder.py: this pooling + a Linear over the encoder).
"""

import torch
from torch import nn


class AttentivePooling(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(frames).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.einsum("bf,bfd->bd", torch.softmax(scores, -1), frames)


class SpeakerClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, references: int = 0):
        super().__init__()
        self.references = references
        self.pooling = AttentivePooling(dim)
        self.classifier = nn.Linear(dim * (1 + references), num_classes)

    def embed(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pooling(frames, mask)

    def forward(self, inputs: dict) -> torch.Tensor:
        """inputs: frames/frame_mask of the targets [B, ...]; with references, ref_frames/ref_mask [B * R, ...]
        (each target's R references together, in the fixed order)."""
        h = self.embed(inputs["frames"], inputs["frame_mask"])
        if self.references:
            refs = self.embed(inputs["ref_frames"], inputs["ref_mask"]).reshape(h.shape[0], -1)
            h = torch.cat([h, refs], -1)
        return self.classifier(h)
