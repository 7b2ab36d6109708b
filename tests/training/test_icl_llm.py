"""The in-context pretraining of the speech LM's LLM: the shipped build reads pairs, a random T5 does not,
and other settings build into the cache once and then load."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from distmeta.models.speech_lm import PromptFormat, SpeechLM, SpeechLMConfig, icl_llm_folder, load_llm, tiny_t5
from distmeta.training import icl_llm


@pytest.fixture(scope="module")
def shipped():
    config = SpeechLMConfig()
    tokenizer, llm = load_llm(config, [])
    return config, tokenizer, llm.eval()


def test_the_shipped_llm_reads_pairs_untrained(shipped):
    """The probe's pass mark (benchmarks/bench_icl_probe.py --steps 0): with 7 pairs >= 0.9 and with 3 >= 0.6
    (chance 1/7; copying a random pair's word ~0.30)."""
    config, tokenizer, llm = shipped
    torch.manual_seed(0)
    accuracy = icl_llm.probe(llm, PromptFormat(tokenizer, config, icl_llm.INSTRUCTION_WORDS), episodes=256)
    assert accuracy[7] >= 0.9 and accuracy[3] >= 0.6, accuracy


def test_a_random_t5_with_the_same_vocabulary_does_not(shipped):
    config, tokenizer, _ = shipped
    accuracy = icl_llm.probe(tiny_t5(config, tokenizer).eval(), PromptFormat(tokenizer, config, icl_llm.INSTRUCTION_WORDS),
                             episodes=128, shots=(3, 7))
    assert accuracy[7] < 0.4 and accuracy[3] < 0.5, accuracy


def test_probe_episodes_name_the_target_only_through_the_pairs():
    draws = [icl_llm.probe_episode(np.random.default_rng(n), 16, 2, 7) for n in range(50)]
    assert all(sorted(e.pair_words) == sorted(icl_llm.INSTRUCTION_WORDS) for e in draws)  # every word once at k = 7
    assert len({e.target_word for e in draws}) == 7 and all(e.vectors.shape == (8, 2, 16) for e in draws)
    # the target's vector is nearest to the pair of its word
    nearest = [e.pair_words[int(((e.vectors[:-1, 0] - e.vectors[-1, 0]) ** 2).sum(1).argmin())] for e in draws]
    assert nearest == [e.target_word for e in draws]


def test_other_settings_build_into_the_cache_once_and_then_load(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTMETA_CACHE", str(tmp_path))
    config = replace(SpeechLMConfig(), tiny_width=16, num_queries=2, max_shots=3)
    folder = icl_llm_folder(config)
    assert folder.parent == tmp_path / "llms" and not folder.exists()
    with pytest.raises(FileNotFoundError, match="tiny_icl"):
        SpeechLM(config, 8, icl_llm.INSTRUCTION_WORDS)
    icl_llm.ready(config, replace(icl_llm.ICLPretrainConfig(), steps=3, batch_size=4), log=None)
    assert (folder / "config.json").is_file() and (folder / "distmeta.json").is_file()
    assert not folder.with_name(folder.name + ".partial").exists()
    built = (folder / "model.safetensors").stat().st_mtime_ns
    icl_llm.ready(config, log=None)  # already there: nothing is trained again
    assert (folder / "model.safetensors").stat().st_mtime_ns == built
    model = SpeechLM(config, 8, icl_llm.INSTRUCTION_WORDS)
    assert model.llm.base_model.model.config.d_model == 16
    # a binding-"position" build carries its learnt segment and example embeddings into the speech LM
    position = replace(config, binding="position")
    icl_llm.ready(position, replace(icl_llm.ICLPretrainConfig(), steps=3, batch_size=4), log=None)
    learnt = SpeechLM(position, 8, icl_llm.INSTRUCTION_WORDS)
    assert learnt.example.weight.abs().sum() > 0 and model.example.weight.abs().sum() == 0
