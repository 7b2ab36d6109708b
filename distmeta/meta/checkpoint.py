"""Meta-training checkpoints: everything `learner.train` needs to continue after an outer step (the
learner's parameters and AdamW state, the step, the task sampler's random state, the best state so far and
the history), in one safetensors file written atomically, refused on resume if written with other settings."""

import json

import numpy as np
import torch


def save_checkpoint(path, learner, step: int, rng: np.random.Generator, best: dict, history: list,
                    settings: dict) -> None:
    """Everything needed to continue after `step` outer steps, in one safetensors file written atomically;
    `settings`: what shaped the run (see `train`), compared on resume."""
    from safetensors.torch import save_file

    from distmeta.io import atomic_path

    optimizer = learner.optimizer.state_dict()
    tensors = {f"now/{k}": v for k, v in learner.trainable().items()}
    tensors.update({f"best/{k}": v for k, v in best["state"].items()})
    for index, slots in optimizer["state"].items():
        tensors.update({f"opt/{index}/{slot}": torch.as_tensor(value) for slot, value in slots.items()})
    meta = {"step": step, "rng": rng.bit_generator.state, "best_step": best["step"], "best_val_loss": best["val_loss"],
            "best_score": best["score"], "history": history, "param_groups": optimizer["param_groups"], "settings": settings}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"distmeta": json.dumps(meta)})


def load_checkpoint(path, learner, rng: np.random.Generator, settings: dict) -> tuple[int, dict, list]:
    """Restore a checkpoint into `learner` and `rng`; returns (step, best, history). Refuses one written
    with other `settings`, naming every key that differs."""
    from safetensors import safe_open

    from distmeta.config import differences

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["distmeta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    changed = differences(meta.get("settings", {}), settings)
    if changed:
        raise ValueError(f"checkpoint {path} was written with other settings:\n  " + "\n  ".join(changed)
                         + "\nresume with the same settings, or start a new output folder")
    learner.load_trainable({k[4:]: v for k, v in tensors.items() if k.startswith("now/")})
    state = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, slot = key.split("/", 2)
            state.setdefault(int(index), {})[slot] = value
    learner.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng.bit_generator.state = meta["rng"]
    best = {"state": {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}, "step": meta["best_step"],
            "val_loss": meta["best_val_loss"], "score": meta["best_score"]}
    return meta["step"], best, meta["history"]
