"""The ICL paper's classifier baselines (section III-A, Eq. 1-5), on frames computed once.

    frames [B, F, D] -> (Scratch only: the speech encoder's shape from random weights, trained:
                         conv + pooling subsampling, transformer blocks; models/speech_encoder.py)
                     -> attentive pooling -> h [B, D]
    Personalized: the same pooling of R reference utterances of the target's speaker,
                  concatenated after h in a fixed order -> [B, (1 + R) D]
                  (N: one neutral utterance [11]; A: one utterance of each emotion [13])
    -> Linear -> logits over the emotions

Scratch reads log-mel filterbanks (nothing pretrained anywhere); Pretrained and
the Personalized models read the frozen (pretrained) speech encoder's frames,
the ones the speech LM reads.
"""

import torch
from torch import nn

from distmeta.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig


class AttentivePooling(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(frames).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.einsum("bf,bfd->bd", torch.softmax(scores, -1), frames)


class SpeakerClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, references: int = 0, encoder_layers: int = 0, encoder_dim: int = 128):
        super().__init__()
        self.references = references
        if encoder_layers:  # the speech encoder's shape, from random weights
            self.encoder = SpeechEncoder(SpeechEncoderConfig(n_mels=dim, dim=encoder_dim, layers=encoder_layers,
                                                             ffn_dim=2 * encoder_dim))
            dim = encoder_dim
        else:
            self.encoder = None
        self.pooling = AttentivePooling(dim)
        self.classifier = nn.Linear(dim * (1 + references), num_classes)

    def embed(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            hidden, lengths = self.encoder.encode_mel(frames, mask.sum(1))
            frames = hidden[-1]
            mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
        return self.pooling(frames, mask)

    def forward(self, inputs: dict) -> torch.Tensor:
        """inputs: frames/frame_mask of the targets [B, ...]; with references, ref_frames/ref_mask [B * R, ...]
        (each target's R references together, in the fixed order)."""
        h = self.embed(inputs["frames"], inputs["frame_mask"])
        if self.references:
            refs = self.embed(inputs["ref_frames"], inputs["ref_mask"]).reshape(h.shape[0], -1)
            h = torch.cat([h, refs], -1)
        return self.classifier(h)
