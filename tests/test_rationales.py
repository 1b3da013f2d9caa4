"""Several teacher samples per input: annotate.py --samples, run.py --rationales first|all|correct|vote, the teacher
audit, and the sweep/summary axes; with a fake teacher whose outputs are known (right, wrong, unparseable, ties)."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

import annotate
import run
import summarize
import sweep
from data_utils import BLANK, DATASETS, DataError, load_data
from rationales import audit, choose, label_match, vote
from teachers import TeacherError
from train_utils import run_splits

K = 3


def right(i: int) -> str:
    return str(i + 1)


def wrong(i: int) -> str:
    return str(i + 100)


def fake_outputs(i: int) -> list[str]:
    """Row s<i>'s K samples, by i % 4: all right; wrong then right twice (the vote fixes the first sample); right,
    wrong, unparseable (a tie the first sample wins); unparseable then the same wrong answer twice."""
    def answer(letter: str, label: str) -> str:
        return f"think s{i} {letter}. So the answer is {label}."

    return [
        [answer("a", right(i)), answer("b", right(i)), answer("c", right(i))],
        [answer("a", wrong(i)), answer("b", right(i)), answer("c", right(i))],
        [answer("a", right(i)), answer("b", wrong(i)), "no answer here"],
        ["no answer here", answer("b", wrong(i)), answer("c", wrong(i))],
    ][i % 4]


class FakeTeacher:
    """Follows the teacher interface (samples, temperature, top_p; K outputs per prompt; `requests`, the cost records
    of the last call: none, as a teacher that cannot count tokens); `fail_on_call` makes that call (1-based) fail as a
    server error would."""

    def __init__(self, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, fail_on_call: int = 0):
        self.samples, self.fail_on_call = samples, fail_on_call
        self.calls: list[list[str]] = []
        self.requests: list[dict] = []

    def __call__(self, prompts: list[str], progress) -> list[list[str]]:
        self.calls.append(prompts)
        self.requests = []
        if len(self.calls) == self.fail_on_call:
            raise TeacherError("scripted failure")
        outputs = []
        for prompt in prompts:
            i = int(re.search(r"Q: s(\d+)\nA:$", prompt).group(1))
            outputs.append(fake_outputs(i)[: self.samples])
            progress(1)
        return outputs


def write_custom(root: Path, n: dict[str, int]) -> None:
    for split, rows in n.items():
        path = root / "custom" / f"custom_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"input": f"s{i}", "label": right(i)}) + "\n" for i in range(rows)))


def use_fake_teacher(monkeypatch, **kwargs) -> list[FakeTeacher]:
    made = []

    def make(args):
        made.append(FakeTeacher(args.samples, args.temperature, args.top_p, **kwargs))
        return made[-1]

    monkeypatch.setattr(annotate, "make_teacher", make)
    return made


def annotate_flags(data: Path, split: str, *extra: str) -> list[str]:
    return ["--dataset", "custom", "--data_dir", str(data), "--split", split, "--teacher", "openai", "--base_url",
            "http://unused", "--model", "fake", "--llm_name", "fake", *extra]


@pytest.fixture
def sampled_data(tmp_path, monkeypatch) -> Path:
    """custom data (train 8, valid 4, test 4) annotated by the fake teacher with K = 3 samples per input."""
    data = tmp_path / "data"
    write_custom(data, {"train": 8, "valid": 4, "test": 4})
    use_fake_teacher(monkeypatch)
    for split in ("train", "valid", "test"):
        assert annotate.main(annotate_flags(data, split, "--samples", str(K), "--temperature", "0.7")) == 0
    return data


# ---- choosing and voting ----


def test_vote_counts_parsed_labels_and_breaks_ties_by_the_first_sample():
    text = label_match("text")
    assert vote(["b", "a", "a"], text) == ("a", [False, True, True])
    assert vote(["a", "b", BLANK], text) == ("a", [True, False, False])  # a tie: the first sample's label
    assert vote([BLANK, "b", "a", "a", "b"], text) == ("b", [False, True, False, False, True])  # tie: b seen first
    assert vote([BLANK, BLANK], text) == (BLANK, [False, False])
    # svamp's metric: equal values vote together, under the first one's text.
    assert vote(["(80 + 2)", "(84 / 2)", "(40 + 2)"], label_match("equation")) == (
        "(84 / 2)", [False, True, True])


def test_choose_per_mode():
    rationales, labels, match = ["ra", "rb", "rc", BLANK], ["9", "2", "2", BLANK], label_match("text")
    assert choose(rationales, labels, "2", "first", match) == (["ra"], "9")
    assert choose(rationales, labels, "2", "all", match) == (["ra", "rb", "rc"], "9")
    assert choose(rationales, labels, "2", "correct", match) == (["rb", "rc"], "9")
    assert choose(rationales, labels, "9", "correct", match) == (["ra"], "9")
    assert choose(rationales, labels, "9", "vote", match) == (["rb", "rc"], "2")
    assert choose(["ra"], ["1"], "2", "correct", match) == ([], "1")


def test_audit_of_known_samples():
    labels = [[s.rsplit(" ", 1)[1].rstrip(".") if "answer is" in s else BLANK for s in fake_outputs(i)]
              for i in range(4)]
    record = audit(labels, [right(i) for i in range(4)], "text")
    assert record["rows"] == 4 and record["samples_per_row"] == K
    assert record["parse_rate"] == pytest.approx(10 / 12)
    assert (record["accuracy"], record["voted_accuracy"], record["any_correct"]) == (0.5, 0.75, 0.75)
    assert record["correct_samples"] == 0.5 and record["unanimous"] == 0.25
    assert record["agreement"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 2 / 3) / 4)
    assert "per_class" not in record

    nli = audit([["neutral"], ["neutral"], ["entailment"]], ["neutral", "entailment", "entailment"], "text",
                ("entailment", "neutral", "contradiction"))
    assert nli["per_class"] == {
        "entailment": {"rows": 2, "accuracy": 0.5, "voted_accuracy": 0.5},
        "neutral": {"rows": 1, "accuracy": 1.0, "voted_accuracy": 1.0},
        "contradiction": {"rows": 0, "accuracy": 0.0, "voted_accuracy": 0.0},
    }


# ---- annotate.py --samples ----


def test_sampled_annotation_layout_audit_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS, "custom", dataclasses.replace(DATASETS["custom"], chunk_size=3))
    data = tmp_path / "data"
    write_custom(data, {"train": 8, "test": 2})
    folder = data / "custom" / "fake"
    flags = annotate_flags(data, "train", "--samples", str(K), "--temperature", "0.7", "--top_p", "0.9")

    made = use_fake_teacher(monkeypatch, fail_on_call=2)
    assert annotate.main(flags) == 1
    assert "scripted failure" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["train_CoT_0.json", "train_CoT_0.usage.json"]
    assert json.loads((folder / "train_CoT_0.json").read_text()) == [fake_outputs(i) for i in range(3)]
    assert annotate.main(annotate_flags(data, "train", "--samples", "2", "--temperature", "0.7")) == 1
    assert "holds 3 sample(s) per row where --samples 2 asks for 2" in capsys.readouterr().err

    made = use_fake_teacher(monkeypatch)
    assert annotate.main(flags) == 0
    assert [len(call) for call in made[0].calls] == [3, 2], "only the chunks not yet written are asked"
    assert json.loads((folder / "train_CoT_2.json").read_text()) == [fake_outputs(6), fake_outputs(7)]
    record = json.loads((folder / "train_annotation.json").read_text())
    assert (record["samples"], record["temperature"], record["top_p"]) == (K, 0.7, 0.9)
    assert (record["rows"], record["accuracy"], record["voted_accuracy"], record["any_correct"]) == (8, 0.5, 0.75, 0.75)
    out = capsys.readouterr().out
    assert "teacher audit, train: 8 inputs x 3 samples" in out and "--rationales all|correct|vote" in out

    hotter = annotate_flags(data, "train", "--samples", str(K), "--temperature", "1.0", "--top_p", "0.9")
    assert annotate.main(hotter) == 1
    assert "annotated with --temperature 0.7, not 1.0" in capsys.readouterr().err


def test_several_greedy_samples_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        annotate.parse_args(["--dataset", "cqa", "--teacher", "hf", "--model", "m", "--samples", "4"])
    assert exit_info.value.code == 2 and "--temperature > 0" in capsys.readouterr().err


def test_one_sample_writes_the_one_string_per_row_layout(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_custom(data, {"train": 4, "test": 2})
    use_fake_teacher(monkeypatch)
    assert annotate.main(annotate_flags(data, "train")) == 0
    assert json.loads((data / "custom" / "fake" / "train_CoT_0.json").read_text()) == [
        fake_outputs(i)[0] for i in range(4)]


# ---- run.py --rationales ----


def prepared(data: Path, tiny_t5: Path, *extra: str):
    """run.py's data for these flags: (splits, record, tokenized train with the kept rationales, tokenizer)."""
    from transformers import AutoTokenizer

    from rationales import tokenize_kept_rationales
    from views import MAX_TARGET_LENGTH, tokenize_seq2seq

    config = run.parse_args(["--dataset", "custom", "--data_dir", str(data), "--llm", "fake", "--from_pretrained",
                             str(tiny_t5), *extra])
    record = {}
    splits = run_splits(config, "</s>", record)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    tokenized = tokenize_seq2seq(splits, tokenizer, config.training.model_type, config.training.max_input_length)
    if config.data.rationales != "first":
        tokenized["train"] = tokenize_kept_rationales(tokenized["train"], splits["train"]["rationales"], tokenizer,
                                                      MAX_TARGET_LENGTH)
    return splits, record, tokenized["train"], tokenizer


def explain_targets(texts: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(text_target=texts)["input_ids"]


@pytest.mark.parametrize(
    "mode, kept, inputs_kept",
    [
        # per group of 4 inputs: all 3+3+2+2, correct 3+2+1+0, vote 3+2+1+2 (the last votes for the wrong answer)
        ("all", ["a b c", "a b c", "a b", "b c"], 8),
        ("correct", ["a b c", "b c", "a", ""], 6),
        ("vote", ["a b c", "b c", "a", "b c"], 8),
    ],
)
def test_rows_the_trainer_sees(sampled_data, tiny_t5, capsys, mode, kept, inputs_kept):
    from model_utils import LABEL_PAD, TaskPrefixDataCollator

    splits, record, train, tokenizer = prepared(sampled_data, tiny_t5, "--rationales", mode, "--label_type", "llm")
    counts = record["rationale_counts"]
    expected = {i: [f"think s{i} {letter}." for letter in kept[i % 4].split()] for i in range(8)}
    assert counts == {"mode": mode, "inputs": 8, "inputs_with_rationales": inputs_kept,
                      "rationales": sum(map(len, expected.values())), "samples": 24}
    out = capsys.readouterr().out
    assert f"--rationales {mode}: {counts['rationales']} rationales of 24 teacher samples" in out
    assert "teacher audit, train: 8 inputs x 3 samples" in out and "LLM Train Acc: 0.5000" in out

    batch = TaskPrefixDataCollator(tokenizer)([train[i] for i in range(len(train))])
    rows = [int(re.fullmatch(r"s(\d+)", text).group(1)) for text in splits["train"]["input"]]
    assert batch["pred"]["input_ids"].shape[0] == 8, "one predict row per input, whatever K"
    targets = [[t for t in row if t != LABEL_PAD] for row in batch["expl"]["labels"].tolist()]
    assert targets == explain_targets([text for i in rows for text in expected[i]], tokenizer)
    explain_inputs = [[t for t in row if t != tokenizer.pad_token_id] for row in batch["expl"]["input_ids"].tolist()]
    assert explain_inputs == [train[n]["expl_input_ids"] for n, i in enumerate(rows) for _ in expected[i]]
    labels = [tokenizer.decode([t for t in row if t != LABEL_PAD], skip_special_tokens=True)
              for row in batch["pred"]["labels"].tolist()]
    # --label_type llm: the first sample's label, or under vote the majority's (unparsed first samples are blank)
    first = {0: right, 1: wrong, 2: right, 3: lambda i: ""}
    voted = {0: right, 1: right, 2: right, 3: wrong}
    assert labels == [(voted if mode == "vote" else first)[i % 4](i) for i in rows]


def test_first_is_the_first_sample_and_keeps_the_paper_columns(sampled_data, tiny_t5):
    splits, record, train, _ = prepared(sampled_data, tiny_t5)
    assert set(splits["train"].column_names) == {"input", "label", "rationale", "llm_label"}
    assert "kept_rationale_labels" not in train.column_names and record == {}
    assert sorted(splits["test"]["rationale"]) == sorted(
        ["think s0 a.", "think s1 a.", "think s2 a.", BLANK])


def test_a_batch_without_rationales_weighs_its_label_loss_by_alpha(sampled_data, tiny_t5):
    from types import SimpleNamespace

    import torch
    from transformers import T5ForConditionalGeneration

    from model_utils import TaskPrefixDataCollator, TaskPrefixTrainer

    splits, _, train, tokenizer = prepared(sampled_data, tiny_t5, "--rationales", "correct", "--alpha", "0.3")
    without = [train[n] for n, text in enumerate(splits["train"]["input"]) if int(text[1:]) % 4 == 3]
    batch = TaskPrefixDataCollator(tokenizer)(without)
    assert batch["expl"] is None and batch["pred"]["input_ids"].shape[0] == 2

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    trainer = SimpleNamespace(alpha=0.3, fast_loss_applies=lambda m: False, distillation=None)
    trainer.compute_loss = lambda *a, **k: TaskPrefixTrainer.compute_loss(trainer, *a, **k)
    trainer.weighted_view_loss = lambda *a: TaskPrefixTrainer.weighted_view_loss(trainer, *a)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        assert torch.allclose(loss, 0.3 * model(**batch["pred"]).loss)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rationales", "correct", "--llm", "none", "--model_type", "standard"], "chooses among teacher samples"),
        (["--rationales", "all", "--model_type", "standard"], "--model_type standard does not train on"),
    ],
)
def test_rationale_flag_mistakes(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--dataset", "cqa", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["all", "vote"])
def test_run_end_to_end_with_sampled_rationales(sampled_data, tiny_t5, tmp_path, capsys, mode):
    argv = ["--dataset", "custom", "--data_dir", str(sampled_data), "--llm", "fake", "--from_pretrained", str(tiny_t5),
            "--rationales", mode, "--label_type", "llm", "--max_steps", "2", "--eval_steps", "2", "--batch_size", "3",
            "--gen_max_len", "4", "--no_log", "--output_dir", str(tmp_path / "out")]
    assert run.main(argv) == 0, capsys.readouterr().err
    [path] = (tmp_path / "out").rglob("results.json")
    record = json.loads(path.read_text())
    assert record["config"]["rationales"] == mode and record["config_dir"].endswith(f"/rationales_{mode}")
    assert record["rationale_counts"]["rationales"] == {"all": 20, "vote": 16}[mode]
    assert record["teacher_audit"]["train"]["voted_accuracy"] == 0.75
    assert record["teacher_audit"]["test"]["rows"] == 4


def test_cqa_correct_keeps_the_rationales_whose_label_is_right(shared_data, capsys):
    argv = ["--dataset", "cqa", "--data_dir", str(shared_data), "--rationales", "correct"]
    first = run_splits(run.parse_args(argv[:4]), "</s>")
    right_rows = sum(a == b for a, b in zip(first["train"]["label"], first["train"]["llm_label"]))
    assert right_rows == 6514 and round(right_rows / len(first["train"]), 4) == 0.7431  # README: LLM Train Acc
    capsys.readouterr()
    record = {}
    splits = run_splits(run.parse_args(argv), "</s>", record)
    assert "--rationales correct: 6514 rationales of 8766 teacher samples kept" in capsys.readouterr().out
    assert record["rationale_counts"]["inputs_with_rationales"] == 6514
    kept = splits["train"]["rationales"]
    assert all(r == ([rationale] if label == llm else []) for r, rationale, label, llm in zip(
        kept, first["train"]["rationale"], first["train"]["label"], first["train"]["llm_label"]))


@pytest.mark.slow
def test_cqa_correct_trains(shared_data, tiny_t5, tmp_path, capsys):
    argv = ["--dataset", "cqa", "--data_dir", str(shared_data), "--rationales", "correct", "--from_pretrained",
            str(tiny_t5), "--subsample", "0.05", "--max_steps", "2", "--eval_steps", "2", "--batch_size", "8",
            "--max_eval_samples", "16", "--gen_max_len", "4", "--max_input_length", "128", "--no_log",
            "--output_dir", str(tmp_path)]
    assert run.main(argv) == 0
    printed = re.search(r"--rationales correct: (\d+) rationales of (\d+) teacher samples", capsys.readouterr().out)
    [path] = tmp_path.rglob("results.json")
    counts = json.loads(path.read_text())["rationale_counts"]
    assert (counts["rationales"], counts["samples"]) == (int(printed.group(1)), int(printed.group(2))) == (
        counts["inputs_with_rationales"], 438)
    assert 0.65 < counts["rationales"] / counts["samples"] < 0.83


def test_sampled_chunks_must_have_one_k(tmp_path):
    write_custom(tmp_path, {"train": 2, "test": 1})
    folder = tmp_path / "custom" / "bad"
    folder.mkdir()
    (folder / "train_CoT_0.json").write_text(json.dumps([["a", "b"], ["c"]]))
    with pytest.raises(DataError, match="equally long lists of strings"):
        load_data("custom", tmp_path, llm="bad")


# ---- sweep and summary ----


def test_sweep_rationale_modes_axis():
    args, passthrough = sweep.parse_args(["--dataset", "cqa", "--fractions", "1.0", "--rationale_modes", "first",
                                          "correct", "vote"])
    argvs = sweep.run_argvs(args, passthrough)
    modes = [(argv[argv.index("--model_type") + 1], argv[argv.index("--label_type") + 1],
              argv[argv.index("--rationales") + 1] if "--rationales" in argv else "first") for argv in argvs]
    assert modes == [
        ("standard", "gt", "first"),
        ("standard", "llm", "first"), ("standard", "llm", "vote"),
        ("task_prefix", "gt", "first"), ("task_prefix", "gt", "correct"), ("task_prefix", "gt", "vote"),
        ("task_prefix", "llm", "first"), ("task_prefix", "llm", "correct"), ("task_prefix", "llm", "vote"),
    ]
    assert len({sweep.results_path(argv) for argv in argvs}) == len(argvs), "every mode has its own run folder"
    with pytest.raises(SystemExit):
        sweep.parse_args(["--dataset", "cqa", "--rationales", "all"])


def test_summary_keeps_modes_apart_and_draws_the_teacher(tmp_path, capsys):
    runs = tmp_path / "runs"
    audits = {"test": {"accuracy": 0.7723, "voted_accuracy": 0.8, "samples_per_row": 3}}
    for name, mode, accuracy in (("first", "first", 0.5), ("correct", "correct", 0.6), ("vote", "vote", 0.7)):
        path = runs / name / "results.json"
        path.parent.mkdir(parents=True)
        config = {"dataset": "cqa", "from_pretrained": "t5", "model_type": "task_prefix", "label_type": "llm",
                  "llm": "palm", "alpha": 0.5, "subsample": 1.0, "run": 0, "rationales": mode}
        path.write_text(json.dumps({"config": config, "selected_test_accuracy": accuracy, "teacher_audit": audits}))
    out = tmp_path / "summary"
    assert summarize.main([str(runs), "--out", str(out), "--teacher_line"]) == 0
    markdown = (out / "summary.md").read_text()
    assert "| dss_llm | 50.00 (n=1) |" in markdown and "| dss_llm rationales=correct | 60.00 (n=1) |" in markdown
    assert "| dss_llm rationales=vote | 70.00 (n=1) |" in markdown
    assert "Teacher [palm] test accuracy: 77.23 (first sample), 80.00 (voted)" in markdown
    assert (out / "cqa_fraction.png").is_file()
