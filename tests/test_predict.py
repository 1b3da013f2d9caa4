"""predict.py on the tiny T5: the training prefixes, every input source, both output formats, and errors."""

import io
import json
import random
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

import predict
from conftest import ROOT
from views import tokenize_seq2seq

TEXTS = ["the apple tree is in the park", "where does he live?\nAnswer Choices:\n(a) bus\n(b) park", "how many books"]


def run_predict(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = predict.main([*argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


@pytest.fixture
def model(tiny_t5) -> list[str]:
    return ["--model", str(tiny_t5), "--max_new_tokens", "3", "--batch_size", "2"]


def test_inputs_get_the_prefixes_used_in_training(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    split = Dataset.from_dict({"input": TEXTS, "label": ["x"] * 3, "rationale": ["y"] * 3})
    prefixed = tokenize_seq2seq(DatasetDict({"test": split}), tokenizer, "task_prefix", 64)["test"]
    standard = tokenize_seq2seq(DatasetDict({"test": split}), tokenizer, "standard", 64)["test"]
    for i, text in enumerate(TEXTS):
        assert prefixed[i]["input_ids"] == tokenizer(predict.PREDICT_PREFIX + text).input_ids
        assert prefixed[i]["expl_input_ids"] == tokenizer(predict.EXPLAIN_PREFIX + text).input_ids
        assert standard[i]["input_ids"] == tokenizer(text).input_ids


def test_every_input_source_gives_the_same_predictions(capsys, monkeypatch, tmp_path, model):
    code, from_args, _ = run_predict(capsys, *model, "--json", *TEXTS)
    assert code == 0
    rows = [json.loads(line) for line in from_args]
    assert [row["input"] for row in rows] == TEXTS
    assert all(isinstance(row["label"], str) and "rationale" not in row for row in rows)

    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text("".join(json.dumps({"input": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    assert run_predict(capsys, *model, "--json", "--file", str(jsonl))[1] == from_args
    monkeypatch.setattr(sys, "stdin", io.StringIO(jsonl.read_text()))
    assert run_predict(capsys, *model, "--json")[1] == from_args

    one_line_texts = [TEXTS[0], TEXTS[2]]  # plain lines hold one-line inputs only
    from_args = run_predict(capsys, *model, "--json", *one_line_texts)[1]
    plain = tmp_path / "inputs.txt"
    plain.write_text("\n".join(one_line_texts) + "\n\n")
    assert run_predict(capsys, *model, "--json", "--file", str(plain))[1] == from_args
    monkeypatch.setattr(sys, "stdin", io.StringIO(plain.read_text()))
    assert run_predict(capsys, *model, "--json")[1] == from_args


def test_text_output_is_one_line_per_input(capsys, model):
    code, lines, _ = run_predict(capsys, *model, *TEXTS)
    assert code == 0 and len(lines) == len(TEXTS)
    assert all("\t" not in line for line in lines)
    code, lines, _ = run_predict(capsys, *model, "--no_prefix", *TEXTS)
    assert code == 0 and len(lines) == len(TEXTS)


def test_rationale_adds_a_second_field(capsys, model):
    code, lines, _ = run_predict(capsys, *model, "--rationale", *TEXTS)
    assert code == 0 and len(lines) == len(TEXTS)
    assert all(len(line.split("\t")) == 2 for line in lines)
    code, lines, _ = run_predict(capsys, *model, "--rationale", "--json", *TEXTS)
    rows = [json.loads(line) for line in lines]
    assert all(set(row) == {"input", "label", "rationale"} for row in rows)
    text_lines = run_predict(capsys, *model, "--rationale", *TEXTS)[1]
    assert [" ".join(row["label"].split()) for row in rows] == [line.split("\t")[0] for line in text_lines]


def test_errors_are_one_line(capsys, monkeypatch, tmp_path, model):
    code, out, err = run_predict(capsys, "--model", str(tmp_path / "missing"), "x")
    assert code == 1 and not out and err.count("\n") == 1 and "missing" in err

    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    code, _, err = run_predict(capsys, *model, "--file", str(blank))
    assert code == 1 and "no inputs" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "ok"}\n{"text": "no input field"}\n')
    code, _, err = run_predict(capsys, *model, "--file", str(bad))
    assert code == 1 and f"{bad}:2" in err

    code, _, err = run_predict(capsys, *model, "--file", str(tmp_path / "absent.txt"))
    assert code == 1 and "absent.txt" in err

    with pytest.raises(SystemExit) as exit_info:
        predict.main([*model, "--no_prefix", "--rationale", "x"])
    assert exit_info.value.code == 2


def test_command_line_errors_have_no_traceback(tmp_path, tiny_t5):
    for argv, stdin in (
        (["--model", str(tmp_path / "missing"), "x"], ""),
        (["--model", str(tiny_t5)], "\n\n"),
    ):
        done = subprocess.run([sys.executable, str(ROOT / "predict.py"), *argv], input=stdin, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr and done.stdout == ""


# ---- inputs far longer than --max_input_length are cut before tokenising, to the same tokens ----

SEPARATORS = (" ", "\n", "  ", "\t", " \n\n ", ". ", "\n\t ")


def long_inputs(rows: list[str], max_tokens: int, count: int = 20) -> list[str]:
    """Inputs from consecutive rows joined by every kind of whitespace, each longer than the character budget for
    max_tokens, so the cut falls in words, at single spaces and inside whitespace runs."""
    budget = predict.CHARACTERS_PER_TOKEN * max_tokens
    inputs, i = [], 0
    while len(inputs) < count:
        separator = SEPARATORS[len(inputs) % len(SEPARATORS)]
        parts = []
        while len(separator.join(parts)) <= budget + len(inputs) % 97:
            parts.append(rows[i % len(rows)])
            i += 1
        inputs.append(separator.join(parts))
    return inputs


def assert_same_tokens_after_the_cut(tokenizer, inputs: list[str], max_tokens: int) -> int:
    """Every input's kept tokens, as predict.py's seq2seq and decoder-only paths tokenise them, with and without the
    cut; returns how many inputs were cut (a refused one fails: these are ordinary texts)."""
    from views import causal_prompts

    cut_count = 0
    for prefix in ("", predict.PREDICT_PREFIX, predict.EXPLAIN_PREFIX):
        texts = [prefix + text for text in inputs]
        cuts = [predict.cut_for_tokenizer(tokenizer, text, max_tokens) for text in texts]
        assert None not in cuts
        cut_count += sum(cut != text for cut, text in zip(cuts, texts))
        assert all(len(cut) <= predict.CHARACTERS_PER_TOKEN * max_tokens for cut in cuts)
        whole = tokenizer(texts, max_length=max_tokens, truncation=True)["input_ids"]
        assert tokenizer(cuts, max_length=max_tokens, truncation=True)["input_ids"] == whole
        assert all(len(ids) == max_tokens for ids in whole), "every input is longer than what is kept"
        assert causal_prompts(tokenizer, cuts, max_tokens, False) == causal_prompts(tokenizer, texts, max_tokens, False)
    return cut_count


def test_inputs_within_the_budget_are_tokenised_unchanged(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    for text in [*TEXTS, "x" * 64 * 16, " " * 64 * 16, "a " * 32 * 16]:
        assert predict.cut_for_tokenizer(tokenizer, text, 16) is text


@pytest.fixture(scope="module")
def tokenizers(tiny_t5, tmp_path_factory) -> dict:
    """T5's SentencePiece (as transformers 5 builds it and as the paper's tokenizer split), and byte-level BPE with
    and without BOS, as the decoder-only students use."""
    from conftest import SHARED_TOKENIZER, build_bpe_tokenizer
    from views import original_t5_pretokenization

    t5 = AutoTokenizer.from_pretrained(tiny_t5)
    built = {"t5": t5, "t5-original": original_t5_pretokenization(t5)}
    if (SHARED_TOKENIZER / "spiece.model").is_file():
        built["t5-public-vocab"] = AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
    gpt2 = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    built["bpe"] = build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), gpt2, bos_first=False)
    llama = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    built["bpe-bos"] = build_bpe_tokenizer(tmp_path_factory.mktemp("bpe-bos"), llama, bos_first=True)
    return built


@pytest.mark.parametrize("max_tokens", [4, 16, 64])
def test_long_inputs_are_cut_to_the_same_tokens(tokenizers, max_tokens):
    from conftest import corpus_lines

    rows = corpus_lines(400, seed=3)
    for name, tokenizer in tokenizers.items():
        assert assert_same_tokens_after_the_cut(tokenizer, long_inputs(rows, max_tokens), max_tokens) > 0, name


def test_odd_texts_are_cut_to_the_same_tokens_or_refused(tokenizers):
    """Random texts of the pieces tokenizers treat specially (whitespace runs, combining accents, ligatures that
    normalisation expands, invisible characters, CJK without spaces, contractions): each is either cut to the same
    tokens or refused, never cut to other tokens."""
    from views import causal_prompts

    pieces = [" ", "  ", "\n", "\t", " \n\n ", "word", "e\u0301", "\ufb01", "\u200b", "\u4e2d\u6587", "'s", "!", "42",
              "the", "\u00e9t\u00e9", "\U0001f600", "x" * 30]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(100, 400))) for _ in range(40)]
    max_tokens = 8
    for name, tokenizer in tokenizers.items():
        cuts = [predict.cut_for_tokenizer(tokenizer, text, max_tokens) for text in texts]
        kept = [(cut, text) for cut, text in zip(cuts, texts) if cut is not None]
        assert sum(cut != text for cut, text in kept) >= 20, name
        for cut, text in kept:
            assert tokenizer([cut], max_length=max_tokens, truncation=True)["input_ids"] == tokenizer(
                [text], max_length=max_tokens, truncation=True)["input_ids"], (name, text)
            assert causal_prompts(tokenizer, [cut], max_tokens, False) == causal_prompts(
                tokenizer, [text], max_tokens, False), (name, text)


@pytest.mark.slow
def test_real_rows_are_cut_to_the_same_tokens(tokenizers, shared_data):
    from data_utils import read_rows

    for dataset, split in (("cqa", "test"), ("svamp", "test"), ("esnli", "test")):
        if not (shared_data / dataset).is_dir():
            continue
        rows = [row["input"] for row in read_rows(shared_data, dataset, split, eos="</s>")]
        for name, tokenizer in tokenizers.items():
            for max_tokens in (8, 64):
                assert assert_same_tokens_after_the_cut(tokenizer, long_inputs(rows, max_tokens, 40), max_tokens), name


def test_a_huge_line_is_cut_before_tokenising_and_predicted_as_before(capsys, monkeypatch, tmp_path, model):
    words = " ".join([TEXTS[0], TEXTS[2]] * 6000)  # about 270 kB on one line
    path = tmp_path / "huge.txt"
    path.write_text(TEXTS[0] + "\n" + words + "\n")
    flags = [*model, "--max_input_length", "16", "--rationale", "--json", "--file", str(path)]
    seen = []
    real_generate = predict.generate
    monkeypatch.setattr(predict, "generate", lambda tok, mod, texts, args: seen.append(texts) or real_generate(
        tok, mod, texts, args))
    code, cut_rows, err = run_predict(capsys, *flags)
    assert code == 0, err
    assert max(len(text) for texts in seen for text in texts) <= predict.CHARACTERS_PER_TOKEN * 16
    assert [json.loads(row)["input"] for row in cut_rows] == [TEXTS[0], words], "the output names the whole input"

    monkeypatch.setattr(predict, "CHARACTERS_PER_TOKEN", 10**9)  # never cut: the whole line is tokenised
    assert run_predict(capsys, *flags)[1] == cut_rows


@pytest.mark.parametrize("line", ["a" + " " * 4999 + "b", "\u200b " * 2500 + "b", "x" * 5001])
def test_a_long_line_that_cannot_be_cut_safely_is_one_line(capsys, tmp_path, model, line):
    path = tmp_path / "inputs.txt"
    path.write_text(f"{TEXTS[0]}\n{line}\n")
    code, out, err = run_predict(capsys, *model, "--max_input_length", "16", "--file", str(path))
    assert code == 1 and not out and "Traceback" not in err
    [message] = err.splitlines()
    assert message.startswith(f"error: input 2 (5001 characters, starting {line[:40]!r}) is too long to read: its "
                              "first 1024 characters hold no word boundary or fewer than the 16 tokens")
