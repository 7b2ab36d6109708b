"""In-context pretraining of the speech LM's LLM (`model.llm: tiny_icl`): a small T5 that reads label pairs.

The ICL paper extends an instruction-tuned LLM that already reads examples in context; no such LLM can be
installed here, and a randomly initialised T5 trained by MetaICL alone learns to copy a pair's label but
never to match the target with its pair (docs/speaker.md). This recipe is our stand-in for the paper's
instruction tuning, run once per setting before MetaICL (the default build ships with the package):

    episode  c classes (2..7), each a fresh random vector pattern over Nq placeholders (Nq in 1..16, so one
             build serves any `model.num_queries`) in the LLM's embedding space, and a fresh assignment of
             label words to them; k pairs drawn from those classes (several shots each), and a
             target of one of them; the speech LM's own prompt (`PromptFormat`: instruction, k pairs of Nq
             placeholders + " Word.", the target's placeholders), the vectors in the placeholders
    loss     cross-entropy of the target's word (+ end of sequence), as MetaICL's
    why      only the pairs can name the target's word, so the LLM must match the target with its pair

What the literature says makes this emerge (bursty episodes with few classes and several shots each,
Chan et al. 2022; short contexts first, Reddy 2024; large batches, Kirsch et al. 2022; weight decay and
label-permuted episodes throughout so the skill does not fade, Singh et al. 2023) is the recipe: a
curriculum from 2 to 7 pairs, batch 128, AdamW with warmup, cosine decay and weight decay, gradient
clipping. With binding "add" (a pair's word embedding on its placeholders, `SpeechLMConfig.binding`) the
matching is one attention hop, and it is learnt in a few hundred steps; with the paper's position
embedding alone it is two hops (the target to its pair, the pair to its label), measured in docs/speaker.md.

    python -m distmeta.training.icl_llm            # (re)build the shipped default build
    python -m distmeta.training.icl_llm --help     # other widths, layers, bindings into the cache
"""

import argparse
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from distmeta.data.speakers import EMOTIONS, WORDS
from distmeta.data.synthetic.cache import default_cache_dir
from distmeta.io import write_json
from distmeta.labels import CLASSES
from distmeta.models.speech_lm import (ICL_SHIPPED, PAIR_LABEL, PROMPT_EMBEDDINGS, SPEECH_TOKEN, PromptFormat,
                                       SpeechLMConfig, icl_llm_folder, icl_llm_key, tiny_t5, word_tokenizer)
from distmeta.report import Progress

LABEL_WORDS = [WORDS.get(c, c.capitalize()) for c in CLASSES]  # every class's word: what episodes name classes with
INSTRUCTION_WORDS = [WORDS[e] for e in EMOTIONS]  # the speaker corpus's, as its instruction lists them
QUERIES = (1, 2, 4, 8, 16)  # placeholders per item a build is trained with (any speech LM's `num_queries`)


@dataclass
class ICLPretrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    clip: float = 1.0
    curriculum: float = 0.5  # share of the steps over which prompts grow from bare and 2 pairs to full and max_shots
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)


@dataclass
class Episode:
    pair_words: list[str]
    vectors: np.ndarray  # [k + 1, Nq, d]: the pairs' placeholders, then the target's
    target_word: str


def draw_episode(rng: np.random.Generator, words: list[str], width: int, queries: int, shots: int,
                 ways: tuple[int, int] = (2, 7), present: float = 1.0, spread: float = 0.5) -> Episode:
    """A pretraining episode of `shots` pairs: 2..7 fresh classes, each a vector pattern over the Nq
    placeholders, named by a fresh draw of `words`; pairs drawn from the classes (every class once when there
    are enough pairs); the target's class among the pairs with probability `present`; an item's noise up to
    `spread` of its class pattern's scale."""
    ways = int(rng.integers(ways[0], min(ways[1], len(words), max(shots, ways[0])) + 1))
    names = rng.choice(words, ways, replace=False)
    scale = rng.uniform(0.5, 2.0)
    patterns = scale * (rng.normal(size=(ways, 1, width)) + rng.uniform(0, 1) * rng.normal(size=(ways, queries, width)))
    patterns += rng.uniform(0, 1) * scale * rng.normal(size=(1, 1, width))  # what the episode's items share (a voice)
    classes = list(rng.permutation(ways))[:shots] + list(rng.integers(ways, size=max(shots - ways, 0)))
    classes = [int(c) for c in rng.permutation(classes)]
    absent = [c for c in range(ways) if c not in classes]
    target = classes[int(rng.integers(shots))] if (rng.random() < present or not absent) else absent[int(rng.integers(len(absent)))]
    spread = rng.uniform(0.05, spread) * scale
    items = patterns[classes + [target]] + spread * rng.normal(size=(shots + 1, 1, width))
    items += 0.05 * scale * rng.normal(size=items.shape)
    return Episode([str(names[c]) for c in classes], items.astype(np.float32), str(names[target]))


def probe_episode(rng: np.random.Generator, width: int, queries: int, shots: int) -> Episode:
    """An episode of the probe (benchmarks/bench_icl_probe.py), fixed since before this recipe: the 7 emotion
    words given to 7 fresh standard-normal class vectors by a fresh permutation; an item is its class vector
    plus noise (spread 0.05-0.3), the same on each placeholder up to a 0.05 jitter. With 7 pairs every class
    is there once; with fewer, distinct classes, the target's among them with probability 0.8 at least."""
    classes = len(INSTRUCTION_WORDS)
    word_of, means, sigma = rng.permutation(classes), rng.normal(size=(classes, width)), rng.uniform(0.05, 0.3)
    target = int(rng.integers(classes))
    if shots == classes:
        pairs = list(rng.permutation(classes))
    else:
        pairs = list(rng.choice(classes, size=shots, replace=False)) if shots else []
        if shots and target not in pairs and rng.random() < 0.8:
            pairs[int(rng.integers(shots))] = target
    items = np.stack([means[c] + sigma * rng.normal(size=width) for c in pairs + [target]])
    vectors = items[:, None] + 0.05 * rng.normal(size=(len(items), queries, width))
    return Episode([INSTRUCTION_WORDS[word_of[c]] for c in pairs], vectors.astype(np.float32), INSTRUCTION_WORDS[word_of[target]])


def probe(llm, prompts: PromptFormat, episodes: int = 512, shots=(1, 3, 7), extra=None) -> dict[int, float]:
    """The probe's accuracy (first label token) at each number of pairs, on held-out probe episodes: reading
    pairs shows as 7 pairs far above 1/7; copying a random pair's word scores ~0.30 at 3."""
    width, queries = llm.config.d_model, prompts.config.num_queries
    return {k: accuracy(llm, prompts, [probe_episode(np.random.default_rng([12345, k, n]), width, queries, k)
                                       for n in range(episodes)], extra) for k in shots}


def batch_inputs(prompts: PromptFormat, table: nn.Embedding, episodes: list[Episode], extra: nn.Module | None = None) -> tuple:
    """(inputs_embeds, attention_mask, labels) of `episodes` in the speech LM's prompt format; `extra`: the
    segment and example embeddings (binding "position")."""
    batch = prompts.collate([prompts.prompt(e.pair_words) for e in episodes], [e.target_word for e in episodes])
    vectors = torch.from_numpy(np.concatenate([e.vectors for e in episodes]))
    embeds = prompts.fill(table, batch, vectors)
    if extra is not None:
        embeds = embeds + extra(batch)
    return embeds, batch["attention_mask"], batch["labels"]


class PositionEmbeddings(nn.Module):
    """The paper's segment and sequence-position (example-index) embeddings, learnt with binding "position"."""

    def __init__(self, d_model: int, max_shots: int):
        super().__init__()
        self.segment = nn.Embedding(2, d_model)
        self.example = nn.Embedding(max_shots + 2, d_model)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.segment(batch["segments"]) + self.example(batch["examples"])


def vocabulary(config: SpeechLMConfig):
    """The word tokenizer of every tiny_icl build: the instruction's words and every class's label word."""
    instruction = config.instruction.format(labels=", ".join(LABEL_WORDS))
    tokenizer = word_tokenizer([instruction, *(PAIR_LABEL.format(word=w) for w in LABEL_WORDS)])
    tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN]})
    return tokenizer


def accuracy(llm, prompts: PromptFormat, episodes: list[Episode], extra=None, batch_size: int = 128) -> float:
    """Share of episodes whose target word's first token is the LLM's most likely first answer token."""
    llm.eval()
    hits = 0
    with torch.no_grad():
        for start in range(0, len(episodes), batch_size):
            embeds, mask, labels = batch_inputs(prompts, llm.get_input_embeddings(), episodes[start:start + batch_size], extra)
            logits = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
            hits += int((logits[:, 0].argmax(-1) == labels[:, 0]).sum())
    llm.train()
    return hits / len(episodes)


def pretrain(llm, prompts: PromptFormat, config: ICLPretrainConfig, extra: nn.Module | None = None, report=None,
             every: int = 250, log=print):
    """Train `llm` (and `extra`) on pretraining episodes; `report(step)` every `every` steps (e.g. a probe).

    The curriculum: over its first `config.curriculum` of the steps, the most pairs grows from 2 to
    max_shots and the share of full prompts (instruction, label text after each pair) from 0 to 1; the
    others are bare (the pairs and the target alone), where matching emerges sooner."""
    params = [*llm.parameters(), *(extra.parameters() if extra is not None else [])]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = lambda step: min(1.0, step / max(config.warmup, 1)) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / config.steps))))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng, d = np.random.default_rng([config.seed, 0x1C1]), llm.config.d_model
    top = prompts.config.max_shots
    # every batch its own number of placeholders per item, so one build serves any `model.num_queries`
    formats = {(q, bare): PromptFormat(prompts.tokenizer, replace(prompts.config, num_queries=q), prompts.words, bare=bare)
               for q in QUERIES for bare in (False, True)}
    shown, losses = Progress("in-context pretraining step", config.steps, log), []
    llm.train()
    for step in range(1, config.steps + 1):
        progress = min(1.0, step / max(config.curriculum * config.steps, 1))
        most = int(round(2 + (top - 2) * progress))
        nq = int(rng.choice(QUERIES))
        episodes = [draw_episode(rng, LABEL_WORDS, d, nq, int(rng.integers(1, most + 1))) for _ in range(config.batch_size)]
        embeds, mask, labels = batch_inputs(formats[nq, bool(rng.random() >= progress)], llm.get_input_embeddings(),
                                            episodes, extra)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % every == 0 or step == config.steps:
            line = f"up to {most} pairs, loss {np.mean(losses):.3f}"
            losses = []
            if report:
                line += ", " + report(step)
            shown.update(step, line)
    return llm.eval()


def build(folder, model: SpeechLMConfig, config: ICLPretrainConfig = ICLPretrainConfig(), report=None, log=print) -> Path:
    """Pretrain a tiny_icl LLM for `model`'s width, layers and binding and save it in `folder` as a Hugging
    Face model folder (+ distmeta.json: the recipe)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = vocabulary(model)
    prompts = PromptFormat(tokenizer, model, INSTRUCTION_WORDS)
    llm = tiny_t5(replace(model, dropout=0.0), tokenizer)
    extra = PositionEmbeddings(llm.config.d_model, model.max_shots) if model.binding == "position" else None
    pretrain(llm, prompts, config, extra, report, log=log)
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    llm.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if extra is not None:
        save_file({k: v.detach().contiguous() for k, v in extra.state_dict().items()}, str(staging / PROMPT_EMBEDDINGS))
    write_json(staging / "distmeta.json", {"key": folder.name, "model": {k: getattr(model, k) for k in (
        "tiny_width", "tiny_layers", "binding", "max_shots")}, "recipe": asdict(config), "queries": list(QUERIES)})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # a folder is whole or absent
    return folder


def ready(model: SpeechLMConfig, recipe: ICLPretrainConfig = ICLPretrainConfig(), log=print) -> None:
    """Make `model.llm = tiny_icl` loadable: the shipped build when it matches these settings, else built once
    into the cache (~minutes on a CPU)."""
    if model.llm != "tiny_icl":
        return
    folder = icl_llm_folder(model)
    if (folder / "config.json").is_file():
        return
    if log:
        log(f"building the in-context-pretrained LLM once for these settings -> {folder}")
    build(folder, model, recipe, log=log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=SpeechLMConfig.tiny_width)
    parser.add_argument("--layers", type=int, default=SpeechLMConfig.tiny_layers)
    parser.add_argument("--binding", default=SpeechLMConfig.binding)
    parser.add_argument("--steps", type=int, default=ICLPretrainConfig.steps)
    parser.add_argument("--out", type=Path, help="folder (default: shipped for the default settings, else the cache)")
    args = parser.parse_args(argv)
    model = replace(SpeechLMConfig(), tiny_width=args.width, tiny_layers=args.layers, binding=args.binding)
    default = icl_llm_key(model) == icl_llm_key(SpeechLMConfig())
    out = args.out or (ICL_SHIPPED if default else default_cache_dir() / "llms") / icl_llm_key(model)
    build(out, model, replace(ICLPretrainConfig(), steps=args.steps))
    if default and args.out is None:  # one shipped build: the current one
        for stale in ICL_SHIPPED.glob("tiny_icl_*"):
            if stale != out:
                shutil.rmtree(stale)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
