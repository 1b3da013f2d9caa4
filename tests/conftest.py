"""Shared fixtures: a tiny T5 student with a SentencePiece vocabulary trained here, and the real data if present."""

import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "datasets"
SHARED_TOKENIZER = ROOT.parent / "shared" / "t5-tokenizer"

WORDS = (
    "the a an of to in is was are he she they it what where which who how many much more less each every "
    "apple apples tree trees bus train station bridge park garden math problem gravity answer choices "
    "premise hypothesis entailment neutral contradiction so must be something place would live only "
    "has have had points round rounds game score scored gained same number children kids played tag "
    "rows pencils crayons books shelf dogs cats birds church choir sings songs ceiling cracks store london"
).split()


def corpus_lines(n: int = 600, seed: int = 0) -> list[str]:
    """Text to train the test vocabulary on: real rows when ../shared is present, else generated sentences."""
    lines = []
    for path in (SHARED_DATA / "cqa" / "cqa_test.json", SHARED_DATA / "svamp" / "svamp_train.json"):
        if path.is_file():
            for line in path.read_text().splitlines()[:300]:
                row = json.loads(line)
                lines.append(" ".join(str(v) for v in row.values() if isinstance(v, (str, list))))
    rng = random.Random(seed)
    while len(lines) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 15))]
        numbers = f"( {rng.randint(1, 99)}.0 {rng.choice('+-*/')} {rng.randint(1, 99)}.0 )"
        lines.append(" ".join(words) + f" (a) (b) (c) (d) (e) {numbers}. So the answer is: predict explain")
    return lines


def build_tiny_t5(directory: Path) -> Path:
    """Save a randomly initialised 2+2-layer T5 (v1.1 shape) and its tokenizer into directory."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("\n".join(corpus_lines()) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "spiece"), vocab_size=600, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (directory / "spiece.vocab").unlink()
    text.unlink()
    tokenizer = T5Tokenizer.from_pretrained(str(directory), extra_ids=0)
    tokenizer.save_pretrained(str(directory))
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cqa").is_dir() or not (SHARED_DATA / "svamp").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the paper's datasets.zip, unzipped, beside the checkout)")
    return SHARED_DATA


# A minimal chat template (user turn, then the assistant's), enough to test --chat_template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(directory: Path, specials: dict[str, str], bos_first: bool, seq2seq: bool = False):
    """A byte-level BPE vocabulary (GPT-2/Llama/BART style) trained here on the test corpus, saved in directory.

    bos_first: the tokenizer prepends BOS (Llama, BART); seq2seq: it also appends EOS (BART).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    ordered = list(dict.fromkeys(specials.values())) + ["<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=ordered,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    if bos_first:
        bos, eos = specials["bos_token"], specials["eos_token"]
        single = f"{bos} $A {eos}" if seq2seq else f"{bos} $A"
        ids = {t: tokenizer.token_to_id(t) for t in (bos, eos)}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=list(ids.items()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    return wrapped


def build_tiny_student(directory: Path, kind: str) -> Path:
    """Save a random tiny student of the given shape (gpt2, llama, qwen2, bart) and its tokenizer into directory."""
    from transformers import (
        BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
        Qwen2Config, Qwen2ForCausalLM,
    )

    directory.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":  # GPT-2: one <|endoftext|> for BOS and EOS, no pad token
        tok = build_bpe_tokenizer(directory, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, False)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif kind == "llama":  # Llama: BOS prepended, untied head
        tok = build_bpe_tokenizer(directory, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, True)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    elif kind == "qwen2":  # Qwen2: no BOS, tied embeddings, <|endoftext|> pads
        tok = build_bpe_tokenizer(directory, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, False)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    elif kind == "bart":
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        tok = build_bpe_tokenizer(directory, specials, True, seq2seq=True)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_students(tmp_path_factory, tiny_t5) -> dict[str, Path]:
    """A tiny random student of every family shape, keyed by shape: t5, bart, gpt2, llama, qwen2."""
    built = {kind: build_tiny_student(tmp_path_factory.mktemp(f"tiny-{kind}"), kind)
             for kind in ("bart", "gpt2", "llama", "qwen2")}
    return {"t5": tiny_t5, **built}
