"""Shared fixtures: a tiny T5 student with a SentencePiece vocabulary trained here, data rows in the exact layout of
the paper's datasets.zip, and the real data of ../shared if present.

Everything but `shared_data` (and the tests asking for the public T5 vocabulary) is built from the tests alone, so a
fresh clone with nothing beside it passes. DSS_HIDE_SHARED=1 treats ../shared as absent, as on such a clone.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def share_cores_among_workers() -> None:
    """Under pytest-xdist (pyproject's addopts run `-n auto`), each worker and the processes its tests start get an
    equal share of the cores: torch's OpenMP threads spin while they wait, so workers that each took every core
    would slow each other down. Set before torch is imported anywhere in the worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


share_cores_among_workers()

SHARED_HIDDEN = os.environ.get("DSS_HIDE_SHARED", "0") not in ("", "0")
SHARED = ROOT.parent / ("shared (hidden by DSS_HIDE_SHARED)" if SHARED_HIDDEN else "shared")
SHARED_DATA = SHARED / "datasets"
SHARED_TOKENIZER = SHARED / "t5-tokenizer"

WORDS = (
    "the a an of to in on at by for from with without into over under after before between about is was are were "
    "be been has have had do does did can could would should must may might will not no yes and or but if then so "
    "because than as he she they it we you i his her their its our your this that these those what where which who "
    "why how many much more less most least each every some any all both few other another same different first "
    "second last next one two three four five six seven eight nine ten hundred thousand half twice "
    "apple apples tree trees bus train station bridge park garden math problem gravity answer answers choices choice "
    "premise hypothesis entailment neutral contradiction something place live lives only points round rounds game "
    "games score scored gained lost number numbers children child kids played plays tag rows row pencils crayons "
    "books book shelf shelves dogs dog cats cat birds bird church choir sings songs sang ceiling cracks store stores "
    "london city town house houses home school schools student students teacher class room rooms door window table "
    "chair bed kitchen water food bread milk eggs cake cookies candy money dollars cents price cost bought sold buy "
    "sell paid pay spent spend gave give got get took take made make found find put left right up down out off away "
    "back again still also very too just now then today yesterday tomorrow morning evening night day days week weeks "
    "month year years time hours minutes old young big small large little long short tall high low new good bad "
    "happy sad hot cold man woman men women boy boys girl girls friend friends family mother father brother sister "
    "people person car cars road street shop market farm farmer animals animal horse cow sheep fish river lake sea "
    "beach mountain forest field flowers flower grass sun rain snow wind sky picture music movie story letter "
    "word words question questions reason explain explanation predict example sentence true false people walking "
    "running sitting standing playing eating drinking reading writing looking holding wearing riding building "
    "working sleeping near far inside outside together alone shirt hat shoes bag box boxes basket baskets marbles "
    "stickers toys ball balls cards pages total altogether remaining equal equally per every divided shared among"
).split()
# Pseudo-words give the unigram trainer the variety a 600-piece vocabulary needs; real words above keep
# ordinary English whole.
ONSETS = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gr pl pr sh sl sp st str th tr wh".split()
VOWELS = "a e i o u ai ea ee oo ou ie".split()
CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "rt", "ll", "ght"]
# Every printable ASCII character, so that none of them becomes <unk>.
ASCII_LINE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(1, 3)))


def corpus_lines(n: int = 2000, seed: int = 0) -> list[str]:
    """Generated text to train the test vocabulary on: questions, multiple choices, equations and answers in the
    shape of the datasets' rows, never read from disk, so the tiny model is the same on every machine."""
    rng = random.Random(seed)
    lines = [ASCII_LINE]
    while len(lines) < n:
        words = [rng.choice(WORDS) if rng.random() < 0.7 else pseudo_word(rng) for _ in range(rng.randint(5, 15))]
        words[0] = words[0].capitalize()
        numbers = f"( {rng.randint(1, 999)}.0 {rng.choice('+-*/')} {rng.randint(1, 99)}.0 )"
        choices = " ".join(f"({letter}) {rng.choice(WORDS)}" for letter in "abcde")
        lines.append(" ".join(words) + f"? Answer Choices: {choices} {numbers}. So the answer is: predict explain")
    return lines


def build_tiny_t5(directory: Path, vocabulary: Path | None = None) -> Path:
    """Save a randomly initialised 2+2-layer T5 (v1.1 shape: gated GELU, untied head) and its tokenizer into
    directory: a SentencePiece vocabulary trained here, or the T5 tokenizer folder `vocabulary` (its spiece.model)."""
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if vocabulary is None:
        text = directory / "corpus.txt"
        text.write_text("\n".join(corpus_lines()) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(directory / "spiece"), vocab_size=600, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
        )
        (directory / "spiece.vocab").unlink()
        text.unlink()
        tokenizer = T5Tokenizer.from_pretrained(str(directory), extra_ids=0)
    else:
        shutil.copyfile(vocabulary / "spiece.model", directory / "spiece.model")
        tokenizer = T5Tokenizer.from_pretrained(str(vocabulary))
    tokenizer.save_pretrained(str(directory))
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(0)  # the same weights in every session: tolerances on rounding are tested on one fixed model
    model = T5ForConditionalGeneration(config)
    # transformers 5 ties a new T5's head to its embeddings whatever the config says; t5-v1_1 checkpoints carry their
    # own head, and so does this one.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(str(directory))
    return directory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests (marked slow) first: pytest-xdist hands tests out one at a time (pyproject's addopts), so its
    workers share the long ones out from the start instead of one worker ending the session alone with one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


# ---- rows in the exact layout of datasets.zip: <name>/<name>_<split>.json, <name>/llm/<split>_CoT_<i>.json ----

CQA_CHOICES = ("park", "coloring book", "garden center", "math problem", "gravity")


def cqa_row(i: int) -> dict:
    answer = CQA_CHOICES[i % 5]
    return {"id": f"{i:032x}", "question": f"Where would you find apples number {i}?", "choices": list(CQA_CHOICES),
            "answer": answer, "abstractive_explanation": f"apples grow in a {answer}",
            "extractive_explanation": f"where would you find apples number {i}?"}


def cqa_output(i: int) -> str:
    """PaLM's continuation: rationale, answer with its choice letter, then the start of the next exemplar."""
    letter, answer = "abcde"[(i + i // 5) % 5], CQA_CHOICES[(i + i // 5) % 5]
    return (f"The answer must be a place with apples. Of the above choices, only {answer} has apples. "
            f"So the answer is ({letter}) {answer}.\n\nQ: What is this an example of?\nAnswer Choices:\n(a) x\n"
            "A: The answer must be")


def svamp_row(i: int) -> dict:
    return {"input": f"Luke scored {i + 2} points in 2 rounds of a game.\nHow many points did he score per round?",
            "label": f"( {i + 2}.0 / 2.0 )"}


def svamp_output(i: int) -> str:
    equation = f"({i + 2} / 2)" if i % 4 else f"({i + 2} * 2)"
    return f"Luke scored {i + 2} points in 2 rounds. The answer is {equation}.\n\nQ: There are 120 students. A: The"


FAKE_ROWS = {"cqa": (cqa_row, cqa_output), "svamp": (svamp_row, svamp_output)}


def write_fake_dataset(data_dir: Path, name: str, counts: dict[str, int]) -> None:
    """`counts` rows per split, with PaLM-style teacher outputs spread over the paper's number of chunks."""
    from data_utils import DATASETS

    row, output = FAKE_ROWS[name]
    (data_dir / name / "llm").mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        lines = "".join(json.dumps(row(i)) + "\n" for i in range(n))
        (data_dir / name / f"{name}_{split}.json").write_text(lines)
        chunks = DATASETS[name].chunks[split]
        per_chunk = -(-n // chunks)
        for c in range(chunks):
            outputs = [output(i) for i in range(c * per_chunk, min(n, (c + 1) * per_chunk))]
            (data_dir / name / "llm" / f"{split}_CoT_{c}.json").write_text(json.dumps(outputs))


@pytest.fixture
def fake_data_dir(tmp_path) -> Path:
    """A data folder laid out as the paper's datasets.zip, with cqa and svamp rows and PaLM-style chunks written
    here: for the loaders and end-to-end runs on every machine, ../shared or not."""
    data_dir = tmp_path / "datasets"
    write_fake_dataset(data_dir, "cqa", {"train": 40, "test": 6})
    write_fake_dataset(data_dir, "svamp", {"train": 30, "test": 5})
    return data_dir


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


class Died(Exception):
    """Stands for a kill in the middle of training: raised at the end of a step, after what the step wrote."""


def train_until_killed(argv: list[str], dies_after) -> None:
    """run.main(argv), stopped by Died at the end of the first step for which dies_after(step) holds; the run's
    checkpoints written so far stay, as after a kill."""
    import run
    import train_utils

    finish_step = train_utils.RunRecorder.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        finish_step(self, args, state, control, **kwargs)
        if dies_after(state.global_step):
            raise Died

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_utils.RunRecorder, "on_step_end", on_step_end)
        with pytest.raises(Died):
            run.main(argv)
