"""Does an LLM read enrollment pairs in context? A synthetic probe in the speech LM's prompt format.

    .venv/bin/python benchmarks/bench_icl_probe.py --llm tiny_icl --steps 0     # the shipped LLM as it is
    .venv/bin/python benchmarks/bench_icl_probe.py --llm tiny --steps 3000 [--binding position]   # pretrain a random T5
    .venv/bin/python benchmarks/bench_icl_probe.py --llm /models/flan-t5-base --steps 0            # any seq2seq LLM

The probe asks the LLM alone, with nothing else in the way (no speech encoder, no Q-Former, no speakers to
memorise): every episode draws 7 new random class vectors and gives the 7 emotion words to them by a new
permutation, so only the pairs can name the target's word (`training.icl_llm.probe_episode`). Prompts are
the speech LM's (`PromptFormat`, with the chosen `--binding`), the vectors in the placeholders. It prints
the accuracy of the first label token on 512 held-out episodes at k = 1, 3 and 7 pairs:

    copying the one pair's word at k = 1     ~0.82 (the target's class is there 0.8 of the time)
    copying a random pair's word at k = 3    ~0.30
    reading the pairs (matching the target to its pair): k = 7 far above 1/7 = 0.14, k = 3 up to ~0.85

With `--steps N` it first trains the LLM (all its weights) with the in-context pretraining recipe
(`training/icl_llm.py`: its episodes, curriculum and optimiser), printing the probe every `--every` steps:
the curves behind docs/speaker.md's binding comparison.
"""

import argparse
import time
from dataclasses import replace

import torch

from distmeta.models.speech_lm import PromptFormat, SpeechLMConfig, load_llm, tiny_t5
from distmeta.training.icl_llm import (INSTRUCTION_WORDS, ICLPretrainConfig, PositionEmbeddings, pretrain, probe,
                                       vocabulary)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="tiny_icl", help="tiny_icl (shipped), tiny (random) or a Hugging Face seq2seq model")
    parser.add_argument("--binding", default=SpeechLMConfig.binding, choices=["add", "position"])
    parser.add_argument("--width", type=int, default=SpeechLMConfig.tiny_width)
    parser.add_argument("--layers", type=int, default=SpeechLMConfig.tiny_layers)
    parser.add_argument("--queries", type=int, default=SpeechLMConfig.num_queries, help="placeholders per item")
    parser.add_argument("--steps", type=int, default=0, help="in-context pretraining steps first (0: probe as it is)")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--episodes", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(SpeechLMConfig(), llm=args.llm, binding=args.binding, tiny_width=args.width, tiny_layers=args.layers,
                     num_queries=args.queries)
    if args.llm == "tiny":
        tokenizer = vocabulary(config)  # the vocabulary of a tiny_icl build, random weights
        llm = tiny_t5(config, tokenizer)
    else:
        tokenizer, llm = load_llm(config, [])
    prompts = PromptFormat(tokenizer, config, INSTRUCTION_WORDS)
    extra = PositionEmbeddings(llm.config.d_model, config.max_shots) if args.binding == "position" and args.steps else None
    line = lambda result: ", ".join(f"k={k} {v:.3f}" for k, v in result.items())
    begun = time.time()
    print(f"{args.llm} ({args.binding} binding) before: {line(probe(llm, prompts, args.episodes, extra=extra))}", flush=True)
    if args.steps:
        pretrain(llm, prompts, replace(ICLPretrainConfig(), steps=args.steps), extra,
                 report=lambda step: "probe " + line(probe(llm, prompts, 256, extra=extra)), every=args.every)
        print(f"after {args.steps} steps ({time.time() - begun:.0f}s): {line(probe(llm, prompts, args.episodes, extra=extra))}")


if __name__ == "__main__":
    main()
