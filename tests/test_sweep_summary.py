"""sweep.py's grid, skipping and failure handling; summarize.py's tables and plots, on synthetic and real runs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

import summarize
import sweep
from conftest import ROOT


def write_result(root: Path, name: str, accuracy: float | None, **config) -> Path:
    """A results.json as train_utils.write_records writes it, reduced to the fields summarize.py reads."""
    config = {
        "dataset": "cqa", "from_pretrained": "t5-small", "model_type": "task_prefix", "label_type": "llm",
        "llm": "palm", "alpha": 0.5, "subsample": 1.0, "run": 0, "lr": 5e-5, "select_on": "test", **config,
    }
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": config, "selected_test_accuracy": accuracy, "best_test_accuracy": accuracy,
                                "selection": {"select_on": config["select_on"]}}))
    return path


FINETUNE = {"model_type": "standard", "label_type": "gt", "llm": "none"}


def test_summary_averages_seeds_only(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, accuracy in enumerate([0.5, 0.6, 0.7]):
        write_result(runs, f"ft-{seed}", accuracy, run=seed, subsample=0.25, **FINETUNE)
    write_result(runs, "ft-other-alpha", 0.6, run=3, subsample=0.25, alpha=0.2, **FINETUNE)  # alpha: no effect
    write_result(runs, "dss-a", 0.8, run=0)
    write_result(runs, "dss-b", 0.9, run=1)
    write_result(runs, "dss-alpha", 0.1, run=0, alpha=0.2)
    write_result(runs, "dss-gpt", 0.3, run=0, llm="gpt")
    write_result(runs, "dss-lr", 0.2, run=0, lr=1e-3)
    write_result(runs, "dss-unevaluated", None, run=2)
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    before = {p: p.read_bytes() for p in runs.rglob("results.json")}

    out = tmp_path / "summary"
    assert summarize.main([str(runs), "--out", str(out)]) == 0
    printed, notes = capsys.readouterr()
    markdown = (out / "summary.md").read_text()
    assert printed == markdown
    assert "## cqa, t5-small (lr=5e-05)" in markdown and "## cqa, t5-small (lr=0.001)" in markdown
    assert "| standard_finetune | 60.00 ± 8.16 (n=4) | – |" in markdown
    assert "| dss_llm | – | 85.00 ± 7.07 (n=2) |" in markdown
    assert "| dss_llm [gpt] | – | 30.00 (n=1) |" in markdown
    assert "| dss_llm | 20.00 (n=1) |" in markdown
    assert "broken" in notes and "dss-unevaluated" in notes

    rows = list(csv.DictReader(open(out / "summary.csv")))
    cell = next(r for r in rows if r["method"] == "dss_llm" and r["setting"] == "lr=5e-05")
    assert (cell["n"], cell["seeds"], cell["alpha"]) == ("2", "0 1", "0.5")
    assert float(cell["mean"]) == pytest.approx(0.85) and float(cell["std"]) == pytest.approx(0.0707107, abs=1e-6)

    assert (out / "cqa_lr=5e-05_fraction.png").is_file() and (out / "cqa_lr=5e-05_alpha.png").is_file()
    assert not (out / "cqa_lr=0.001_alpha.png").exists() and "no alpha plot" in notes
    assert {p: p.read_bytes() for p in runs.rglob("results.json")} == before

    assert summarize.main([str(runs), "--out", str(tmp_path / "at-0.2"), "--alpha", "0.2"]) == 0
    assert "| dss_llm | – | 10.00 (n=1) |" in (tmp_path / "at-0.2" / "summary.md").read_text()


def test_summary_of_a_folder_without_runs_fails(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_summary_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_result(runs, "dss-a", 0.8, run=0)
    users_file = tmp_path / "notes.txt"
    users_file.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([str(runs), "--out", str(users_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"--out {users_file} is a file, not a folder; it is left as it is: pass a folder" in err
    assert users_file.read_text() == "mine"

    below_a_file = users_file / "summary"
    assert summarize.main([str(runs), "--out", str(below_a_file)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot write into --out {below_a_file} (") and "pass a folder you can" in line
    assert users_file.read_text() == "mine"


def test_grid_runs_standard_methods_once_per_seed_and_fraction():
    args, passthrough = sweep.parse_args(
        ["--dataset", "cqa", "--seeds", "0", "1", "--alphas", "0.3", "0.5", "--fractions", "0.5", "1", "--lr", "1e-4"]
    )
    argvs = sweep.run_argvs(args, passthrough)
    assert len(argvs) == 2 * 2 * (2 + 2 * 2)  # seeds x fractions x (standard methods + dss methods x alphas)
    assert all(argv[:4] == ["--dataset", "cqa", "--lr", "1e-4"] and "--resume" in argv for argv in argvs)
    assert sum("--llm" in argv for argv in argvs) == 4 and sum("--alpha" in argv for argv in argvs) == 16


@pytest.mark.parametrize("flag", ["--run", "--subsample=0.5", "--alpha", "--model_type", "--overwrite", "--sub"])
def test_grid_flags_cannot_be_passed_through(flag):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--dataset", "cqa", flag, "1"])
    assert exit_info.value.code == 2


def test_sweep_keeps_going_past_failures_and_prints_commands(tmp_path, monkeypatch, capsys, tiny_t5):
    argv = ["--dataset", "cqa", "--from_pretrained", str(tiny_t5), "--output_dir", str(tmp_path),
            "--methods", "standard_finetune", "dss_gt", "--fractions", "0.5", "1.0"]
    calls = []

    def fake_run(command):
        calls.append(command)
        return 1 if len(calls) == 1 else 0

    monkeypatch.setattr(sweep, "run_one", fake_run)
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert len(calls) == 4 and "4 ran, 0 skipped (finished), 1 failed" in out

    finished = sweep.results_path(calls[1][2:])
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")
    calls.clear()
    assert sweep.main([*argv, "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not calls and len(lines) == 3 and all("run.py" in line and "--resume" in line for line in lines)


def sweep_command(data: Path, model: Path, out: Path, seeds: tuple[str, ...] = ("0", "1")) -> list[str]:
    return [
        sys.executable, str(ROOT / "sweep.py"), "--dataset", "cqa", "--data_dir", str(data),
        "--from_pretrained", str(model), "--output_dir", str(out), "--seeds", *seeds,
        "--methods", "standard_finetune", "dss_llm", "--fractions", "0.01", "0.02",
        "--max_steps", "1", "--eval_steps", "1", "--batch_size", "4", "--gen_max_len", "2", "--no_log",
        "--max_input_length", "64", "--max_eval_samples", "64",
    ]


@pytest.mark.slow
def test_sweep_then_summary_on_real_data(shared_data, tiny_t5, tmp_path):
    """Two methods x two fractions x two seeds on the shipped data: a rerun skips every finished run, and the
    summary holds the table, the plot and the paired statistics of the two methods."""
    out, seeds = tmp_path / "sweep", ("0", "1")
    done = subprocess.run(sweep_command(shared_data, tiny_t5, out, seeds), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "8 ran, 0 skipped (finished), 0 failed" in done.stdout
    results = sorted(out.rglob("results.json"))
    assert len(results) == 8
    mtimes = [os.stat(p).st_mtime_ns for p in results]

    again = subprocess.run(sweep_command(shared_data, tiny_t5, out, seeds), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skip (finished") == 8 and "0 ran, 8 skipped (finished), 0 failed" in again.stdout
    assert [os.stat(p).st_mtime_ns for p in results] == mtimes

    summary = tmp_path / "summary"
    assert summarize.main([str(out), "--out", str(summary)]) == 0
    markdown = (summary / "summary.md").read_text()
    start = markdown.splitlines().index("| method | 1% | 2% |")  # the accuracy table; the comparisons follow it
    table = markdown.splitlines()[start : start + 4]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| standard_finetune", "| dss_llm"]
    assert all(line.count("(n=2)") == 2 for line in table[2:])
    rows = list(csv.DictReader(open(summary / "summary.csv")))
    assert {(r["method"], r["fraction"], r["n"]) for r in rows} == {
        (m, f, "2") for m in ("standard_finetune", "dss_llm") for f in ("0.01", "0.02")
    }
    # --max_eval_samples scores part of the test set: the table and files say it is a debugging run.
    assert "## cqa, tiny-t50 (debug: max_eval_samples=64)" in markdown
    image = imread(summary / "cqa_debug_max_eval_samples=64_fraction.png")
    width, height = (round(inches * summarize.DPI) for inches in summarize.FIGSIZE)
    assert image.shape[:2] == (height, width) and image[..., :3].var() > 0
    assert not list(summary.glob("*_alpha.png"))

    assert "### Test accuracy at the checkpoint chosen on test (the paper's protocol" in markdown
    lines = [line for line in markdown.splitlines() if "dss_llm − standard_finetune" in line]
    assert [line.split(" | ")[0] for line in lines] == ["| 1%", "| 2%"]
    assert all("| 2 | 64 |" in line for line in lines) and "Not paired" not in markdown
    compared = list(csv.DictReader(open(summary / "comparisons.csv")))
    assert len(compared) == 2 and all(0 <= float(r["p_rows_holm"]) <= 1 and r["p_seeds"] for r in compared)
    assert all(float(r["ci_low"]) <= float(r["difference"]) <= float(r["ci_high"]) for r in compared)
