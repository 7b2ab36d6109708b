"""The speech encoder's pretraining (`models/speech_encoder.py`), as a Ray Train job.

    training speakers' utterances -> log-mel -> encoder -> attentive pooling -> Linear -> their emotion

Supervised SER on the training speakers only (model selection on the validation speakers' loss,
early stopping after `patience` epochs without improvement); test speakers are never read. Afterwards
the encoder is frozen: Pretrained, Personalized_N/A, MAML and the speech LM all read its last layer's
frames. This run is also Table II's Scratch baseline (log-mel -> the encoder's shape from random
weights -> attentive pooling -> softmax, trained on the training speakers' emotions): its pooling and
classifier are saved with it as `head.*` (`load_encoder_ser`), the encoder alone loads as an upstream,
and the Pretrained baseline trains its own head on the frozen frames.

It runs through `training.launcher` like every other pretraining: the workers get the log-mel frames
through the object store, the encoder comes back as a checkpoint, and the driver saves it under
`models_dir` as `speech_encoder-<settings digest>.safetensors` with a JSON sidecar, reused whenever
the corpus, its split and these settings match.
"""

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from distmeta.data.audio import load_audio
from distmeta.io import settings_digest
from distmeta.models.speaker_classifier import AttentivePooling
from distmeta.models.speech_encoder import HEAD, SpeechEncoder, SpeechEncoderConfig, log_mel
from distmeta.models.upstream import UpstreamConfig
from distmeta.training.artifacts import is_done, shaping
from distmeta.training.fit import TrainConfig, fit
from distmeta.training.launcher import RayTrainScaling, storage_path, train_many


@dataclass
class EncoderPretrainConfig(TrainConfig, RayTrainScaling):
    model: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    patience: int = 3  # stop after this many epochs without a better validation loss


class EncoderSER(nn.Module):
    """The encoder with a pretraining head: inputs {"mel": [B, M, n_mels], "mel_lengths": [B]} -> logits."""

    def __init__(self, config: SpeechEncoderConfig, num_classes: int):
        super().__init__()
        self.encoder = SpeechEncoder(config)
        self.pooling = AttentivePooling(config.dim)
        self.classifier = nn.Linear(config.dim, num_classes)

    def forward(self, inputs: dict) -> torch.Tensor:
        hidden, lengths = self.encoder.encode_mel(inputs["mel"], inputs["mel_lengths"])
        mask = torch.arange(hidden[-1].shape[1], device=lengths.device)[None, :] < lengths[:, None]
        return self.classifier(self.pooling(hidden[-1], mask))


def load_encoder_ser(path) -> EncoderSER:
    """The whole pretraining model (encoder + head: the Scratch baseline) from the encoder's checkpoint."""
    encoder = SpeechEncoder.load(path)  # checks the file and its sidecar; leaves the head out
    head = {k.removeprefix(HEAD): v for k, v in load_file(str(path)).items() if k.startswith(HEAD)}
    if "classifier.weight" not in head:
        raise ValueError(f"speech encoder {path}: has no pretraining head ({HEAD}*); it was not saved by this version")
    model = EncoderSER(encoder.config, head["classifier.weight"].shape[0])
    model.load_state_dict({**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **head})
    return model.eval()


def mel_batch(mels: list[torch.Tensor], device="cpu") -> dict:
    return {"mel": pad_sequence(mels, batch_first=True).to(device), "mel_lengths": torch.tensor([len(m) for m in mels]).to(device)}


def _train_loop(worker) -> None:
    """Runs on every Ray Train worker (a `training.launcher.Worker`)."""
    import ray.train.torch

    for number, request in worker.pending():
        settings = request["settings"]
        config = EncoderPretrainConfig(**{**settings["pretrain"], "model": SpeechEncoderConfig(**settings["pretrain"]["model"])})
        parts = worker.shared["parts"]
        torch.manual_seed(config.seed)
        model = ray.train.torch.prepare_model(EncoderSER(config.model, parts["classes"]))
        if worker.rank == 0:
            print(f"pretraining the speech encoder: {len(parts['train'][0])} utterances of the training speakers, "
                  f"{len(parts['valid'][0])} of the validation speakers", flush=True)

        def inputs_for(part):
            return lambda idx: mel_batch([parts[part][0][i] for i in idx], worker.device)

        result = fit(model, inputs_for("train"), parts["train"][1], parts["valid"][1], inputs_for("valid"),
                     **config.fit_settings(), rank=worker.rank, world_size=worker.world, patience=config.patience,
                     on_epoch=lambda epoch, metrics, is_best, state: worker.report({**metrics, "model": "speech_encoder"}),
                     log=functools.partial(print, flush=True) if worker.rank == 0 else None)
        best = {k.removeprefix("module."): v for k, v in result["best_state"].items()}
        state = {k.removeprefix("encoder.") if k.startswith("encoder.") else f"{HEAD}{k}": v for k, v in best.items()}
        worker.finish(request, state, {"settings": settings, "encoder": asdict(config.model),
                                       "best": result["history"][result["best_epoch"] - 1]})


def split_inputs(corpus, tasks, n_mels: int, n_classes: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """The log-mel frames of these speakers' utterances and their emotions one-hot, in task order."""
    paths = corpus.utterances["path"]
    ids = [u for task in tasks for u in task.utterances]
    labels = np.concatenate([task.labels for task in tasks])
    return [log_mel(load_audio(paths[u]), n_mels) for u in ids], np.eye(n_classes, dtype=np.float32)[labels]


def pretrain_encoder(corpus, data, config: EncoderPretrainConfig, models_dir, storage: str = "") -> Path:
    """The pretrained encoder's checkpoint for this corpus and split (trained now unless already saved)."""
    splits = {name: [t.speaker for t in data.splits[name]] for name in ("train", "valid")}
    settings = json.loads(json.dumps({"corpus": corpus.fingerprint(), "speakers": settings_digest(splits),
                                      "emotions": list(data.emotions), "pretrain": shaping(config),
                                      "saved": "encoder and head"}))  # checkpoints without the head retrain
    path = Path(models_dir).resolve() / f"speech_encoder-{settings_digest(settings)}.safetensors"
    request = {"settings": settings, "out_path": str(path), "init": ""}
    parts = {"classes": len(data.emotions)}
    if not is_done(path, settings):  # else train_many has nothing to train: no audio to read
        parts.update({name: split_inputs(corpus, data.splits[name], config.model.n_mels, len(data.emotions))
                      for name in ("train", "valid")})
    train_many(_train_loop, [request], {"parts": parts}, config, storage_path(storage, Path(models_dir) / "ray"),
               f"speech-encoder-{settings_digest(settings)}")
    return path


def ready_upstream(upstream: UpstreamConfig, config: EncoderPretrainConfig, corpus, data, models_dir,
                   storage: str = "") -> UpstreamConfig:
    """`upstream` as the frames are computed from: `speech_encoder` without a path is pretrained here (or
    reused) and gets its checkpoint's path; every other upstream (s3prl's, or an encoder checkpoint the
    user names) is returned as it is."""
    if upstream.name != "speech_encoder" or upstream.path:
        return upstream
    return replace(upstream, path=str(pretrain_encoder(corpus, data, config, models_dir, storage)))
