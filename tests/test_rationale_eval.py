"""run.py --eval_rationales: the rationale metrics on fixed strings, the flag's refusals, and tiny real runs."""

import json
from pathlib import Path

import pytest

import run
from config import RunConfig
from data_utils import DATASETS
from rationale_eval import (
    CONSISTENCY_RULES,
    choice_consistent,
    consistency,
    equation_consistent,
    last_equation,
    rationale_report,
    relation_consistent,
    rouge_l,
    stated_relation,
)

# ---- the metrics on fixed strings ----


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    # Tokens (lower-cased, stemmed): "the cat sat on the mat" vs "a cat sat on a mat": LCS "cat sat on mat" = 4;
    # precision 4/6, recall 4/6, F1 2/3.
    assert rouge_l(["the cat sat on the mat"], ["a cat sat on a mat"]) == pytest.approx(2 / 3)
    # LCS 2 of 2 predicted and 4 reference tokens: P 1, R 1/2, F1 2/3; identical texts 1; nothing shared 0.
    assert rouge_l(["apples grow"], ["apples grow on trees"]) == pytest.approx(2 / 3)
    assert rouge_l(["Apples grow.", "no overlap"], ["apples grow", "something else"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 rationales for 1 references"):
        rouge_l(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "rationale, prediction, expected",
    [
        ("Dave had 14 - 2 = 12 tickets. He used 10. So he had 12 - 10 = 2 tickets left.", "((14 - 2) - 10)", True),
        ("Dave had 14 - 2 = 12 tickets. He used 10. So he had 12 - 10 = 2 tickets left.", "(14 - 2)", False),
        ("Jack got 10 - (3 + 6) = 1 emails in the evening.", "(10 - (3 + 6))", True),
        ("So Ed had 45 - (-1) = 46 marbles.", "(45 + 1)", True),
        ("They planted 10 * 45 seeds. 10 * 45 is 450.", "(10 * 45)", True),
        ("Each group has 2 eggs.", "(2)", True),  # no expression: its last number
        ("Each group has 2 eggs.", "(3)", False),
        ("No numbers at all.", "(3)", False),
        ("(So she had 28 * 24 pencils)", "(28 * 24)", True),  # the sentence's own parentheses are dropped
        ("0.1 + 0.2 makes it.", "(0.3)", True),  # values within metrics' tolerance
    ],
)
def test_equation_rule(rationale, prediction, expected):
    assert equation_consistent(rationale, prediction, "") is expected


def test_last_equation_reads_the_last_expression():
    assert last_equation("So 3 + 4 = 7. Then 7 * 2 = 14.") == "7 * 2"
    assert last_equation("nothing") is None


CQA_INPUT = "What do children do?\nAnswer Choices:\n(a) play tag\n(b) go downtown\n(c) tag\n(d) sleep\n(e) read"
NLI_INPUT = "A premise.</s>A hypothesis."


@pytest.mark.parametrize(
    "rule, rationale, prediction, source, expected",
    [
        (choice_consistent, "Of the above choices, only play tag is something children do.", "play tag", CQA_INPUT,
         True),
        (choice_consistent, "Of the above choices, only Play  Tag is fun.", "play tag", CQA_INPUT, True),
        (choice_consistent, "Of the above choices, only downtown makes sense.", "go downtown", CQA_INPUT, False),
        (choice_consistent, "Only a tagline.", "tag", CQA_INPUT, False),  # whole words only
        (choice_consistent, "Children do what children do.", "do", CQA_INPUT, False),  # not one of the choices
        (choice_consistent, "Anything.", " ", CQA_INPUT, False),  # a blank prediction names nothing
        (relation_consistent, "The woman is not necessarily young.", "neutral", NLI_INPUT, True),
        (relation_consistent, "The woman is not necessarily young.", "contradiction", NLI_INPUT, False),
        (relation_consistent, "The woman is smiling, so she is not in pain.", "contradiction", NLI_INPUT, True),
        (relation_consistent, "An old man is a man, so this follows.", "entailment", NLI_INPUT, True),
        (relation_consistent, "Running implies moving.", "entailment", NLI_INPUT, True),
        (relation_consistent, "A man sits on a bench.", "entailment", NLI_INPUT, False),  # states no relation
    ],
)
def test_choice_and_relation_rules(rule, rationale, prediction, source, expected):
    assert rule(rationale, prediction, source) is expected


def test_stated_relation_reads_cue_words_in_order():
    assert stated_relation("It is not necessarily so.") == "neutral"
    assert stated_relation("This contradicts the premise.") == "contradiction"
    assert stated_relation("A bench.") is None


def test_every_dataset_rule_exists_and_a_dataset_without_one_reports_none():
    assert {spec.consistency for spec in DATASETS.values()} - {None} <= set(CONSISTENCY_RULES)
    assert (DATASETS["svamp"].consistency, DATASETS["cqa"].consistency, DATASETS["esnli"].consistency) == (
        "equation", "choice", "relation")
    assert consistency(None, ["x"], ["y"], ["z"]) is None
    inputs = ["Where?\nAnswer Choices:\n(a) park\n(b) math problem"] * 2
    report = rationale_report("choice", inputs, ["only park here", "a garden"], ["park", "math problem"],
                              ["only park here", "only math problem"], ["park", "math problem"])
    assert report == {"rouge_l": pytest.approx((1.0 + 0.0) / 2), "consistency": 0.5, "teacher_consistency": 1.0,
                      "consistency_rule": "choice", "rows": 2}


# ---- the flag ----


@pytest.mark.parametrize("extra", [["--llm", "none", "--model_type", "standard"], ["--model_type", "standard"]])
def test_eval_rationales_needs_rationales_to_score(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--dataset", "cqa", "--eval_rationales", *extra])
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run.py: error:") or
              "error:" in line]
    assert "--eval_rationales scores a task_prefix student's rationales" in line


def test_eval_rationales_is_off_by_default_and_keeps_the_folder_name():
    plain = run.parse_args(["--dataset", "cqa"])
    evaluated = run.parse_args(["--dataset", "cqa", "--eval_rationales"])
    assert not plain.training.eval_rationales and evaluated.training.eval_rationales
    assert plain.config_dir(1) == evaluated.config_dir(1)
    assert RunConfig.from_flags(evaluated.flags()) == evaluated


# ---- tiny real runs ----


def tiny_run(student: Path, data_dir: Path, out: Path, dataset: str, *extra: str) -> dict:
    argv = ["--dataset", dataset, "--from_pretrained", str(student), "--data_dir", str(data_dir), "--output_dir",
            str(out), "--batch_size", "4", "--max_steps", "2", "--eval_steps", "2", "--gen_max_len", "4",
            "--max_input_length", "64", "--no_log", *extra]
    assert run.main(argv) == 0
    [path] = list(out.glob("ckpts/**/results.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("dataset", ["cqa", "svamp"])
def test_a_run_with_eval_rationales_reports_rouge_and_consistency(tiny_t5, fake_data_dir, tmp_path, capsys,
                                                                  dataset):
    record = tiny_run(tiny_t5, fake_data_dir, tmp_path / "out", dataset, "--eval_rationales")
    report = record["rationale_eval"]
    rows = {"cqa": 6, "svamp": 5}[dataset]
    assert report["rows"] == rows and report["consistency_rule"] == DATASETS[dataset].consistency
    assert 0.0 <= report["rouge_l"] <= 1.0 and 0.0 <= report["consistency"] <= 1.0
    # The fake teacher's rationales name its answer (cqa); svamp's hold no expression, and end in "2 rounds", which
    # is its answer's value on row 2 of 5 alone ((4 / 2)).
    assert report["teacher_consistency"] == {"cqa": 1.0, "svamp": 0.2}[dataset]
    assert report["label_accuracy"] == record["selected_test_accuracy"], "the same labels as the selected evaluation"
    assert record["config"]["eval_rationales"] is True
    assert "student rationales on" in capsys.readouterr().err


def test_without_the_flag_the_record_has_no_report(tiny_t5, fake_data_dir, tmp_path):
    record = tiny_run(tiny_t5, fake_data_dir, tmp_path / "out", "cqa")
    assert "rationale_eval" not in record and record["config"]["eval_rationales"] is False


def test_a_decoder_only_student_reports_too(tiny_students, fake_data_dir, tmp_path):
    record = tiny_run(tiny_students["gpt2"], fake_data_dir, tmp_path / "out", "cqa", "--eval_rationales")
    assert record["rationale_eval"]["rows"] == 6 and record["student"]["family"] == "causal"
    assert 0.0 <= record["rationale_eval"]["rouge_l"] <= 1.0


# ---- in summaries ----


def write_run(root: Path, name: str, accuracy: float, extra: dict, **config) -> None:
    """A results.json as summarize.py reads it, with the record's extra figures (rationale_eval, teacher_budget)."""
    config = {"dataset": "cqa", "from_pretrained": "t5-small", "model_type": "task_prefix", "label_type": "gt",
              "llm": "t1", "alpha": 0.5, "subsample": 1.0, "run": 0, "lr": 5e-5, "select_on": "test", **config}
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": config, "selected_test_accuracy": accuracy, **extra}))


def test_summaries_show_rationale_figures_and_plot_accuracy_against_teacher_budget(tmp_path, capsys):
    import csv

    import summarize

    runs = tmp_path / "runs"
    for seed, (rouge, agree) in enumerate([(0.4, 0.5), (0.6, 0.7)]):
        report = {"rationale_eval": {"rouge_l": rouge, "consistency": agree, "rows": 6}}
        budget = {"teacher_budget": {"tokens": 1000.0, "cost": 0.01}}
        write_run(runs, f"dss-{seed}", 0.5 + seed / 10, report | budget, run=seed, subsample=0.5)
    write_run(runs, "dss-full", 0.8, {"teacher_budget": {"tokens": 2000.0, "cost": 0.02}})
    write_run(runs, "ft", 0.3, {}, model_type="standard", llm="none")
    assert summarize.main([str(runs), "--out", str(tmp_path / "tokens")]) == 0
    markdown = (tmp_path / "tokens" / "summary.md").read_text()
    assert "| dss_gt [t1] | 50.00 / 60.00 (n=2) | – |" in markdown
    assert markdown.count("| standard_finetune |") == 1, "in the accuracy table, not in the rationale table"
    assert (tmp_path / "tokens" / "cqa_budget_tokens.png").is_file()
    rows = {(r["method"], r["fraction"]): r for r in csv.DictReader(open(tmp_path / "tokens" / "summary.csv"))}
    half = rows["dss_gt [t1]", "0.5"]
    assert (float(half["rouge_l"]), float(half["consistency"]), float(half["teacher_tokens"])) == (0.5, 0.6, 1000.0)
    assert rows["dss_gt [t1]", "1.0"]["rouge_l"] == "" and rows["standard_finetune", "1.0"]["teacher_tokens"] == ""

    assert summarize.main([str(runs), "--out", str(tmp_path / "cost"), "--budget_axis", "cost"]) == 0
    assert (tmp_path / "cost" / "cqa_budget_cost.png").is_file()
    capsys.readouterr()

    # Runs without either figure: no rationale table and no budget plot.
    plain = tmp_path / "plain"
    write_run(plain, "ft", 0.3, {}, model_type="standard", llm="none")
    assert summarize.main([str(plain)]) == 0
    assert "Student rationales" not in (plain / "summary.md").read_text()
    assert not list(plain.glob("*_budget_*.png"))


def test_a_sweep_evaluates_the_rationales_of_its_task_prefix_runs_only():
    import sweep

    args, passthrough = sweep.parse_args(["--dataset", "cqa", "--seeds", "0", "--fractions", "0.5",
                                          "--eval_rationales", "--max_steps", "2"])
    argvs = {tuple(argv[argv.index("--model_type") + 1 : argv.index("--model_type") + 4]): argv
             for argv in sweep.run_argvs(args, passthrough)}
    for (model_type, _, label_type), argv in argvs.items():
        assert ("--eval_rationales" in argv) == (model_type == "task_prefix"), (model_type, label_type)
        assert "--max_steps" in argv
        run.parse_args(argv)  # every run's flags are accepted


def test_eval_rationales_may_be_added_when_resuming(tmp_path):
    from recovery import RUN_ARGS, RunError, check_same_run, record_run_args

    started = run.parse_args(["--dataset", "cqa"]).flags()
    record_run_args(started, tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    check_same_run(run.parse_args(["--dataset", "cqa", "--eval_rationales"]).flags(), tmp_path)
    assert "eval_rationales" not in json.loads((tmp_path / RUN_ARGS).read_text()), "a resumable flag"
    with pytest.raises(RunError, match="--alpha 0.5 -> 0.7"):  # a flag that changes training still may not
        check_same_run(run.parse_args(["--dataset", "cqa", "--alpha", "0.7"]).flags(), tmp_path)
