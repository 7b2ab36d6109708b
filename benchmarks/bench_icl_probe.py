"""Can an LLM learn to read enrollment pairs in context? A synthetic probe in the speech LM's prompt format.

    .venv/bin/python benchmarks/bench_icl_probe.py [--steps 5000] [--width 64] [--layers 2] [--queries 8] [--lr 1e-3]
    .venv/bin/python benchmarks/bench_icl_probe.py --llm /models/flan-t5-base --steps 0   # a pretrained LLM as it is

The speech LM's proposed model gains little or nothing from its enrollment pairs (docs/speaker.md). This
asks the LLM alone whether it can learn what reading pairs takes, with nothing else in the way (no
speech encoder, no Q-Former, no speakers memorised): every episode draws 7 new random class vectors and
assigns the 7 label words to them by a new random permutation, so the pairs are the only way to name the
target's word. Prompts are the speech LM's (`SpeechLM.prompt`: instruction, k pairs of `queries`
placeholder vectors + " Word.", then the target's): a pair's and the target's vectors are their class
vector plus noise. k is drawn from 0..7; with 1..6 pairs the target's class is among them with
probability 0.8 at least, and with 7 every class is there once.

The LLM trains all its weights (AdamW, batch 32), as a pretraining of its own would. Accuracy of the
first label token on 512 held-out episodes at k = 1, 3 and 7 every 250 steps:
    copying the one pair's word at k = 1     ~0.82 (the target's class is there 0.8 of the time)
    copying a random pair's word at k = 3    ~0.30
    reading the pairs (matching the target to its pair) shows as k = 7 far above 1/7 = 0.14.
"""

import argparse
import time

import numpy as np
import torch

from distmeta.models.speech_lm import PAIR_LABEL, SpeechLM, SpeechLMConfig, load_llm

WORDS = ["Neutral", "Surprise", "Sadness", "Joy", "Fear", "Disgust", "Anger"]


def episodes(model, llm, n: int, rng: np.random.Generator, k: int | None = None, spread=(0.05, 0.3), jitter=0.05):
    """(inputs_embeds, attention_mask, labels) of n episodes; `spread`: the range of each episode's
    within-class noise (class vectors are standard normal); `jitter`: noise between one item's placeholders."""
    classes, width, queries = len(WORDS), llm.config.d_model, model.config.num_queries
    prompts, vectors, targets = [], [], []
    for _ in range(n):
        word_of, means, sigma = rng.permutation(classes), rng.normal(size=(classes, width)), rng.uniform(*spread)
        shots = int(rng.integers(0, 8)) if k is None else k
        target = int(rng.integers(classes))
        if shots == classes:
            pairs = list(rng.permutation(classes))
        else:
            pairs = list(rng.choice(classes, size=shots, replace=False)) if shots else []
            if shots and target not in pairs and rng.random() < 0.8:
                pairs[int(rng.integers(shots))] = target
        for c in pairs + [target]:
            item = means[c] + sigma * rng.normal(size=width)
            vectors.append(item[None] + jitter * rng.normal(size=(queries, width)))
        prompts.append(model.prompt([WORDS[word_of[c]] for c in pairs]))
        targets.append(WORDS[word_of[target]])
    batch = model.collate(prompts, targets)
    embeds = llm.get_input_embeddings()(batch["ids"])
    slots = batch["ids"] == model.speech_id
    embeds = embeds.masked_scatter(slots[..., None], torch.tensor(np.concatenate(vectors), dtype=embeds.dtype))
    return embeds, batch["attention_mask"], batch["labels"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="tiny", help="tiny (random, --width x --layers) or a Hugging Face seq2seq model")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=8, help="placeholder vectors per item (the speech LM's num_queries)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SpeechLMConfig(llm=args.llm, tiny_width=args.width, tiny_layers=args.layers, num_queries=args.queries)
    model = SpeechLM(config, 8, WORDS)  # for its prompts and tokenizer; the probe trains a bare LLM
    _, llm = load_llm(config, [model.instruction, *(PAIR_LABEL.format(word=w) for w in WORDS)])

    @torch.no_grad()
    def accuracy(k: int) -> float:
        llm.eval()
        embeds, mask, labels = episodes(model, llm, 512, np.random.default_rng(12345 + k), k)
        logits = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
        llm.train()
        return float((logits[:, 0].argmax(-1) == labels[:, 0]).float().mean())

    report = lambda step, begun: print(f"step {step}: accuracy k=1 {accuracy(1):.3f}, k=3 {accuracy(3):.3f}, "
                                       f"k=7 {accuracy(7):.3f} ({time.time() - begun:.0f}s, ETA "
                                       f"{(time.time() - begun) / max(step, 1) * (args.steps - step):.0f}s)", flush=True)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=args.lr)
    rng, begun = np.random.default_rng(0), time.time()
    report(0, begun)
    llm.train()
    for step in range(1, args.steps + 1):
        embeds, mask, labels = episodes(model, llm, 32, rng)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            report(step, begun)


if __name__ == "__main__":
    main()
