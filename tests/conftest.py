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


@pytest.fixture(scope="session", autouse=True)
def token_cache_in_tmp(tmp_path_factory):
    """Runs in the tests keep their tokenised splits in a temporary folder, never in the user's ~/.cache/dss."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSS_CACHE", str(tmp_path_factory.mktemp("dss-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cqa").is_dir() or not (SHARED_DATA / "svamp").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the paper's datasets.zip, unzipped, beside the checkout)")
    return SHARED_DATA
