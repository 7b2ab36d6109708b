"""MetaICL (ICL paper, section IV): the speech LM trained on episodes, as a Ray Train job.

    stage 1  = episodes with k = 0 (Eq. 15: the speech LM learns SER before it sees long prompts)
    stage 2  = MetaICL (Eq. 18-19): k drawn from 0..7 under the training setting (the paper: TU+LU)

`train_stage` is plain PyTorch; `metaicl_train_many` runs it on every Ray Train worker
(`training.launcher`) with that worker's rank (each rank draws its own episodes; DDP averages the
gradients).
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distmeta.config import from_dict
from distmeta.data.sources import load_corpus
from distmeta.data.speakers import SpeakerTask, speaker_view
from distmeta.features import AudioBank, FrameBank
from distmeta.io import settings_digest, write_json
from distmeta.models import trainable_parameters
from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig, icl_llm_key
from distmeta.models.upstream import Upstream, build_name
from distmeta.report import Progress
from distmeta.training.artifacts import is_done, shaping
from distmeta.training.launcher import RayTrainScaling, storage_path, train_many
from distmeta.speaker.episodes import Episode, episode_batch, random_episodes, stage_enrollment


@dataclass
class MetaICLConfig(RayTrainScaling):
    stage1_steps: int = 800  # episodes without enrollment pairs
    # MetaICL episodes; shorter stage 2 runs learn to copy the pairs' labels first (docs/speaker.md)
    stage2_steps: int = 2400
    batch_size: int = 16  # episodes per step (per worker)
    lr: float = 3e-3
    # Each stage's rate falls along a cosine from `lr` to `lr` x lr_floor (1: constant): at a constant rate the
    # validation loss of successive checkpoints scatters more than it falls, and the kept one is a lucky draw.
    lr_floor: float = 0.05
    weight_decay: float = 0.0
    label_smoothing: float = 0.1  # the paper's
    val_every: int = 200  # steps between validations (loss on the validation speakers; the best is kept)
    val_episodes: int = 256
    seed: int = 0
    # Trainings of each stage-2 setting from the one stage-1 model, differing only in the episodes they draw;
    # the one with the lowest validation loss is kept. Between two such draws, what the speech LM reads from
    # its pairs differs about as much as the effects under study (docs/results/speaker.md), and the
    # validation speakers' loss ranks them as their test speakers do.
    draws: int = 2
    # Stage-2 trainings side by side, that many Ray Train runs once stage 1 is saved (not in the cache key:
    # a model is the same whichever run trains it, up to the float rounding of its worker's thread count)
    parallel: int = 2


# A worker reports only at validations (every 200 steps: a minute or more apart), so its Ray Train controller
# collects reports every second instead of polling at the pretraining jobs' 0.1 s, which would keep part of a
# core busy for each stage-2 run.
REPORT_WAIT_S = 1.0


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the SpeechLM in .module


def validation_loss(model, bank, episodes: list[Episode], words, batch_size: int, device="cpu") -> float:
    """Mean target-label cross-entropy (no smoothing) over fixed episodes."""
    inner = _unwrap(model)
    inner.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(episodes), batch_size):
            chunk = episodes[start:start + batch_size]
            total += inner(*episode_batch(inner, bank, chunk, words, device)).item() * len(chunk)
    inner.train()
    return total / len(episodes)


def stage_lr(config: MetaICLConfig, step: int, steps: int) -> float:
    """The rate of 1-based `step` of a stage of `steps`: cosine from config.lr down to lr x lr_floor."""
    return config.lr * (config.lr_floor + (1 - config.lr_floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def make_optimizer(model, config: MetaICLConfig) -> torch.optim.Optimizer:
    """RAdam (the paper's) over the trainable parameters."""
    return torch.optim.RAdam([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)


def train_stage(model, bank, train_tasks: list[SpeakerTask], val_episodes: list[Episode], words: list[str], *,
                steps: int, setting: str, shots: tuple[int, int], emotion: int | None, config: MetaICLConfig,
                rank: int = 0, draw: int = 0, start_step: int = 0, optimizer=None, best: dict | None = None, device="cpu",
                on_validation=None, log=print) -> dict:
    """Train `model`'s trainable parameters for `steps` episodes batches; validate every `config.val_every` steps.

    on_validation(step, metrics, optimizer, best) is called after each validation (the job reports and
    checkpoints there). `draw` > 0 draws other training episodes (the validation episodes are the caller's). Returns the best {"val_loss", "step", "state"} (a resumed run passes its `best` so far).
    """
    inner = _unwrap(model)
    optimizer = optimizer or make_optimizer(model, config)
    rng = np.random.default_rng([config.seed, rank, start_step, steps] + ([draw] if draw else []))
    best = best or {"val_loss": math.inf, "step": 0, "state": None}
    progress, running = Progress("step", steps, log, start=start_step), []
    model.train()
    for step in range(start_step + 1, steps + 1):
        for group in optimizer.param_groups:  # a function of the step alone: a resumed stage continues the same curve
            group["lr"] = stage_lr(config, step, steps)
        episodes = random_episodes(train_tasks, config.batch_size, setting, shots, rng, emotion)
        loss = model(*episode_batch(inner, bank, episodes, words, device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step % config.val_every == 0 or step == steps:
            val_loss = validation_loss(model, bank, val_episodes, words, config.batch_size * 4, device)
            metrics = {"step": step, "train_loss": float(np.mean(running)), "val_loss": val_loss}
            running = []
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step, "state": trainable_state(inner)}
            progress.update(step, f"train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}"
                                  f"{' (best)' if best['step'] == step else ''}")
            if on_validation:
                on_validation(step, metrics, optimizer, best)
    return best


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What training changes (LoRA, Q-Former, projection, segment and example embeddings), detached on CPU."""
    return {name: p.detach().cpu().clone(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
            for name, p in trainable_parameters(_unwrap(model)).items()}


def load_trainable(model, state: dict[str, torch.Tensor]):
    """Put a `trainable_state` into a freshly built model; every trainable parameter must be in it."""
    own = set(trainable_parameters(model))
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"speech LM state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def frame_bank(corpus, upstream_config, layer: int, models_dir) -> Path:
    """The frozen encoder's frames of every utterance, computed once per (corpus, upstream, layer) and saved;
    the corpus counts by its fingerprint (audio files' sizes and modification times, labels), so audio
    changed in place gets new frames."""
    key = json.dumps([corpus.fingerprint(), asdict(upstream_config), build_name(upstream_config), layer])
    path = Path(models_dir).resolve() / f"frames-{upstream_config.name}-{settings_digest(key)}.safetensors"
    if not path.is_file():
        print(f"encoding {len(corpus.utterances)} utterances with {upstream_config.name} (layer {layer}) -> {path}", flush=True)
        FrameBank(Upstream(upstream_config), AudioBank(corpus, corpus.utterances.index), layer).save(path)
    return path


def load_speech_lm(path):
    """A trained speech LM from its safetensors file and JSON sidecar (config, encoder width, label words)."""
    sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    # saved before the word tokenizer: bytes; before the binding: the paper's position embedding alone
    settings = {"tokenizer": "bytes", "binding": "position", **sidecar["settings"]["model"]}
    config = from_dict(SpeechLMConfig, settings)
    trained_on = sidecar["settings"].get("llm_build", "")
    if trained_on and trained_on != icl_llm_key(config):  # LoRA and the connector fit one LLM's weights only
        raise ValueError(f"speech LM {path}: trained on the LLM build {trained_on}, but these settings load "
                         f"{icl_llm_key(config)} (the in-context pretraining changed since); retrain it")
    model = SpeechLM(config, sidecar["encoder_dim"], sidecar["words"])
    return load_trainable(model, load_file(str(path))).eval()


def _train_loop(worker) -> None:
    """Runs on every Ray Train worker (a `training.launcher.Worker`): trains each pending speech LM in turn,
    resuming an interrupted one from the run's latest progress checkpoint."""
    import ray.train.torch

    rank, world, device = worker.rank, worker.world, worker.device
    data, bank = worker.shared["data"], worker.shared["frames"]
    for number, request in worker.pending():
        settings = request["settings"]
        config = from_dict(MetaICLConfig, settings["meta"])
        training, draw = settings["training"], settings.get("draw", 0)
        model_config = from_dict(SpeechLMConfig, settings["model"])
        # Seeded before the model is built: a Ray worker process may have drawn from torch's generator before
        # (another run's work), and the Q-Former's and LoRA's initial weights must not depend on that.
        torch.manual_seed(config.seed + rank)
        model = SpeechLM(model_config, bank.dim, data.words)
        if request["init"]:
            load_trainable(model, worker.start_state(request))
        optimizer = make_optimizer(model, config)
        start_step, best = 0, None
        folder = worker.resume_folder(request)
        if folder is not None:  # a restarted worker group: continue the model it was training
            progress = json.loads((folder / "progress.json").read_text())
            load_trainable(model, load_file(str(folder / "latest.safetensors")))
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
            best = {"val_loss": progress["best_val_loss"], "step": progress["best_step"],
                    "state": load_file(str(folder / "best.safetensors"))}
            start_step = progress["step"]
            if rank == 0:
                print(f"resuming {training} at step {start_step}", flush=True)
        model.to(device)
        if world > 1:
            model = ray.train.torch.prepare_model(model, move_to_device=False)
        setting, shots, emotion = stage_enrollment(training, data.emotions, model_config.max_shots)
        steps = config.stage1_steps if training == "stage1" else config.stage2_steps
        val_rng = np.random.default_rng([config.seed, 1])
        val_episodes = random_episodes(data.splits["valid"], config.val_episodes, setting, shots, val_rng, emotion)
        if rank == 0:
            print(f"[{number}/{len(worker.requests)}] training speech LM {training}"
                  f"{f' (draw {draw + 1} of {config.draws})' if training != 'stage1' and config.draws > 1 else ''}: {steps} steps of "
                  f"{config.batch_size} x {world} episodes, {setting} with {shots[0]}..{shots[1]} pairs", flush=True)

        def on_validation(step, metrics, optimizer, best, training=training, model=model, request=request):
            def progress(folder):
                save_file(trainable_state(model), str(folder / "latest.safetensors"))
                save_file(best["state"], str(folder / "best.safetensors"))
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")
                write_json(folder / "progress.json", {"step": step, "best_val_loss": best["val_loss"],
                                                      "best_step": best["step"]})
            worker.report({**metrics, "training": training}, request, progress)

        torch.manual_seed(config.seed + rank)
        best = train_stage(model, bank, data.splits["train"], val_episodes, data.words, steps=steps, setting=setting,
                           shots=shots, emotion=emotion, config=config, rank=rank, draw=draw, start_step=start_step,
                           optimizer=optimizer, best=best, device=device, on_validation=on_validation,
                           log=(lambda line: print(f"{training}{f' draw {draw + 1}' if draw else ''} {line}", flush=True))
                           if rank == 0 else None)
        worker.finish(request, best["state"], {"settings": settings, "best_val_loss": best["val_loss"],
                                               "best_step": best["step"], "resumed_from_step": start_step,
                                               "encoder_dim": bank.dim, "words": list(data.words)})


def metaicl_train_many(data_config, upstream_config, encoder_layer: int, model_config, meta: MetaICLConfig,
                       trainings, frames, models_dir, storage: str = "", max_failures: int = 2,
                       on_run_done=None) -> dict:
    """Stage 1, then each stage-2 `trainings` setting from it, `meta.draws` times, in Ray Train runs
    (`training.launcher`): one run, or with `meta.parallel` > 1 stage 1's run and then the stage-2 trainings
    shared among that many runs side by side, each starting from the saved stage-1 model.

    Returns {"stage1": path, training: path, ...}: safetensors of the trainable parameters (best validation
    step) with a JSON sidecar, of each setting the draw with the lowest validation loss (every draw stays
    saved: `draw_paths`); models already saved with the same settings are reused. The workers get the
    speaker data and the frames through Ray; `storage`: Ray's storage (a folder every node sees, or a URI;
    "": models_dir/ray, one node). `on_run_done(runs_left)`: as `train_many`'s, for every run of both stages.
    """
    common = json.loads(json.dumps({"data": asdict(data_config), "frames": Path(frames).name, "upstream": asdict(upstream_config),
                                    "upstream_build": build_name(upstream_config),
                                    "encoder_layer": encoder_layer, "model": asdict(model_config),
                                    "llm_build": icl_llm_key(model_config) if model_config.llm == "tiny_icl" else "",
                                    # one draw's model is the same however many there are
                                    "meta": {k: v for k, v in shaping(meta).items() if k != "draws"}}))
    models_dir, key = Path(models_dir).resolve(), settings_digest(common)
    stage1 = models_dir / f"speech_lm-{key}-stage1.safetensors"
    draws = {t: draw_paths(models_dir, key, t, meta.draws) for t in trainings}
    requests = [{"settings": {**common, "training": "stage1"}, "out_path": str(stage1), "init": ""}]
    requests += [{"settings": {**common, "training": t, **({"draw": d} if d else {})}, "out_path": str(p), "init": str(stage1)}
                 for t, paths in draws.items() for d, p in enumerate(paths)]
    if not all(is_done(r["out_path"], r["settings"]) for r in requests):
        shared = {"data": speaker_view(load_corpus(data_config, progress=False)), "frames": FrameBank.load(frames)}
        waves = [requests] if meta.parallel <= 1 else [requests[:1], requests[1:]]
        for wave in waves:
            train_many(_train_loop, wave, shared, meta, storage_path(storage, models_dir / "ray"), f"metaicl-{key}",
                       max_failures, on_run_done, report_wait_s=REPORT_WAIT_S)
    kept = {}
    for training, paths in draws.items():  # each setting's draw with the lowest validation loss (the first of equals)
        losses = [json.loads(p.with_suffix(".json").read_text())["best_val_loss"] for p in paths]
        best = int(np.argmin(losses))
        kept[training] = paths[best]
        if len(paths) > 1:
            print(f"speech LM {training}: kept draw {best + 1} of {len(paths)} "
                  f"(validation losses {', '.join(f'{loss:.4f}' for loss in losses)})", flush=True)
    return {"stage1": stage1, **kept}


def draw_paths(models_dir: Path, key: str, training: str, draws: int) -> list[Path]:
    """Where each draw of a stage-2 training is saved (the first under the setting's plain name)."""
    name = f"speech_lm-{key}-{training.replace('+', '_')}"
    return [models_dir / f"{name}{f'-draw{d + 1}' if d else ''}.safetensors" for d in range(draws)]
