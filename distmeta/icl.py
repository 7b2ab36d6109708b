"""Speaker personalization by in-context learning (ICL paper, section IV): episodes, MetaICL, k-shot inference, UA_spk.

    episode  = one target utterance of a speaker + k of the same speaker's other utterances with their labels
    stage 1  = episodes with k = 0 (Eq. 15: the speech LM learns SER before it sees long prompts)
    stage 2  = MetaICL (Eq. 18-19): k drawn from 0..7 under the training setting (the paper: TU+LU)
    predict  = argmax over the closed set of label words of log P(word | instruction, pairs, target)
    UA_spk   = mean over speakers of each speaker's accuracy (with its std, median, max and min)

`train_stage` is plain PyTorch; the Ray Train job (`jobs/metaicl_train.py`) runs it
on every worker with that worker's rank (each rank draws its own episodes; DDP
averages the gradients).
"""

import hashlib
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from distmeta.config import from_dict
from distmeta.data.sources import DataConfig, load_corpus
from distmeta.data.speakers import SpeakerTask, sample_enrollment, speaker_view
from distmeta.features import AudioBank, FrameBank
from distmeta.io import atomic_path, write_json
from distmeta.models.speaker_classifier import SpeakerClassifier
from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig
from distmeta.models.upstream import Upstream
from distmeta.pretrain import is_done, shaping
from distmeta.report import save_table
from distmeta.train import fit

# Stage-2 enrollment of the paper's Table IV rows: (sampling setting, fewest shots, most shots, only this emotion).
# "stage1" is the first stage (no pairs); "Neutral1" trains the 1-shot_N speech LM of Table II (always one neutral pair).
TRAINING_SETTINGS = {"stage1": ("TU+LU", 0, 0, None), "TU+LU": ("TU+LU", 0, 7, None), "TO+LD": ("TO+LD", 7, 7, None),
                     "Neutral": ("TU+LO", 0, 7, "neutral"), "Neutral1": ("TU+LO", 1, 1, "neutral")}


@dataclass
class MetaICLConfig:
    stage1_steps: int = 800  # episodes without enrollment pairs
    stage2_steps: int = 2400  # MetaICL episodes
    batch_size: int = 16  # episodes per step (per worker)
    lr: float = 3e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.1  # the paper's
    val_every: int = 200  # steps between validations (loss on the validation speakers; the best is kept)
    val_episodes: int = 256
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 0  # 0: the cluster's CPUs shared out among the workers


@dataclass
class Episode:
    task: SpeakerTask
    target: int
    shots: list[int]

    @property
    def utterances(self) -> list[str]:
        """Reading order of the prompt: the enrollment utterances, then the target."""
        return [self.task.utterances[i] for i in self.shots] + [self.task.utterances[self.target]]


def stage_enrollment(training: str, emotions, max_shots: int) -> tuple[str, tuple[int, int], int | None]:
    """(sampling setting, shot range, emotion index) of a training setting; shot counts capped at the
    model's max_shots and, for LD, at the number of emotions."""
    if training not in TRAINING_SETTINGS:
        raise ValueError(f"training setting must be one of {list(TRAINING_SETTINGS)}, got {training!r}")
    setting, low, high, emotion = TRAINING_SETTINGS[training]
    cap = min(max_shots, len(emotions)) if setting.endswith("LD") else max_shots
    return setting, (min(low, cap), min(high, cap)), (list(emotions).index(emotion) if emotion is not None else None)


def random_episodes(tasks: list[SpeakerTask], n: int, setting: str, shots: tuple[int, int], rng: np.random.Generator,
                    emotion: int | None = None) -> list[Episode]:
    """n episodes: a random speaker's random utterance as target, k uniform in shots, enrollment under `setting`."""
    if not tasks:
        raise ValueError("no speakers to draw episodes from (an empty train or validation split?)")
    episodes = []
    while len(episodes) < n:
        task = tasks[int(rng.integers(len(tasks)))]
        target = int(rng.integers(len(task.utterances)))
        k = int(rng.integers(shots[0], shots[1] + 1))
        try:
            episodes.append(Episode(task, target, sample_enrollment(task, target, k, setting, rng, emotion)))
        except ValueError:
            continue  # this speaker cannot supply k pairs for this target (e.g. too few items): draw again
    return episodes


def evaluation_episodes(tasks: list[SpeakerTask], k: int, setting: str, seed: int, emotion: int | None = None) -> list[Episode]:
    """Every utterance of every speaker as a target once, with k enrollment pairs drawn reproducibly.

    The draw depends on (seed, speaker, target, k, setting) only, so every model sees the same prompts.
    Raises ValueError (naming the speaker) when some target cannot get k pairs under `setting`.
    """
    episodes = []
    for task in tasks:
        for target in range(len(task.utterances)):
            key = zlib.crc32(f"{seed}/{task.speaker}/{target}/{k}/{setting}/{emotion}".encode())
            episodes.append(Episode(task, target, sample_enrollment(task, target, k, setting, np.random.default_rng(key), emotion)))
    return episodes


def episode_batch(model, bank, episodes: list[Episode], words: list[str], device="cpu") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(batch, frames, frame_mask) for `model` (a SpeechLM): prompts, target labels and the speech in reading order."""
    prompts = [model.prompt([words[e.task.labels[i]] for i in e.shots]) for e in episodes]
    batch = model.collate(prompts, [words[e.task.labels[e.target]] for e in episodes])
    speech = bank.batch([u for e in episodes for u in e.utterances])
    return ({k: v.to(device) for k, v in batch.items()}, speech["frames"].to(device), speech["frame_mask"].to(device))


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


def make_optimizer(model, config: MetaICLConfig) -> torch.optim.Optimizer:
    """RAdam (the paper's) over the trainable parameters."""
    return torch.optim.RAdam([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)


def train_stage(model, bank, train_tasks: list[SpeakerTask], val_episodes: list[Episode], words: list[str], *,
                steps: int, setting: str, shots: tuple[int, int], emotion: int | None, config: MetaICLConfig,
                rank: int = 0, start_step: int = 0, optimizer=None, best: dict | None = None, device="cpu",
                on_validation=None, log=print) -> dict:
    """Train `model`'s trainable parameters for `steps` episodes batches; validate every `config.val_every` steps.

    on_validation(step, metrics, optimizer, best) is called after each validation (the job reports and
    checkpoints there). Returns the best {"val_loss", "step", "state"} (a resumed run passes its `best` so far).
    """
    inner = _unwrap(model)
    optimizer = optimizer or make_optimizer(model, config)
    rng = np.random.default_rng([config.seed, rank, start_step, steps])
    best = best or {"val_loss": math.inf, "step": 0, "state": None}
    started, running = time.time(), []
    model.train()
    for step in range(start_step + 1, steps + 1):
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
            elapsed = time.time() - started
            if log:
                log(f"step {step}/{steps}: train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}"
                    f"{' (best)' if best['step'] == step else ''}, {elapsed:.0f}s, "
                    f"ETA {elapsed / (step - start_step) * (steps - step):.0f}s")
            if on_validation:
                on_validation(step, metrics, optimizer, best)
    return best


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What training changes (LoRA, Q-Former, projection, segment and example embeddings), detached on CPU."""
    return {name: p.detach().cpu().clone(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
            for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]):
    """Put a `trainable_state` into a freshly built model; every trainable parameter must be in it."""
    own = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"speech LM state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model


@torch.no_grad()
def predict(model, bank, episodes: list[Episode], words: list[str], batch_size: int = 64, generate: bool = False,
            device="cpu") -> list[str]:
    """The predicted label word of every episode: closed-set scoring, or free generation (beam 4) with `generate`."""
    model.eval()
    out = []
    for start in range(0, len(episodes), batch_size):
        batch, frames, mask = episode_batch(model, bank, episodes[start:start + batch_size], words, device)
        if generate:
            out.extend(model.generate(batch, frames, mask))
        else:
            out.extend(words[i] for i in model.score(batch, frames, mask).argmax(-1).tolist())
    return out


def result_rows(episodes: list[Episode], predictions: list[str], words: list[str], **columns) -> pd.DataFrame:
    """One row per episode: speaker, utterance, k, label, prediction, correct (+ `columns`, e.g. model and setting)."""
    return pd.DataFrame([{**columns, "speaker": e.task.speaker, "utterance": e.task.utterances[e.target], "k": len(e.shots),
                          "label": words[e.task.labels[e.target]], "prediction": p,
                          "correct": p == words[e.task.labels[e.target]]} for e, p in zip(episodes, predictions)])


def ua_spk(correct: pd.Series, speakers: pd.Series) -> dict:
    """UA_spk (mean of per-speaker accuracies) and the std (population), median, max and min of those accuracies."""
    per_speaker = correct.astype(float).groupby(speakers.to_numpy()).mean()
    return {"UA_spk": per_speaker.mean(), "std": per_speaker.std(ddof=0), "median": per_speaker.median(),
            "max": per_speaker.max(), "min": per_speaker.min(), "speakers": len(per_speaker)}


# ---- the classifier baselines (Table II's upper rows) -------------------------------------------------

# name -> (reference utterances: none / one neutral / one of each emotion, encoder layers trained from scratch)
BASELINES = {"Scratch": ("none", 2), "Pretrained": ("none", 0), "Personalized_N": ("neutral", 0), "Personalized_A": ("all", 0)}


@dataclass
class ClassifierConfig:
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


def draw_references(task: SpeakerTask, target: int, references: str, emotions, rng: np.random.Generator) -> list[int]:
    """A baseline's reference utterances for one target (never the target itself): none, one neutral
    utterance, or one utterance of each emotion ordered by emotion (the classifier reads them in a fixed order)."""
    if references == "none":
        return []
    if references == "neutral":
        return sample_enrollment(task, target, 1, "TU+LO", rng, list(emotions).index("neutral"))
    return sorted(sample_enrollment(task, target, len(emotions), "TO+LD", rng), key=lambda i: task.labels[i])


def reference_episodes(tasks: list[SpeakerTask], references: str, emotions, rng: np.random.Generator) -> list[Episode]:
    """Every utterance of every speaker as a target, its references as `shots`."""
    return [Episode(task, target, draw_references(task, target, references, emotions, rng))
            for task in tasks for target in range(len(task.utterances))]


def classifier_inputs(bank, episodes: list[Episode]) -> dict:
    inputs = bank.batch([e.task.utterances[e.target] for e in episodes])
    if episodes[0].shots:
        refs = bank.batch([e.task.utterances[i] for e in episodes for i in e.shots])
        inputs.update(ref_frames=refs["frames"], ref_mask=refs["frame_mask"])
    return inputs


def train_classifier(name: str, bank, data, config: ClassifierConfig, log=print):
    """Train baseline `name` on the training speakers (model selection on the validation speakers' loss)."""
    references, encoder_layers = BASELINES[name]
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_refs = {"none": 0, "neutral": 1, "all": len(data.emotions)}[references]
    model = SpeakerClassifier(bank.dim, len(data.emotions), n_refs, encoder_layers)
    train = reference_episodes(data.splits["train"], references, data.emotions, rng)
    val = reference_episodes(data.splits["valid"], references, data.emotions, np.random.default_rng(config.seed + 1))
    one_hot = lambda eps: np.eye(len(data.emotions), dtype=np.float32)[[e.task.labels[e.target] for e in eps]]

    def train_inputs(idx):  # fresh references every batch: the model must not memorise one pairing
        redrawn = [Episode(e.task, e.target, draw_references(e.task, e.target, references, data.emotions, rng))
                   for e in (train[i] for i in idx)]
        return classifier_inputs(bank, redrawn)

    result = fit(model, train_inputs, one_hot(train), one_hot(val), lambda idx: classifier_inputs(bank, [val[i] for i in idx]),
                 epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                 seed=config.seed, log=log)
    model.load_state_dict(result["best_state"])
    return model.eval(), result


def evaluate_classifier(name: str, bank, data, config: ClassifierConfig, seed: int, log=print) -> pd.DataFrame:
    """Train baseline `name`, then predict every test utterance (references drawn reproducibly from `seed`)."""
    model, _ = train_classifier(name, bank, data, config, log=log)
    episodes = reference_episodes(data.splits["test"], BASELINES[name][0], data.emotions, np.random.default_rng(seed))
    with torch.no_grad():
        predicted = torch.cat([model(classifier_inputs(bank, episodes[i:i + 64])).argmax(-1) for i in range(0, len(episodes), 64)])
    return result_rows(episodes, [data.words[i] for i in predicted.tolist()], data.words, model=name, training="",
                       setting="", emotion="")


# ---- frames, and MetaICL as a Ray Train job ---------------------------------------------------------------

def frame_bank(corpus, upstream_config, layer: int, models_dir) -> Path:
    """The frozen encoder's frames of every utterance, computed once per (corpus, upstream, layer) and saved;
    the corpus counts by its fingerprint (audio files' sizes and modification times, labels), so audio
    changed in place gets new frames."""
    key = json.dumps([corpus.fingerprint(), asdict(upstream_config), layer])
    path = Path(models_dir).resolve() / f"frames-{upstream_config.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.safetensors"
    if not path.is_file():
        print(f"encoding {len(corpus.utterances)} utterances with {upstream_config.name} (layer {layer}) -> {path}", flush=True)
        FrameBank(Upstream(upstream_config), AudioBank(corpus, corpus.utterances.index), layer).save(path)
    return path


def load_speech_lm(path):
    """A trained speech LM from its safetensors file and JSON sidecar (config, encoder width, label words)."""
    sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    model = SpeechLM(from_dict(SpeechLMConfig, sidecar["settings"]["model"]), sidecar["encoder_dim"], sidecar["words"])
    return load_trainable(model, load_file(str(path))).eval()


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: trains each requested speech LM in turn, skipping finished ones,
    resuming an interrupted one from the run's latest checkpoint."""
    import tempfile

    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    first = loop_config["requests"][0]["settings"]
    data = speaker_view(load_corpus(from_dict(DataConfig, first["data"]), progress=False))
    bank = FrameBank.load(loop_config["frames"])
    config = from_dict(MetaICLConfig, first["meta"])
    resume = ray.train.get_checkpoint()
    for number, request in enumerate(loop_config["requests"], 1):
        settings, out_path = request["settings"], Path(request["out_path"])
        if is_done(out_path, settings):
            continue
        training = settings["training"]
        model_config = from_dict(SpeechLMConfig, settings["model"])
        model = SpeechLM(model_config, bank.dim, data.words)
        if request["init_path"]:
            load_trainable(model, load_file(request["init_path"]))
        optimizer = make_optimizer(model, config)
        start_step, best = 0, None
        if resume is not None:  # a restarted worker group: continue the model it was training
            with resume.as_directory() as folder:
                progress = json.loads((Path(folder) / "progress.json").read_text())
                if progress["out_path"] == str(out_path):
                    load_trainable(model, load_file(str(Path(folder) / "latest.safetensors")))
                    optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True))
                    best = {"val_loss": progress["best_val_loss"], "step": progress["best_step"],
                            "state": load_file(str(Path(folder) / "best.safetensors"))}
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
            print(f"[{number}/{len(loop_config['requests'])}] training speech LM {training}: {steps} steps of "
                  f"{config.batch_size} x {world} episodes, {setting} with {shots[0]}..{shots[1]} pairs", flush=True)

        def on_validation(step, metrics, optimizer, best, training=training, out_path=out_path, model=model):
            report = {**metrics, "training": training}
            if rank != 0:
                ray.train.report(report)
                return
            with tempfile.TemporaryDirectory() as folder:
                save_file(trainable_state(model), str(Path(folder) / "latest.safetensors"))
                save_file(best["state"], str(Path(folder) / "best.safetensors"))
                torch.save(optimizer.state_dict(), Path(folder) / "optimizer.pt")
                write_json(Path(folder) / "progress.json", {"out_path": str(out_path), "step": step,
                                                            "best_val_loss": best["val_loss"], "best_step": best["step"]})
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))

        torch.manual_seed(config.seed + rank)
        best = train_stage(model, bank, data.splits["train"], val_episodes, data.words, steps=steps, setting=setting,
                           shots=shots, emotion=emotion, config=config, rank=rank, start_step=start_step,
                           optimizer=optimizer, best=best, device=device, on_validation=on_validation,
                           log=(lambda line: print(f"{training} {line}", flush=True)) if rank == 0 else None)
        resume = None
        if rank == 0:
            with atomic_path(out_path) as tmp:
                save_file(best["state"], str(tmp))
            write_json(out_path.with_suffix(".json"), {"settings": settings, "best_val_loss": best["val_loss"],
                                                       "best_step": best["step"], "resumed_from_step": start_step,
                                                       "encoder_dim": bank.dim, "words": list(data.words)})


def metaicl_train_many(data_config, upstream_config, encoder_layer: int, model_config, meta: MetaICLConfig,
                       trainings, frames, models_dir, max_failures: int = 2) -> dict:
    """Stage 1, then each stage-2 `trainings` setting from it, in one Ray Train `TorchTrainer` run.

    Returns {"stage1": path, training: path, ...}: safetensors of the trainable parameters (best validation
    step) with a JSON sidecar; models already saved with the same settings are reused.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    common = json.loads(json.dumps({"data": asdict(data_config), "frames": Path(frames).name, "upstream": asdict(upstream_config),
                                    "encoder_layer": encoder_layer, "model": asdict(model_config), "meta": shaping(meta)}))
    models_dir = Path(models_dir).resolve()
    digest = hashlib.sha256(json.dumps(common, sort_keys=True).encode()).hexdigest()[:10]
    paths = {t: models_dir / f"speech_lm-{digest}-{t.replace('+', '_')}.safetensors" for t in ["stage1", *trainings]}
    requests = [{"settings": {**common, "training": t}, "out_path": str(p),
                 "init_path": "" if t == "stage1" else str(paths["stage1"])} for t, p in paths.items()]
    todo = [r for r in requests if not is_done(r["out_path"], r["settings"])]
    if todo:
        if not ray.is_initialized():
            raise RuntimeError("metaicl_train_many() runs on Ray: call ray.init(...) in the job first")
        cpus = meta.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // meta.num_workers)
        trainer = TorchTrainer(
            _train_loop, train_loop_config={"requests": todo, "frames": str(frames)},
            scaling_config=ScalingConfig(num_workers=meta.num_workers, use_gpu=meta.use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=f"metaicl-{digest}", storage_path=str(models_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        result = trainer.fit()
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if result.error or missing:
            raise RuntimeError(f"MetaICL training failed ({result.error}); models not written: {missing}")
    return paths


# ---- evaluation: conditions, tables ------------------------------------------------------------------------

@dataclass
class EvaluationConfig:
    max_lo_shots: int = 3  # TU+LO columns of Table III / IV (the paper: 1..4, with 50 utterances per emotion; ours: 4)
    seed: int = 0  # enrollment draws (every model sees the same prompts)
    generate: bool = False  # free generation (beam 4, exact match) instead of closed-set scoring
    batch_size: int = 64


def conditions(training: str, n_emotions: int, max_shots: int, config: EvaluationConfig) -> list[tuple]:
    """(test setting, emotion, k) to evaluate a speech LM of `training` on.

    The main model (TU+LU): Table II (0-shot; TU+LD with 1..E-1 pairs; TO+LD with E, i.e. every emotion once)
    and Table III (TU+LD, TU+LU, TE+LD, TE+LU with 1..E-1 pairs; TU+LO of each emotion with 1..max_lo_shots).
    Table IV's models: TU+LD / TO+LD as in Table II and neutral TU+LO. stage1: 0-shot; Neutral1: one neutral pair.
    """
    top = min(max_shots, n_emotions)
    ld = [("TU+LD", "", k) for k in range(1, top)] + ([("TO+LD", "", top)] if top == n_emotions else [])
    lo = lambda emotions: [("TU+LO", e, k) for e in emotions for k in range(1, min(config.max_lo_shots, max_shots) + 1)]
    if training == "stage1":
        return [("", "", 0)]
    if training == "Neutral1":
        return [("TU+LO", "neutral", 1)]
    if training == "TU+LU":
        table3 = [(s, "", k) for s in ("TU+LU", "TE+LD", "TE+LU") for k in range(1, min(max_shots, n_emotions - 1) + 1)]
        return [("", "", 0)] + ld + table3 + lo(["*"])
    return ld + lo(["neutral"])


MODEL_NAMES = {"stage1": "0-shot", "Neutral1": "1-shot_N", "TU+LU": "Proposed", "TO+LD": "Proposed (TO+LD_7)",
               "Neutral": "Proposed (Neutral_0:7)"}


def evaluate_speech_lm(model, bank, data, training: str, config: EvaluationConfig, log=print) -> pd.DataFrame:
    """Every condition of `training`'s model on the test speakers; a condition some speaker cannot supply is skipped."""
    parts = []
    todo = conditions(training, len(data.emotions), model.config.max_shots, config)
    todo = [(s, e, k) for s, e0, k in todo for e in (data.emotions if e0 == "*" else [e0])]
    started = time.time()
    for number, (setting, emotion, k) in enumerate(todo, 1):
        index = list(data.emotions).index(emotion) if emotion else None
        try:
            episodes = evaluation_episodes(data.splits["test"], k, setting or "TU+LU", config.seed, index)
        except ValueError as err:
            log(f"{MODEL_NAMES[training]}: skipping {setting} {emotion} k={k}: {err}")
            continue
        predictions = predict(model, bank, episodes, data.words, config.batch_size, config.generate)
        parts.append(result_rows(episodes, predictions, data.words, model=MODEL_NAMES[training], training=training,
                                  setting=setting, emotion=emotion))
        stats = ua_spk(parts[-1]["correct"], parts[-1]["speaker"])
        elapsed = time.time() - started
        log(f"{MODEL_NAMES[training]} [{number}/{len(todo)}] {setting or '-'} {emotion} k={k}: UA_spk {stats['UA_spk']:.3f}, "
            f"{elapsed:.0f}s, ETA {elapsed / number * (len(todo) - number):.0f}s")
    return pd.concat(parts, ignore_index=True)


def _stats(results: pd.DataFrame) -> pd.Series:
    return pd.Series(ua_spk(results["correct"], results["speaker"]))


def _by_k(results: pd.DataFrame) -> pd.Series:
    """UA_spk per number of enrollment pairs."""
    return pd.Series({k: _stats(part)["UA_spk"] for k, part in results.groupby("k")}, dtype=float)


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table II: classifier baselines, 0-shot and 1-shot_N speech LMs, the proposed model at k = 0..E."""
    rows = []
    for name in [*BASELINES, "0-shot", "1-shot_N"]:
        part = results[results["model"] == name]
        if len(part):
            rows.append({"model": name, "ICL": f"{part['k'].iloc[0]}-shot" if name == "1-shot_N" else "-",
                         "setting": "Neutral" if name == "1-shot_N" else "-", **_stats(part)})
    proposed = results[(results["model"] == "Proposed") & results["setting"].isin(["", "TU+LD", "TO+LD"])]
    for k, part in proposed.groupby("k"):
        rows.append({"model": "Proposed", "ICL": f"{k}-shot", "setting": part["setting"].iloc[0] or "-", **_stats(part)})
    return pd.DataFrame(rows).astype({"speakers": int}).set_index("model")


def table3(results: pd.DataFrame, words, emotions) -> pd.DataFrame:
    """The paper's Table III: UA_spk of the proposed model per enrollment setting (TU+LO per emotion) and k."""
    proposed = results[(results["model"] == "Proposed") & (results["k"] > 0)]
    columns = {}
    for setting in ("TU+LD", "TU+LU", "TE+LD", "TE+LU"):
        part = proposed[proposed["setting"] == setting]
        columns[setting] = _by_k(part)
    for emotion, word in zip(emotions, words):
        part = proposed[(proposed["setting"] == "TU+LO") & (proposed["emotion"] == emotion)]
        if len(part):
            columns[f"TU+LO {word}"] = _by_k(part)
    table = pd.DataFrame(columns)
    table.index = [f"{k}-shot" for k in table.index]
    table.index.name = "ICL"
    return table


def table4(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table IV: test setting TU+LD (TO+LD at k = E) and neutral TU+LO, per training setting and k."""
    rows = {}
    for training in ("TU+LU", "TO+LD", "Neutral"):
        part = results[(results["training"] == training) & (results["k"] > 0)]
        if not len(part):
            continue
        ld = part[part["setting"].isin(["TU+LD", "TO+LD"])]
        lo = part[(part["setting"] == "TU+LO") & (part["emotion"] == "neutral")]
        rows[("TU+LD", training)] = _by_k(ld)
        rows[("TU+LO (Neutral)", training)] = _by_k(lo)
    table = pd.DataFrame(rows).T
    table.columns = [f"{k}-shot" for k in table.columns]
    table.index = [f"{test} / {training}" for test, training in table.index]
    table.index.name = "test setting / training setting"
    return table


def plot_shots(results: pd.DataFrame, path) -> None:
    """UA_spk of the proposed model against the number of enrollment pairs, one line per test setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proposed = results[results["model"] == "Proposed"]
    zero = _stats(proposed[proposed["k"] == 0])["UA_spk"] if (proposed["k"] == 0).any() else None
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in ("TU+LD", "TU+LU", "TE+LD", "TE+LU", "TU+LO"):
        part = proposed[proposed["setting"].isin([setting] + (["TO+LD"] if setting == "TU+LD" else []))]
        if len(part):
            curve = _by_k(part)
            if zero is not None:
                curve = pd.concat([pd.Series({0: zero}), curve])
            ax.plot(curve.index, curve.to_numpy(), marker="o", label=setting + (" (TO+LD at every emotion)" if setting == "TU+LD" else ""))
    ax.set_xlabel("enrollment pairs k")
    ax.set_ylabel("UA_spk")
    ax.set_title("Personalization by ICL on the test speakers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def save_results(results: pd.DataFrame, data, out_dir) -> dict:
    """results.csv and the tables (.md, .csv) and shots.png under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    paths = {"results": out_dir / "results.csv",
             "table2": save_table(table2(results), out_dir, "table2", "Table II: UA_spk on the test speakers", ".3f"),
             "table3": save_table(table3(results, data.words, data.emotions), out_dir, "table3",
                                  "Table III: UA_spk of ICL-based inference per enrollment setting", ".3f")}
    if results["training"].isin(["TO+LD", "Neutral"]).any():
        paths["table4"] = save_table(table4(results), out_dir, "table4",
                                     "Table IV: UA_spk per training setting (MetaICL) and test setting", ".3f")
    plot_shots(results, out_dir / "shots.png")
    paths["shots"] = out_dir / "shots.png"
    return paths
