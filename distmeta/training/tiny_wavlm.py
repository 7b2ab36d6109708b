"""Building the tiny upstream (`models/tiny_wavlm.py`): the random `tiny` checkpoint and `tiny_pretrained`'s recipe.

    path = ready(UpstreamConfig(name="tiny_pretrained"))   # built once per machine (or the shipped build), then loaded

`tiny` is randomly initialised (fast; what the tests use). Its frozen convolutional
encoder is then a random filter bank and its layers carry little of what a voice
conveys, so an SER model on it learns little: on the default corpus a linear probe of
its pooled layers scores below one on plain log-mel statistics (benchmarks/bench_room.py).
The paper's upstream, WavLM Base+, was pretrained on 94k hours, and its layers carry
pitch, loudness and voice quality, which is what SER heads read.

`tiny_pretrained` gives the tiny model that, once per machine, offline: it is trained
on synthetic audio of *other* speakers (its own seed stream, never a corpus's) with three
self-supervised workers in the manner of PASE (Pascual et al. 2019):

- masked frames: WavLM's span masking on the input, each frame's 40 log-mel bands
  reconstructed from the output (L1);
- prosody: from the mean of each layer, regress the voice parameters the utterance
  was rendered with (F0 level and range, rate, level, spectral tilt, open quotient,
  aspiration, jitter, shimmer, creak, final rise, formant shift; standardised, MSE),
  the synthetic counterpart of PASE's prosody worker (F0, voicing, energy), which on
  real speech a pitch tracker would supply;
- pitch: from the last layer, regress each mostly voiced frame's F0 (semitones,
  standardised, MSE), PASE's frame-level prosody target. Without it the layers read F0
  only coarsely (a ridge probe of their means: R^2 0.71 for the F0 level, 0.07 for a
  final rise), and F0 is the main cue of the rare emotions (fear, surprise, disgust)
  that macro-F1 weighs like the common ones.

No emotion label and no listener is involved. The checkpoint is cached under
`$DISTMETA_CACHE/upstreams`, keyed by everything that shapes it. The default build (seed 0, 12 epochs,
2,000 utterances) ships in `models/weights/` under that key, so a fresh machine copies it instead of
spending ~10 minutes on 2 cores; any other setting, recipe or voice generator is built here.
`python -m distmeta.training.tiny_wavlm` rebuilds the shipped copy (after a recipe or voice change).
"""

import shutil
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from distmeta.data.synthetic.cache import render_all
from distmeta.data.synthetic.listeners import SyntheticConfig, draw_speakers, draw_utterances, voice_utterance
from distmeta.data.synthetic.voice import Prosody
from distmeta.io import atomic_path
from distmeta.labels import CLASSES
from distmeta.models.tiny_wavlm import SHIPPED, TINY_WAVLM, checkpoint_path, pretrained_tiny_path, wavlm
from distmeta.report import Progress

HOP = 320  # the conv encoder's downsampling: one frame per 20 ms
PRETRAINING_STREAM = 0x7E1  # second seed word: pretraining audio never shares a corpus's random stream


def _save(model, path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save({"cfg": dict(TINY_WAVLM), "model": model.state_dict()}, tmp)
    return path


def build_tiny_checkpoint(path, seed: int = 0) -> Path:
    """A randomly initialised tiny WavLM saved in s3prl's checkpoint format (plain-dict cfg + state dict)."""
    path = Path(path)
    return path if path.is_file() else _save(wavlm(seed), path)


def frame_pitch(pitch: np.ndarray) -> np.ndarray:
    """Per-sample F0 (Hz, 0 unvoiced) -> one value per conv frame: the mean F0 of a mostly voiced frame in
    semitones above 100 Hz, NaN for the others."""
    frames = pitch[:len(pitch) // HOP * HOP].reshape(-1, HOP)
    voiced = frames > 0
    semitones = 12 * np.log2(np.where(voiced, frames, 100.0) / 100.0)
    mean = (semitones * voiced).sum(1) / np.maximum(voiced.sum(1), 1)
    return np.where(voiced.mean(1) > 0.5, mean, np.nan).astype(np.float32)


def _render(job) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wav, prosody, pitch = voice_utterance(*job)
    return wav, np.array([getattr(prosody, f.name) for f in fields(Prosody)], np.float32), frame_pitch(pitch)


def pretraining_audio(seed: int, utterances: int, progress: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Waveforms of synthetic speakers drawn from their own seed stream, each one's standardised voice
    parameters [N, P] (those that vary) and its standardised F0 per frame (NaN where unvoiced)."""
    rng = np.random.default_rng([seed, PRETRAINING_STREAM])
    speakers = draw_speakers(rng)
    plan = draw_utterances(rng, SyntheticConfig(n_utterances=utterances), speakers)
    jobs = [(asdict(speakers[row.speaker]), plan.loc[u, [f"latent_{c}" for c in CLASSES]].to_numpy(float), row.strength,
             row.target_seconds, row.audio_seed) for u, row in zip(plan.index, plan.itertuples())]
    rendered = render_all(_render, jobs, 0, "upstream pretraining audio" if progress else None, 500)
    prosody = torch.from_numpy(np.stack([p for _, p, _ in rendered]))
    prosody = prosody[:, prosody.std(0) > 1e-6]
    voiced = np.concatenate([p[~np.isnan(p)] for _, _, p in rendered])
    pitch = [torch.from_numpy((p - voiced.mean()) / voiced.std()) for _, _, p in rendered]
    return [torch.from_numpy(w) for w, _, _ in rendered], (prosody - prosody.mean(0)) / prosody.std(0), pitch


@contextmanager
def numpy_seeded(seed: int):
    """numpy's global generator seeded for the block and given back as it was: s3prl's WavLM draws its span
    masks from it, so a build is the same every time."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def pretrain_tiny(wavs: list[torch.Tensor], prosody: torch.Tensor, pitch: list[torch.Tensor], epochs: int,
                  seed: int = 0, lr: float = 2e-3, batch_size: int = 32, log=print):
    """The tiny WavLM (conv encoder included) trained with the masked-frame, prosody and pitch workers
    (`pitch`: each utterance's standardised F0 per frame, NaN where unvoiced)."""
    model = wavlm(seed)
    layers = TINY_WAVLM["encoder_layers"]
    log_mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, win_length=400, hop_length=HOP, n_mels=40, center=False)
    frame_worker = nn.Linear(TINY_WAVLM["encoder_embed_dim"], 40)
    prosody_worker = nn.Linear(TINY_WAVLM["encoder_embed_dim"] * (layers + 1), prosody.shape[1])
    pitch_worker = nn.Linear(TINY_WAVLM["encoder_embed_dim"], 1)
    params = [*model.parameters(), *frame_worker.parameters(), *prosody_worker.parameters(), *pitch_worker.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order_rng, progress = np.random.default_rng(seed), Progress("upstream pretraining: epoch", epochs, log)
    with numpy_seeded(seed):
        for epoch in range(1, epochs + 1):
            totals = np.zeros(3)
            order = order_rng.permutation(len(wavs))
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                x = pad_sequence([wavs[i] for i in batch], batch_first=True)
                lengths = torch.tensor([len(wavs[i]) for i in batch])
                padding = torch.arange(x.shape[1])[None] >= lengths[:, None]
                (last, results), _ = model.extract_features(x, padding_mask=padding, mask=True, ret_layer_results=True,
                                                            output_layer=layers)
                target = torch.log(log_mel(x) + 1e-6).transpose(1, 2)
                frames = min(target.shape[1], last.shape[1])
                valid = (torch.arange(last.shape[1])[None] < (lengths // HOP)[:, None]).float()
                frame_loss = ((frame_worker(last[:, :frames]) - target[:, :frames]).abs().mean(-1) * valid[:, :frames]).sum()
                frame_loss = frame_loss / valid[:, :frames].sum()
                pooled = torch.cat([(h.transpose(0, 1) * valid[..., None]).sum(1) for h, _ in results], -1) / valid.sum(1, keepdim=True)
                prosody_loss = ((prosody_worker(pooled) - prosody[batch]) ** 2).mean()
                # F0 of each mostly voiced frame, read from the last layer (PASE's frame-level prosody target)
                f0 = pad_sequence([pitch[i] for i in batch], batch_first=True, padding_value=float("nan"))[:, :frames]
                voiced = ~torch.isnan(f0) & (valid[:, :f0.shape[1]] > 0)
                pitch_loss = ((pitch_worker(last[:, :f0.shape[1]])[..., 0] - f0.nan_to_num()) ** 2)[voiced].mean()
                optimizer.zero_grad()
                (frame_loss + prosody_loss + pitch_loss).backward()
                optimizer.step()
                totals += [frame_loss.item() * len(batch), prosody_loss.item() * len(batch), pitch_loss.item() * len(batch)]
            frame_l1, prosody_mse, pitch_mse = totals / len(wavs)
            progress.update(epoch, f"masked log-mel L1 {frame_l1:.3f}, prosody MSE {prosody_mse:.3f}, frame F0 MSE "
                                   f"{pitch_mse:.3f} (1.0 = knows nothing)")
    return model.eval()


def build_pretrained_tiny(path, seed: int = 0, epochs: int = 12, utterances: int = 2000, log=print) -> Path:
    """The pretrained tiny WavLM at `path`, in s3prl's checkpoint format: when missing, the shipped build of
    the same name (the same key) is copied there, or else it is built there."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED / path.name
    if shipped.is_file():
        if log:
            log(f"pretrained tiny upstream: the build shipped as {shipped} (same settings, recipe and voices) -> {path}")
        with atomic_path(path) as tmp:
            shutil.copyfile(shipped, tmp)
        return path
    if log:
        log(f"building the pretrained tiny upstream once ({utterances} utterances x {epochs} epochs) -> {path}")
    wavs, prosody, pitch = pretraining_audio(seed, utterances, progress=log is not None)
    return _save(pretrain_tiny(wavs, prosody, pitch, epochs, seed, log=log), path)


def ready(config) -> Path | None:
    """Build the checkpoint a `tiny` upstream config needs, once per machine (the jobs call this on the driver
    before any worker or actor constructs the upstream); its path, or None for other names."""
    if config.name == "tiny":
        return build_tiny_checkpoint(checkpoint_path(config), config.seed)
    if config.name == "tiny_pretrained":
        return build_pretrained_tiny(checkpoint_path(config), config.seed, config.pretrain_epochs, config.pretrain_utterances)
    return None


if __name__ == "__main__":  # ship the default build under its current key (after a recipe or voice change: ~10 min)
    current = build_pretrained_tiny(SHIPPED / pretrained_tiny_path().name)  # builds it there unless already shipped
    for stale in set(SHIPPED.glob("*.pt")) - {current}:
        stale.unlink()
