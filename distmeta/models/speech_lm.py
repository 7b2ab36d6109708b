"""The speech LM of the ICL paper (section III-B), small enough to read in one sitting.

    utterance frames [F, D] (a frozen speech encoder, computed once)
      -> Q-Former: learned queries attend to the frames (2 decoder layers, no causal mask) -> [Nq, d_q]
      -> projection into the LLM's embedding space -> [Nq, d_model]
    prompt (encoder input) = instruction text, then per enrollment pair: <speech> x Nq, " Label.",
                             then the target: <speech> x Nq
      token embeddings, <speech> placeholders replaced by the projected queries (in order),
      + segment embedding (text / speech) + example-index embedding (0 instruction, 1..k pairs, k+1 target):
        the paper's sequence-position embedding (its Eq. 12-13), shared by a pair's speech and its label
      + with binding "add": each pair's label word embedding on its speech placeholders too, so one
        position holds both (what a small LLM needs to match a target with its pair; docs/speaker.md)
    encoder-decoder LLM (T5 family) with LoRA adapters -> the target's label text

The default LLM, `tiny_icl`, is a small T5 that already reads pairs in context: pretrained on synthetic
episodes by `distmeta.training.icl_llm` (our stand-in for the paper's instruction-tuned LLM), shipped with
the package, loaded from `ICL_SHIPPED` or the cache; `tiny` is the same T5 with random weights.

Only the target's label is ever a decoder target, so the loss covers nothing
else (the enrollment labels are encoder input). Prediction scores the closed
set of label words by their log-likelihood (`score`); `generate` decodes freely.
Trainable: LoRA, Q-Former, projection, segment and example embeddings (and, with
`train_token_embeddings`, the LLM's token embeddings); the LLM's other weights and
the speech encoder stay frozen (`distmeta.models.trainable_parameters` lists what trains).
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from distmeta.data.synthetic.cache import default_cache_dir
from distmeta.io import settings_digest

SPEECH_TOKEN = "<speech>"
PAIR_LABEL = " {word}."  # an enrollment pair's label text, after its speech
TEXT, SPEECH = 0, 1

# The tiny T5 (`tiny`: random weights; `tiny_icl`: pretrained to read pairs), `tiny_width` x `tiny_layers`.
TINY_T5 = dict(num_heads=4, relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", tie_word_embeddings=True)
BINDINGS = ("add", "position")
# Bump when training/icl_llm.py's recipe changes, so builds of the old recipe are not reused.
ICL_RECIPE_VERSION = 2
ICL_SHIPPED = Path(__file__).parent / "weights"  # the default tiny_icl build ships here, named by its key
PROMPT_EMBEDDINGS = "prompt_embeddings.safetensors"  # in a binding-"position" build: the segment and example embeddings


@dataclass
class SpeechLMConfig:
    # "tiny_icl" (TINY_T5 pretrained to read pairs in context, shipped), "tiny" (TINY_T5, random weights), or a
    # Hugging Face seq2seq model: local path or hub id
    llm: str = "tiny_icl"
    # llm="tiny" only (the others bring their own): "words", one token per word of the instruction and the
    # label words (built here from them); or "bytes", ByT5's byte-level tokenizer. A random LLM reads no
    # instruction, and in bytes the paper's is 133 of a 0-pair prompt's 142 tokens (of 247 with 7 pairs).
    tokenizer: str = "words"
    # tiny and tiny_icl: the T5's width (d_model; feed-forward 2x, 4 heads) and layers (encoder and decoder each).
    tiny_width: int = 64
    tiny_layers: int = 2
    # How a pair's label is tied to its speech: "position", the paper's sequence-position embedding alone;
    # "add", also the label word's embedding added to the pair's speech placeholders (tiny_icl is built for it).
    binding: str = "add"
    num_queries: int = 8  # Q-Former queries per utterance (the paper: 150)
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_dim: int = 64
    lora_rank: int = 8
    lora_alpha: int = 16
    # No dropout by default: the proposed model gained more from the pairs without it, and stage 2 is faster
    # (docs/results/speaker.md). The paper's LoRA: 0.05.
    lora_dropout: float = 0.0
    dropout: float = 0.0  # the Q-Former's and the tiny T5's (a Hugging Face LLM keeps its own)
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")  # T5 attention and feed-forward
    # The LLM's token embeddings (tied to its output layer) train too: a randomly initialised LLM (tiny) must
    # learn its output vocabulary (through LoRA alone it took ~3x the steps to spell the labels). False for a
    # pretrained LLM (tiny_icl, or a Hugging Face one): the paper trains LoRA only.
    train_token_embeddings: bool = False
    max_shots: int = 7
    instruction: str = "Please select the appropriate emotion for the input speech from the following: {labels}."
    seed: int = 0


class QFormer(nn.Module):
    """Learned queries read variable-length encoder frames into a fixed number of vectors."""

    def __init__(self, in_dim: int, dim: int, num_queries: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.frames_in = nn.Linear(in_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames [U, F, D], frame_mask [U, F] (True = a real frame) -> [U, Nq, dim]."""
        queries = self.queries.expand(frames.shape[0], -1, -1)
        out = self.blocks(queries, self.frames_in(frames), memory_key_padding_mask=~frame_mask)  # no tgt_mask: not causal
        return self.norm(out)


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer whose vocabulary is the words and punctuation marks of `texts`, built here
    (nothing downloaded): T5's <pad>, </s>, <unk> first, then each new word in order of appearance."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()  # words and runs of punctuation: "Anger." -> "Anger", "."
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(config: "SpeechLMConfig", tokenizer):
    """A randomly initialised TINY_T5 of the config's width and layers for `tokenizer`."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(config.seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               decoder_start_token_id=tokenizer.pad_token_id,
                                               dropout_rate=config.dropout, d_model=config.tiny_width,
                                               d_ff=2 * config.tiny_width, d_kv=config.tiny_width // 4,
                                               num_layers=config.tiny_layers, num_decoder_layers=config.tiny_layers,
                                               **TINY_T5))


def icl_llm_key(config: "SpeechLMConfig") -> str:
    """The name of a tiny_icl build: everything that shapes it (its recipe's settings live in the recipe, under
    ICL_RECIPE_VERSION)."""
    key = {"width": config.tiny_width, "layers": config.tiny_layers, "binding": config.binding, "recipe": ICL_RECIPE_VERSION}
    return "tiny_icl_" + settings_digest(key)


def icl_llm_folder(config: "SpeechLMConfig") -> Path:
    """Where config's tiny_icl build is (a Hugging Face model folder): shipped with the package, else in the
    cache ($DISTMETA_CACHE/llms), where `training.icl_llm.ready` builds it."""
    shipped = ICL_SHIPPED / icl_llm_key(config)
    return shipped if (shipped / "config.json").is_file() else default_cache_dir() / "llms" / icl_llm_key(config)


def load_llm(config: SpeechLMConfig, texts: list[str]):
    """(tokenizer with the <speech> token, seq2seq LLM) for `config.llm`; `texts` (the instruction, the
    pairs' label texts) are tiny's word vocabulary. tiny_icl loads its build (`icl_llm_folder`); nothing here
    trains one (`python -m distmeta.training.icl_llm` does)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer

    if config.llm == "tiny":
        if config.tokenizer not in ("words", "bytes"):
            raise ValueError(f"model.tokenizer={config.tokenizer!r}: the tiny LLM takes 'words' or 'bytes'")
        tokenizer = word_tokenizer(texts) if config.tokenizer == "words" else ByT5Tokenizer(extra_ids=0)
        tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN]})
        return tokenizer, tiny_t5(config, tokenizer)
    source = config.llm
    if config.llm == "tiny_icl":
        source = icl_llm_folder(config)
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"model.llm=tiny_icl: no build for these settings at {source} (width {config.tiny_width}, "
                                    f"layers {config.tiny_layers}, binding {config.binding}); "
                                    "jobs/metaicl_train.py builds it, or `python -m distmeta.training.icl_llm`")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN]})
    llm = AutoModelForSeq2SeqLM.from_pretrained(source)
    llm.resize_token_embeddings(len(tokenizer))
    return tokenizer, llm


class PromptFormat:
    """The speech LM's prompts as token ids, and their input embeddings once the speech is known: what the
    speech LM and the in-context pretraining of its LLM (training/icl_llm.py) share."""

    def __init__(self, tokenizer, config: SpeechLMConfig, words: list[str], bare: bool = False):
        if config.binding not in BINDINGS:
            raise ValueError(f"model.binding={config.binding!r}: one of {BINDINGS}")
        self.tokenizer, self.config, self.words, self.bare = tokenizer, config, list(words), bare
        # bare: the short prompts the in-context pretraining starts from: no instruction and, where the binding
        # "add" names each pair's label on its speech, no label text after it either
        self.instruction = "" if bare else config.instruction.format(labels=", ".join(self.words))
        self.speech_id = tokenizer.convert_tokens_to_ids(SPEECH_TOKEN)
        self._token_ids: dict[str, list[int]] = {}  # text -> its token ids (`_text`)

    def _text(self, text: str) -> list[int]:
        # Prompts repeat a few texts (the instruction, "Emotion: <word>."): each is tokenized once. Tokenizing
        # them anew was ~15% of scoring a batch of 3-pair prompts.
        if text not in self._token_ids:
            self._token_ids[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return list(self._token_ids[text])

    def prompt(self, shot_words: list[str]) -> dict:
        """Token ids, segment and example indices of one prompt with len(shot_words) enrollment pairs (their
        speech comes as placeholders; the target's speech last), and per position the token ids of the label
        bound to it (binding "add": a pair's word on its placeholders)."""
        if len(shot_words) > self.config.max_shots:
            raise ValueError(f"{len(shot_words)} enrollment pairs; the model takes at most max_shots={self.config.max_shots}")
        ids, segments, examples, bound = [], [], [], []

        def add(tokens, segment, example, label=()):
            ids.extend(tokens)
            segments.extend([segment] * len(tokens))
            examples.extend([example] * len(tokens))
            bound.extend([list(label)] * len(tokens))

        add(self._text(self.instruction), TEXT, 0)
        speech = [self.speech_id] * self.config.num_queries
        for i, word in enumerate(shot_words, 1):
            add(speech, SPEECH, i, self._text(word) if self.config.binding == "add" else ())
            if not (self.bare and self.config.binding == "add"):
                add(self._text(PAIR_LABEL.format(word=word)), TEXT, i)
        add(speech, SPEECH, len(shot_words) + 1)
        add([self.tokenizer.eos_token_id], TEXT, len(shot_words) + 1)
        return {"ids": ids, "segments": segments, "examples": examples, "bound": bound}

    def label_ids(self, word: str) -> list[int]:
        return self._text(word) + [self.tokenizer.eos_token_id]

    def collate(self, items: list[dict], target_words: list[str] | None = None) -> dict:
        """Pad prompts into a batch; with `target_words`, decoder labels (-100 on padding: the loss
        covers the target's label tokens and nothing else). `bound`: [B, L, W] label token ids per position, -1 none."""
        length = max(len(item["ids"]) for item in items)
        pad = self.tokenizer.pad_token_id

        def padded(key, value):
            return torch.tensor([item[key] + [value] * (length - len(item[key])) for item in items])

        batch = {"ids": padded("ids", pad), "segments": padded("segments", TEXT), "examples": padded("examples", 0),
                 "attention_mask": torch.tensor([[1] * len(item["ids"]) + [0] * (length - len(item["ids"])) for item in items])}
        width = max((len(label) for item in items for label in item["bound"]), default=0)
        if width:
            batch["bound"] = torch.tensor([[label + [-1] * (width - len(label)) for label in item["bound"]]
                                           + [[-1] * width] * (length - len(item["ids"])) for item in items])
        if target_words is not None:
            labels = [self.label_ids(w) for w in target_words]
            label_width = max(map(len, labels))
            batch["labels"] = torch.tensor([ids + [-100] * (label_width - len(ids)) for ids in labels])
        return batch

    def fill(self, table: nn.Embedding, batch: dict, queries: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `batch` with the placeholders holding `queries` [U, Nq, d_model] in reading order
        and, with a binding, each bound label's mean token embedding added."""
        tokens = table(batch["ids"])
        slots = batch["ids"] == self.speech_id
        if slots.sum() != queries.shape[0] * queries.shape[1]:
            raise ValueError(f"{int(slots.sum())} speech placeholders but {queries.shape[0]} utterances x "
                             f"{queries.shape[1]} queries")
        tokens = tokens.masked_scatter(slots[..., None], queries.reshape(-1, queries.shape[-1]).to(tokens.dtype))
        if "bound" in batch:
            valid = batch["bound"] >= 0
            labels = (table(batch["bound"].clamp(min=0)) * valid[..., None]).sum(2)
            tokens = tokens + labels / valid.sum(2, keepdim=True).clamp(min=1)
        return tokens


class SpeechLM(nn.Module):
    def __init__(self, config: SpeechLMConfig, encoder_dim: int, words: list[str]):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config, self.words = config, list(words)
        instruction = config.instruction.format(labels=", ".join(self.words))
        tokenizer, llm = load_llm(config, [instruction, *(PAIR_LABEL.format(word=w) for w in self.words)])
        self.format = PromptFormat(tokenizer, config, words)
        self.tokenizer, self.instruction, self.speech_id = tokenizer, self.format.instruction, self.format.speech_id
        for p in llm.parameters():
            p.requires_grad_(False)
        targets = [t for t in config.lora_targets if any(n.split(".")[-1] == t for n, _ in llm.named_modules())]
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated property on every wrap
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            self.llm = get_peft_model(llm, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                      lora_dropout=config.lora_dropout, target_modules=targets))
        self.llm.get_input_embeddings().weight.requires_grad_(config.train_token_embeddings)
        d_model = llm.get_input_embeddings().embedding_dim
        torch.manual_seed(config.seed)
        self.qformer = QFormer(encoder_dim, config.qformer_dim, config.num_queries, config.qformer_layers, config.qformer_heads,
                               config.dropout)
        self.projection = nn.Linear(config.qformer_dim, d_model)
        self.segment = nn.Embedding(2, d_model)
        self.example = nn.Embedding(config.max_shots + 2, d_model)
        nn.init.zeros_(self.segment.weight)
        nn.init.zeros_(self.example.weight)
        learnt = icl_llm_folder(config) / PROMPT_EMBEDDINGS if config.llm == "tiny_icl" else None
        if learnt is not None and learnt.is_file():  # a binding-"position" build reads pairs through these
            state = load_file(str(learnt))
            self.segment.weight.data.copy_(state["segment.weight"])
            shared = min(len(state["example.weight"]), len(self.example.weight))
            self.example.weight.data[:shared].copy_(state["example.weight"][:shared])

    # ---- the prompt (`PromptFormat`) ----------------------------------------------------

    def prompt(self, shot_words: list[str]) -> dict:
        return self.format.prompt(shot_words)

    def label_ids(self, word: str) -> list[int]:
        return self.format.label_ids(word)

    def collate(self, items: list[dict], target_words: list[str] | None = None) -> dict:
        return self.format.collate(items, target_words)

    def speech_queries(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """What fills an utterance's placeholders: its projected Q-Former queries, [U, Nq, d_model]. Each
        utterance's are its own, whatever else is in the batch (so prediction can compute them once)."""
        return self.projection(self.qformer(frames, frame_mask))

    def embed(self, batch: dict, frames: torch.Tensor | None, frame_mask: torch.Tensor | None,
              queries: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder input embeddings: tokens, placeholders filled with the utterances' projected queries.

        `frames` [U, F, D] holds the utterances of every placeholder group in reading order
        (item by item: its enrollment utterances, then its target); or `queries`, their `speech_queries`."""
        if queries is None:
            queries = self.speech_queries(frames, frame_mask)  # [U, Nq, d_model]
        tokens = self.format.fill(self.llm.get_input_embeddings(), batch, queries)
        return tokens + self.segment(batch["segments"]) + self.example(batch["examples"])

    # ---- training and prediction ----------------------------------------------------

    def forward(self, batch: dict, frames: torch.Tensor, frame_mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of the target label tokens (optionally label-smoothed, as the paper trains)."""
        logits = self.llm(inputs_embeds=self.embed(batch, frames, frame_mask), attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100,
                                           label_smoothing=label_smoothing)

    @torch.no_grad()
    def score(self, batch: dict, frames: torch.Tensor | None, frame_mask: torch.Tensor | None,
              queries: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood [B, C] of each label word (its tokens + end of sequence) as the answer.

        One decoder pass scores all C words: the encoder's output repeated C times, each copy decoding one
        word (shorter words padded, the padding not counted). The same numbers as one pass per word, ~20%
        faster on a CPU."""
        from transformers.modeling_outputs import BaseModelOutput

        mask = batch["attention_mask"]
        encoder = self.llm.get_encoder()(inputs_embeds=self.embed(batch, frames, frame_mask, queries), attention_mask=mask)
        words = [self.format.label_ids(word) for word in self.words]
        width, rows, count = max(map(len, words)), mask.shape[0], len(words)
        labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in words], device=mask.device)
        labels = labels.repeat_interleave(rows, 0)  # word-major: word c's copy of item b is row c * rows + b
        logits = self.llm(encoder_outputs=BaseModelOutput(last_hidden_state=encoder.last_hidden_state.repeat(count, 1, 1)),
                          attention_mask=mask.repeat(count, 1), labels=labels).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * (labels != -100)).sum(-1).view(count, rows).T

    @torch.no_grad()
    def generate(self, batch: dict, frames: torch.Tensor | None, frame_mask: torch.Tensor | None, num_beams: int = 4,
                 queries: torch.Tensor | None = None) -> list[str]:
        """Free generation (the paper's beam search, beam 4); an answer counts only if it matches a label exactly."""
        out = self.llm.generate(inputs_embeds=self.embed(batch, frames, frame_mask, queries), attention_mask=batch["attention_mask"],
                                num_beams=num_beams, max_new_tokens=16)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
