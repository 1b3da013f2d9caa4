"""predict.py on the tiny T5: the training prefixes, every input source, both output formats, and errors."""

import io
import json
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

import predict
from conftest import ROOT
from train_utils import tokenize

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
    prefixed = tokenize(DatasetDict({"test": split}), tokenizer, "task_prefix", 64)["test"]
    standard = tokenize(DatasetDict({"test": split}), tokenizer, "standard", 64)["test"]
    for i, text in enumerate(TEXTS):
        assert prefixed[i]["input_ids"] == tokenizer(predict.LABEL_PREFIX + text).input_ids
        assert prefixed[i]["expl_input_ids"] == tokenizer(predict.RATIONALE_PREFIX + text).input_ids
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
