"""The speech LM: prompt layout, placeholder filling, the target-only loss, what trains, closed-set scoring."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distmeta.models import trainable_parameters
from distmeta.models.speech_lm import SPEECH, TEXT, SpeechLM, SpeechLMConfig

WORDS = ["Neutral", "Surprise", "Sadness", "Joy", "Fear", "Disgust", "Anger"]
DIM = 12  # speech encoder width


def tiny(**changes) -> SpeechLMConfig:
    """The random tiny T5 with the paper's binding and trained token embeddings: the model these tests probe
    (the in-context-pretrained default: tests at the end and tests/training/test_icl_llm.py)."""
    return SpeechLMConfig(**{"llm": "tiny", "binding": "position", "train_token_embeddings": True, **changes})


@pytest.fixture(scope="module")
def model():
    return SpeechLM(tiny(num_queries=3, qformer_dim=16), DIM, WORDS).eval()


def frames_for(n, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return torch.randn(n, length, DIM, generator=g) * mask[..., None], mask


def test_prompt_layout(model):
    tok, nq = model.tokenizer, model.config.num_queries
    prompt = model.prompt(["Joy", "Anger"])
    ids, seg, ex = prompt["ids"], prompt["segments"], prompt["examples"]
    assert len(ids) == len(seg) == len(ex)
    text_of = lambda example: tok.decode([i for i, s, e in zip(ids, seg, ex) if s == TEXT and e == example],
                                          skip_special_tokens=True)
    unspaced = lambda text: text.replace(" ", "")  # the word tokenizer decodes words joined by spaces
    assert unspaced(text_of(0)) == unspaced(model.instruction)
    assert "Neutral, Surprise, Sadness, Joy, Fear, Disgust, Anger" in model.instruction
    assert unspaced(text_of(1)) == "Joy." and unspaced(text_of(2)) == "Anger." and text_of(3) == ""
    for example in (1, 2, 3):  # each example's speech: nq placeholders, before its label text
        slots = [k for k, (i, s, e) in enumerate(zip(ids, seg, ex)) if e == example and s == SPEECH]
        assert len(slots) == nq and all(ids[k] == model.speech_id for k in slots)
        assert slots == list(range(slots[0], slots[0] + nq))
    assert sum(i == model.speech_id for i in ids) == 3 * nq and ids[-1] == tok.eos_token_id
    assert model.prompt([])["examples"][-1] == 1  # zero-shot: the target is example 1
    with pytest.raises(ValueError, match="max_shots=7"):
        model.prompt(["Joy"] * 8)


def test_placeholders_hold_each_utterances_queries_in_order(model):
    batch = model.collate([model.prompt(["Joy"]), model.prompt(["Fear", "Anger"])])
    frames, mask = frames_for(5)  # item 1: enrollment 0, target 1; item 2: enrollments 2, 3, target 4
    embeds = model.embed(batch, frames, mask)
    table = model.llm.get_input_embeddings()
    with torch.no_grad():
        # each utterance alone, without the batch's padding frames
        alone = [model.projection(model.qformer(frames[u:u + 1, :int(mask[u].sum())], mask[u:u + 1, :int(mask[u].sum())]))[0]
                 for u in range(5)]
    extra = model.segment(batch["segments"]) + model.example(batch["examples"])
    nq, utterance = model.config.num_queries, 0
    for b in range(2):
        positions = (batch["ids"][b] == model.speech_id).nonzero().flatten().tolist()
        for group in range(len(positions) // nq):
            at = positions[group * nq:(group + 1) * nq]
            torch.testing.assert_close(embeds[b, at], alone[utterance] + extra[b, at], atol=1e-5, rtol=1e-5)
            utterance += 1
        text = (batch["ids"][b] != model.speech_id).nonzero().flatten()
        torch.testing.assert_close(embeds[b, text], table(batch["ids"][b, text]) + extra[b, text])
    assert utterance == 5
    with pytest.raises(ValueError, match="placeholders"):
        model.embed(batch, frames[:4], mask[:4])


@pytest.mark.parametrize("instruction", [SpeechLMConfig.instruction, "Emotions: {labels}. Which one?"])
def test_word_tokenizer_knows_every_prompt_word_and_shortens_the_prompt(instruction):
    """The tiny LLM's default tokenizer: one token per word, built from the instruction and the label words
    (never <unk> in a prompt, one token per label); a 7-pair prompt is under half its byte-level length."""
    config = tiny(num_queries=3, qformer_dim=16, instruction=instruction)
    words, raw = SpeechLM(config, DIM, WORDS), SpeechLM(replace(config, tokenizer="bytes"), DIM, WORDS)
    tok = words.tokenizer
    assert tok.unk_token_id not in words.prompt(WORDS)["ids"]
    for model in (words, raw):
        assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)
    assert all(len(words.label_ids(w)) == 2 for w in WORDS) and len({words.label_ids(w)[0] for w in WORDS}) == 7
    assert tok.decode(words.label_ids("Disgust"), skip_special_tokens=True) == "Disgust"
    assert tok("Frustration", add_special_tokens=False).input_ids == [tok.unk_token_id]  # not a label: unknown
    assert len(words.prompt(WORDS)["ids"]) < len(raw.prompt(WORDS)["ids"]) / 2
    assert raw.label_ids("Joy") == [b + 3 for b in b"Joy"] + [raw.tokenizer.eos_token_id]  # ByT5: byte value + 3
    with pytest.raises(ValueError, match="tokenizer='chars'"):
        SpeechLM(replace(config, tokenizer="chars"), DIM, WORDS)


def test_segment_and_example_embeddings_reach_the_encoder(model):
    batch = model.collate([model.prompt(["Joy"])])
    frames, mask = frames_for(2)
    before = model.embed(batch, frames, mask)
    with torch.no_grad():
        model.example.weight[2] += 1.0  # the target's example index
    after = model.embed(batch, frames, mask)
    with torch.no_grad():
        model.example.weight[2] -= 1.0
    changed = (after - before).abs().sum(-1) > 0
    assert changed[0].tolist() == [e == 2 for e in batch["examples"][0].tolist()]


def test_loss_covers_only_the_target_label(model):
    items = [model.prompt(["Joy", "Anger"]), model.prompt([])]
    batch = model.collate(items, target_words=["Surprise", "Joy"])
    tok = model.tokenizer
    for row, word in zip(batch["labels"], ["Surprise", "Joy"]):
        kept = row[row != -100].tolist()
        # the word's tokens + end of sequence, nothing from the prompt
        assert kept == tok(word, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert (row[len(kept):] == -100).all()
    frames, mask = frames_for(4)
    loss = model(batch, frames, mask)
    logits = model.llm(inputs_embeds=model.embed(batch, frames, mask), attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dropout, lora_dropout", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.05)])
def test_dropout_settings_reach_every_dropout(dropout, lora_dropout):
    """`dropout` sets the Q-Former's and the tiny T5's, `lora_dropout` LoRA's: with both 0, training mode
    computes the loss eval mode computes; with either on, it does not."""
    torch.manual_seed(0)
    model = SpeechLM(tiny(num_queries=3, qformer_dim=16, dropout=dropout, lora_dropout=lora_dropout), DIM, WORDS)
    with torch.no_grad():  # LoRA's B starts at zero, which would hide LoRA's dropout
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert model.llm.base_model.model.config.dropout_rate == dropout
    assert all(m.p == dropout for m in model.qformer.modules() if isinstance(m, torch.nn.Dropout))
    batch = model.collate([model.prompt(["Joy"]), model.prompt([])], ["Fear", "Joy"])
    frames, mask = frames_for(3)
    with torch.no_grad():
        trained, evaluated = model.train()(batch, frames, mask), model.eval()(batch, frames, mask)
    # (eval mode may take other kernels: equal up to rounding)
    assert torch.allclose(trained, evaluated, rtol=1e-5, atol=1e-6) == (dropout == 0 and lora_dropout == 0)


@pytest.mark.parametrize("width, layers", [(64, 2), (96, 3)])
def test_tiny_llm_size(width, layers):
    """`tiny_width` x `tiny_layers` sizes the tiny T5: its width, feed-forward 2x, 4 heads of width/4 each, and
    as many encoder as decoder layers; the default is the size the speech LM always had (64, 128, 16, 2 + 2)."""
    t5 = SpeechLM(tiny(num_queries=2, qformer_dim=16, tiny_width=width, tiny_layers=layers), DIM, WORDS).llm
    config = t5.base_model.model.config
    assert (config.d_model, config.d_ff, config.d_kv, config.num_heads) == (width, 2 * width, width // 4, 4)
    assert len(t5.base_model.model.encoder.block) == len(t5.base_model.model.decoder.block) == layers
    assert t5.get_input_embeddings().weight.shape[1] == width


def test_only_lora_and_the_connector_train():
    model = SpeechLM(tiny(num_queries=2, qformer_dim=16, train_token_embeddings=False), DIM, WORDS).train()
    names = list(trainable_parameters(model))
    connector = ("qformer.", "projection.", "segment.", "example.")
    assert all("lora_" in n or n.startswith(connector) for n in names)
    for module in model.config.lora_targets:  # every targeted T5 projection got both LoRA factors
        assert any(f".{module}.lora_A." in n for n in names) and any(f".{module}.lora_B." in n for n in names)
    assert all(n.startswith(connector) for n in names if "lora_" not in n)
    assert not any("lora_" in n for n in names if n.startswith(connector))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frames, mask = frames_for(2)
    model(model.collate([model.prompt(["Joy"])], ["Fear"]), frames, mask).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(names)
    assert any("lora_B" in n for n in moved) and any(n.startswith("qformer.") for n in moved)
    # with train_token_embeddings, exactly the (tied) token embedding table is added
    with_tokens = set(trainable_parameters(SpeechLM(tiny(num_queries=2, qformer_dim=16), DIM, WORDS)))
    assert with_tokens - set(names) == {"llm.base_model.model.shared.weight"} and set(names) < with_tokens


def test_scoring_learns_a_closed_set_mapping():
    """Four utterances, four labels: after training only LoRA and the connector, the closed-set score
    and free generation both return each utterance's label."""
    torch.manual_seed(0)
    model = SpeechLM(tiny(num_queries=2, qformer_dim=16, lora_dropout=0.0, train_token_embeddings=False), DIM, WORDS)
    frames, mask = frames_for(4, seed=1)
    targets = ["Joy", "Anger", "Fear", "Neutral"]
    batch = model.collate([model.prompt([]) for _ in targets], targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)  # 3e-3 oscillates
    model.train()
    for _ in range(300):
        loss = model(batch, frames, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    scores = model.score(batch, frames, mask)
    assert [WORDS[i] for i in scores.argmax(-1)] == targets
    # the score is each word's summed token log-probability
    labels = torch.tensor([model.label_ids("Joy")] * 4)
    logits = model.llm(inputs_embeds=model.embed(batch, frames, mask), attention_mask=batch["attention_mask"], labels=labels).logits
    manual = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(scores[:, WORDS.index("Joy")], manual, atol=1e-4, rtol=1e-4)
    assert model.generate(batch, frames, mask) == targets


@pytest.mark.parametrize("tokenizer", ["words", "bytes"])  # bytes: label words of different token lengths
def test_one_pass_scores_equal_one_pass_per_word_and_precomputed_queries_change_nothing(tokenizer):
    model = SpeechLM(tiny(num_queries=3, qformer_dim=16, tokenizer=tokenizer, seed=1), DIM, WORDS).eval()
    batch = model.collate([model.prompt(["Joy"]), model.prompt([]), model.prompt(["Fear", "Anger"])])
    frames, mask = frames_for(6, seed=3)
    with torch.no_grad():
        scores = model.score(batch, frames, mask)
        embeds = model.embed(batch, frames, mask)
        for c, word in enumerate(WORDS):  # each word alone through the whole model, its tokens' log-probabilities summed
            labels = torch.tensor([model.label_ids(word)] * 3)
            logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels).logits
            alone = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)
            torch.testing.assert_close(scores[:, c], alone, atol=1e-5, rtol=1e-5)
        queries = model.speech_queries(frames, mask)
        torch.testing.assert_close(model.score(batch, None, None, queries=queries), scores, atol=0, rtol=0)
    if tokenizer == "bytes":
        assert len({len(model.label_ids(w)) for w in WORDS}) > 1


def test_add_binding_puts_each_pairs_label_word_on_its_placeholders_only():
    """Binding "add": a pair's placeholders hold its speech plus its label word's embedding; the target's
    placeholders and every text position are as with the paper's position binding alone."""
    config = tiny(num_queries=3, qformer_dim=16)
    position, added = SpeechLM(config, DIM, WORDS).eval(), SpeechLM(replace(config, binding="add"), DIM, WORDS).eval()
    added.load_state_dict(position.state_dict())
    pairs = ["Joy", "Anger"]
    frames, mask = frames_for(3)
    batch_p, batch_a = position.collate([position.prompt(pairs)]), added.collate([added.prompt(pairs)])
    assert torch.equal(batch_p["ids"], batch_a["ids"]) and "bound" not in batch_p
    with torch.no_grad():
        difference = added.embed(batch_a, frames, mask) - position.embed(batch_p, frames, mask)
    table, ids, examples = added.llm.get_input_embeddings(), batch_a["ids"][0], batch_a["examples"][0]
    for k in range(len(ids)):
        pair = int(examples[k]) - 1
        if ids[k] == added.speech_id and 0 <= pair < len(pairs):
            torch.testing.assert_close(difference[0, k], table.weight[added.label_ids(pairs[pair])[0]])
        else:
            assert difference[0, k].abs().max() == 0
    with pytest.raises(ValueError, match="binding"):
        SpeechLM(replace(config, binding="glue"), DIM, WORDS)


def test_the_default_llm_is_the_shipped_in_context_pretrained_t5_and_trains_lora_only():
    """The default (tiny_icl) loads the build shipped with the package, as a Hugging Face folder, with its
    own word vocabulary (every label word one token); nothing of the LLM itself trains."""
    from distmeta.models.speech_lm import ICL_SHIPPED, icl_llm_folder

    config = SpeechLMConfig(num_queries=8, qformer_dim=16)
    assert (config.llm, config.binding, config.train_token_embeddings) == ("tiny_icl", "add", False)
    folder = icl_llm_folder(config)
    assert folder.parent == ICL_SHIPPED and (folder / "config.json").is_file()
    model = SpeechLM(config, DIM, WORDS)
    assert all(len(model.label_ids(w)) == 2 for w in WORDS)
    assert model.tokenizer.unk_token_id not in model.prompt(WORDS)["ids"]
    assert all("lora_" in n or n.split(".")[0] in ("qformer", "projection", "segment", "example")
               for n in trainable_parameters(model))
    with pytest.raises(FileNotFoundError, match="tiny_icl"):
        SpeechLM(replace(config, tiny_width=48), DIM, WORDS)  # no build for these settings, and loading builds nothing
