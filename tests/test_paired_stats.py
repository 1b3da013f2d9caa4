"""Per-example test predictions (train_utils) and the paired statistics summarize.py computes from them (stats.py,
comparisons.py): hand-computed small cases, synthetic run folders, a real tiny run and a real tiny sweep."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import run
import stats
import summarize
import train_utils
from conftest import train_until_killed, write_fake_dataset
from metrics import equations_match
from test_sweep_summary import FINETUNE, write_result

# ---- stats.py against values worked out by hand ----


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    # 1 row only a gets right, 6 only b: discordant n = 7, p = 2 * P(X <= 1) = 2 * (1 + 7) / 2**7 = 0.125.
    a = np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1, 0]])
    b = np.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    assert stats.mcnemar_exact_p(a, b) == pytest.approx(0.125, rel=1e-12)
    assert stats.mcnemar_exact_p(b, a) == pytest.approx(0.125, rel=1e-12)
    # 0 against 5 discordant: 2 / 2**5.
    assert stats.mcnemar_exact_p(np.ones((1, 5)), np.zeros((1, 5))) == pytest.approx(0.0625, rel=1e-12)
    # Ties: as many discordant rows each way, or none at all, give p = 1.
    assert stats.mcnemar_exact_p(np.array([[1, 0, 1]]), np.array([[0, 1, 1]])) == 1.0
    assert stats.mcnemar_exact_p(np.array([[1, 0, 1]]), np.array([[1, 0, 1]])) == 1.0
    # Seeds are pooled: b = 2 + 1, c = 0 over two seeds -> 2 / 2**3.
    two_seeds_a, two_seeds_b = np.array([[1, 1, 0], [1, 0, 0]]), np.array([[0, 0, 0], [0, 0, 0]])
    assert stats.mcnemar_exact_p(two_seeds_a, two_seeds_b) == pytest.approx(0.25)


def test_sign_flip_enumerates_every_sign_pattern():
    # Three positive seed differences: only the all-plus and all-minus patterns are as extreme: 2 / 8.
    assert stats.sign_flip_p(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)
    # (0.2, 0.1): patterns give |mean| 0.15, 0.05, 0.05, 0.15 -> 2 of 4 reach 0.15.
    assert stats.sign_flip_p(np.array([0.2, 0.1])) == pytest.approx(0.5)
    # Ties with zero: every pattern is as extreme as an observed zero mean.
    assert stats.sign_flip_p(np.array([0.1, -0.1])) == 1.0
    assert stats.sign_flip_p(np.zeros(3)) == 1.0
    # One seed: there is no spread over seeds to test.
    assert stats.sign_flip_p(np.array([0.4])) is None


def test_holm_on_a_hand_example():
    # Sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06 (monotone).
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_bootstrap_interval_on_small_cases():
    # One seed, rows (0, 1): a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the 95% interval
    # reaches both ends.
    assert stats.bootstrap_interval(np.array([[0.0, 1.0]])) == (0.0, 1.0)
    # All-equal predictions: every difference is zero, and so is the interval.
    same = np.array([[1, 0, 1, 1], [0, 0, 1, 1]])
    assert stats.mean_difference(same, same) == 0.0
    assert stats.bootstrap_interval(same - same) == (0.0, 0.0)
    # A fixed RNG seed: the same interval every time; it holds the mean.
    rng = np.random.default_rng(3)
    differences = (rng.random((3, 200)) < 0.6).astype(float) - (rng.random((3, 200)) < 0.5)
    low, high = stats.bootstrap_interval(differences)
    assert (low, high) == stats.bootstrap_interval(differences)
    assert low < differences.mean() < high and high - low < 0.3
    # Seeds that disagree widen the interval beyond what the rows alone give.
    spread = np.array([[1.0] * 50, [0.0] * 50, [1.0] * 50])
    assert stats.bootstrap_interval(spread) == (0.0, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        stats.mean_difference(np.ones((2, 3)), np.ones((3, 3)))


# ---- summaries of synthetic run folders ----


def write_run(root: Path, name: str, correct: list[bool] | None, **config) -> Path:
    """A results.json (its accuracy the share of correct rows) and, unless correct is None, the per-example
    predictions file it names, as train_utils writes them."""
    verdicts = correct or [True, False]
    path = write_result(root, name, sum(verdicts) / len(verdicts), **config)
    if correct is not None:
        record = json.loads(path.read_text())
        record["test_predictions"] = {"file": "test_predictions.jsonl", "step": 1, "select_on": "test",
                                      "rows": len(correct)}
        path.write_text(json.dumps(record))
        lines = [json.dumps({"index": i, "prediction": "p", "reference": "r", "correct": c})
                 for i, c in enumerate(correct)]
        (path.parent / "test_predictions.jsonl").write_text("\n".join(lines) + "\n")
    return path


def table_lines(markdown: str, first_cell: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]


def test_summary_compares_methods_pairwise_and_lists_what_is_unpaired(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs, f"ft-{seed}", [True] * 20 + [False] * 20, run=seed, **FINETUNE)
        write_run(runs, f"dss-{seed}", [True] * 30 + [False] * 10, run=seed)
        write_run(runs, f"ft-half-{seed}", [True, False] * 20, run=seed, subsample=0.5, **FINETUNE)
        write_run(runs, f"dss-half-{seed}", [True, False] * 20, run=seed, subsample=0.5)
    write_run(runs, "dss-3", [True] * 40, run=3)  # a seed the baseline lacks
    write_run(runs, "ft-4", [True] * 40, run=4, **FINETUNE)
    old = write_run(runs, "dss-4", None, run=4)  # written before runs kept predictions
    out = tmp_path / "summary"
    assert summarize.main([str(runs), "--out", str(out)]) == 0
    markdown = (out / "summary.md").read_text()
    assert "### Test accuracy at the checkpoint chosen on test (the paper's protocol" in markdown
    # Each seed: 10 rows only dss gets right, none the other way: +25 points; McNemar over 30 discordant rows,
    # p = 2 / 2**30; three equal seed differences: sign-flip p = 2 / 8; the two fractions' p-values Holm-adjusted.
    [full] = table_lines(markdown, "100%")
    cells = [cell.strip() for cell in full.split("|")[1:-1]]
    assert cells[:2] == ["100%", "dss_llm − standard_finetune"] and cells[2] == "+25.00"
    low, high = (float(x) for x in cells[3].strip("[]").split(", "))
    assert 0 < low < 25 < high
    assert cells[4:6] == ["3", "40"]
    # Holm over two comparisons: the sign-flip p of 0.25 doubles; the half run's p = 1 stays 1.
    assert cells[6] == "0.5" and cells[7] == f"{2 * 2 / 2**30:.3g}*"
    [half] = table_lines(markdown, "50%")
    assert "| +0.00 | [+0.00, +0.00] | 3 | 40 | 1 | 1 |" in half
    notes = markdown[markdown.index("Not paired"):]
    assert "dss_llm at 100%, seed 3: no standard_finetune run with predictions for this seed" in notes
    assert "dss_llm at 100%, seed 4: no per-example test predictions" in notes and str(old) in notes
    assert "standard_finetune at 100%, seed 4: no dss_llm run with predictions" in notes
    # The accuracy table still counts every finished run.
    assert "| dss_llm | 50.00 ± 0.00 (n=3) | 75.00 ± 17.68 (n=5) |" in markdown
    rows = list(csv.DictReader(open(out / "comparisons.csv")))
    assert [(r["group"], r["comparison"], r["seeds"]) for r in rows] == [
        ("50%", "dss_llm − standard_finetune", "0 1 2"), ("100%", "dss_llm − standard_finetune", "0 1 2")]
    assert float(rows[1]["difference"]) == 0.25 and float(rows[1]["p_rows"]) == pytest.approx(2 / 2**30, rel=1e-5)
    assert float(rows[1]["p_seeds"]) == 0.25 and float(rows[1]["p_seeds_holm"]) == 0.5
    # The same predictions give the same table.
    assert summarize.main([str(runs), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "summary.md").read_text() == markdown
    capsys.readouterr()


def test_a_single_seed_gets_no_seed_test(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "ft", [True, True, False, False], **FINETUNE)
    write_run(runs, "dss", [True, True, True, False])
    assert summarize.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    [line] = table_lines((tmp_path / "out" / "summary.md").read_text(), "100%")
    # One discordant row: McNemar p = 2 * 1/2 = 1; no sign-flip test with one seed.
    assert line.endswith("| 1 | 4 | – | 1 |") and "| +25.00 |" in line


def test_protocols_never_share_a_table_and_can_be_shown_side_by_side(tmp_path):
    runs = tmp_path / "runs"
    for select_on, accuracy, best in (("test", 0.5, 0.5), ("valid", 0.4, 0.6)):
        path = write_run(runs, f"ft-{select_on}", [True, False], select_on=select_on, **FINETUNE)
        record = json.loads(path.read_text())
        record.update(selected_test_accuracy=accuracy, best_test_accuracy=best)
        path.write_text(json.dumps(record))
    out = tmp_path / "out"
    assert summarize.main([str(runs), "--out", str(out), "--both_protocols"]) == 0
    markdown = (out / "summary.md").read_text()
    test_section = markdown[markdown.index("(select_on=test)"):markdown.index("(select_on=valid)")]
    valid_section = markdown[markdown.index("(select_on=valid)"):]
    assert "### Test accuracy at the checkpoint chosen on test" in test_section
    assert "### Test accuracy at the checkpoint chosen on valid" in test_section and "Not available" in test_section
    chosen_on_valid = valid_section.index("chosen on valid (the test accuracy at the best-valid checkpoint)")
    chosen_on_test = valid_section.index("chosen on test (the paper's protocol")
    assert chosen_on_valid < valid_section.index("| standard_finetune | 40.00 (n=1) |") < chosen_on_test
    assert chosen_on_test < valid_section.index("| standard_finetune | 60.00 (n=1) |")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["select_on"], r["protocol"], r["mean"]) for r in rows} == {
        ("test", "test", "0.5"), ("valid", "valid", "0.4"), ("valid", "test", "0.6")}


def test_compare_two_run_groups(tmp_path, capsys):
    small, large = tmp_path / "small", tmp_path / "large"
    for seed in range(2):
        write_run(small, f"dss-{seed}", [True] * 5 + [False] * 5, run=seed)
        write_run(large, f"dss-{seed}", [True] * 9 + [False], run=seed, from_pretrained="t5-large")
    write_run(large, "ft-0", [True] * 10, **FINETUNE)
    out = tmp_path / "out"
    assert summarize.main([str(tmp_path), "--out", str(out), "--compare", str(large), str(small)]) == 0
    markdown = (out / "summary.md").read_text()
    section = markdown[markdown.index(f"## Comparison: {large} − {small}"):]
    assert "chosen on " in section and f"{large}: test" in section
    [line] = table_lines(section, "cqa, dss_llm, 100%, alpha 0.5")
    # 4 rows per seed only the large student gets right: +40 points, McNemar 2 / 2**8, sign-flip 2 / 4.
    assert line.endswith(f"| +40.00 | [+10.00, +70.00] | 2 | 10 | 0.5 | {2 / 2**8:.3g}* |"), line
    assert f"{large} at cqa, standard_finetune, 100%, seed 0: no {small} run with predictions" in section
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path), "--compare", str(small), str(small)])
    assert "--compare needs two different folders" in capsys.readouterr().err


# ---- the predictions file of real runs ----


def test_write_test_predictions_puts_rows_back_in_split_order(tmp_path):
    generated = {"pred": ["(84 / 2)", "7", "x"], "gold": ["( 84.0 / 2.0 )", "( 3.0 + 3.0 )", "( 1.0 )"]}
    path = tmp_path / "test_predictions.jsonl"
    assert train_utils.write_test_predictions(path, generated, [2, 0, 1], "equation") == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"index": 0, "prediction": "7", "reference": "( 3.0 + 3.0 )", "correct": False},
        {"index": 1, "prediction": "x", "reference": "( 1.0 )", "correct": False},
        {"index": 2, "prediction": "(84 / 2)", "reference": "( 84.0 / 2.0 )", "correct": True},
    ]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError):
        train_utils.write_test_predictions(path, generated, [0, 1], "equation")


@pytest.mark.parametrize("select_on", ["test", "valid"])
def test_a_tiny_run_keeps_its_selected_predictions(tiny_t5, tmp_path, capsys, select_on):
    data = tmp_path / "datasets"
    # Inputs of different lengths (two-digit numbers from row 8), so evaluation's longest-first order is not the
    # split's.
    write_fake_dataset(data, "svamp", {"train": 30, "test": 12})
    argv = ["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(data), "--output_dir",
            str(tmp_path / "out"), "--model_type", "standard", "--llm", "none", "--batch_size", "4", "--max_steps",
            "2", "--eval_steps", "1", "--gen_max_len", "6", "--no_log", "--select_on", select_on]
    assert run.main(argv) == 0, capsys.readouterr().err
    [results] = (tmp_path / "out").glob("ckpts/**/results.json")
    record = json.loads(results.read_text())
    assert record["test_predictions"] == {"file": "test_predictions.jsonl", "step": record["selection"]["step"],
                                          "select_on": select_on, "rows": 12}
    rows = [json.loads(line) for line in (results.parent / "test_predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(12))
    assert [row["reference"] for row in rows] == [f"( {i + 2}.0 / 2.0 )" for i in range(12)]
    assert all(row["correct"] == equations_match(row["prediction"], row["reference"]) for row in rows)
    assert sum(row["correct"] for row in rows) / 12 == record["selected_test_accuracy"]


def test_a_run_resumed_past_its_selected_evaluation_still_keeps_its_predictions(tiny_t5, tmp_path):
    data = tmp_path / "datasets"
    write_fake_dataset(data, "svamp", {"train": 30, "test": 12})

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(data), "--output_dir",
                str(out), "--model_type", "standard", "--llm", "none", "--batch_size", "4", "--max_steps", "4",
                "--eval_steps", "1", "--gen_max_len", "6", "--no_log", "--save_total_limit", "1", *extra]

    def predictions(out: Path) -> tuple[dict, str]:
        [results] = out.glob("ckpts/**/results.json")
        return json.loads(results.read_text()), (results.parent / "test_predictions.jsonl").read_text()

    assert run.main(argv(tmp_path / "whole")) == 0
    whole, whole_predictions = predictions(tmp_path / "whole")
    train_until_killed(argv(tmp_path / "killed"), lambda step: step == whole["selection"]["step"] + 2)
    assert run.main(argv(tmp_path / "killed", "--resume")) == 0
    resumed, resumed_predictions = predictions(tmp_path / "killed")
    assert resumed["resumed"] and resumed["selection"] == whole["selection"]
    assert resumed["test_predictions"] == whole["test_predictions"] and resumed_predictions == whole_predictions
