"""bench/bench.py in a small configuration on the real data, so that it cannot rot: fields, and the loss check."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"  # developer tools, run as scripts; imported here from their folder
sys.path.insert(0, str(BENCH))

TRAIN_FIELDS = {"examples_per_s", "tokens_per_s", "median_step_s", "cpu_s_per_step", "model_flops_per_step",
                "padded_flops_per_step", "achieved_flops_per_s", "fraction_of_matmul_peak", "peak_memory_bytes"}


@pytest.mark.slow
def test_bench_small_configuration(tiny_t5, shared_data, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--from_pretrained", str(tiny_t5), "--data_dir", str(shared_data),
           "--dataset", "svamp", "--mode", "both", "--batch_size", "4", "--max_input_length", "64", "--steps", "2",
           "--warmup", "1", "--rounds", "2", "--eval", "--eval_rows", "16", "--eval_reference", "--gen_max_len", "4",
           "--process_memory",
           "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["machine"]["matmul_flops_per_s"] > 0
    assert report["config"]["parameters"] > 0
    assert set(report["modes"]) == {"task_prefix", "standard"}
    for mode, result in report["modes"].items():
        loss = result["step0_loss"]
        assert abs(loss["optimized"] - loss["two_pass"]) <= 1e-5 * abs(loss["two_pass"]), (mode, loss)
        assert loss["equal"] and loss["grad_rel_diff"] < 1e-4
        for path in ("optimized", "two_pass"):
            train = result["train"][path]
            assert TRAIN_FIELDS <= set(train), set(train)
            assert train["examples_per_s"] > 0 and train["peak_memory_bytes"] > 0
            assert train["model_flops_per_step"] <= train["padded_flops_per_step"]
        assert len(result["rounds"]) == 2 and result["train"]["speedup"] > 0
        for path in ("optimized", "two_pass"):
            assert result["eval"][path]["rows"] == 16 and result["eval"][path]["rows_per_s"] > 0
        process = result["process_memory"]
        assert 0 < process["import_rss_bytes"] < process["run_py_peak_rss_bytes"]
        assert process["working_bytes"] == process["run_py_peak_rss_bytes"] - process["import_rss_bytes"]
    assert "speed-up" in proc.stdout and "step-0 loss" in proc.stdout


def test_flops_formula_counts_what_a_hand_count_gives():
    from types import SimpleNamespace

    from bench import forward_flops

    config = SimpleNamespace(d_model=4, d_ff=8, num_heads=2, d_kv=2, vocab_size=10, num_layers=1,
                             num_decoder_layers=1, is_gated_act=True)
    # encoder: 3 tokens x (q,k,v,o: 4 * 2*4*4 = 128; wi_0, wi_1, wo: 3 * 2*4*8 = 192) + scores and sums 2 * 2*3*3*4
    encoder = 3 * (128 + 192) + 2 * 2 * 3 * 3 * 4
    # decoder: 2 tokens x (self q,k,v,o 128; cross q,o 64; FF 192) + cross k,v over 3 inputs (3 * 64)
    # + self scores/sums 2 * 2*2*2*4 + cross scores/sums 2 * 2*2*3*4
    decoder = 2 * (128 + 64 + 192) + 3 * 64 + 2 * 2 * 2 * 2 * 4 + 2 * 2 * 2 * 3 * 4
    head = 2 * 2 * 4 * 10
    assert forward_flops(config, 3, 2) == encoder + decoder + head


def test_bench_decoder_only_configuration(shared_data, tmp_path):
    import pytest

    from conftest import SHARED_TOKENIZER

    if not (SHARED_TOKENIZER / "spiece.model").is_file():
        pytest.skip(f"public T5 vocabulary not found at {SHARED_TOKENIZER}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--random_causal", "tiny", "--causal_layers", "1", "--data_dir",
           str(shared_data), "--tokenizer", str(SHARED_TOKENIZER), "--batch_size", "2", "--max_input_length", "64",
           "--steps", "1", "--warmup", "1", "--rounds", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"]["vocab_size"] == 151936
    loss = report["step0_loss"]
    assert loss["equal"] and abs(loss["optimized"] - loss["two_pass"]) <= 1e-5 * abs(loss["two_pass"])
    rows = report["logit_rows_per_step"]
    assert 0 < rows["optimized"] < rows["two_pass"], "the fused path computes logits at target positions only"
    for path in ("optimized", "two_pass"):
        assert report["train"][path]["examples_per_s"] > 0 and report["train"][path]["peak_memory_bytes"] > 0
    assert "speed-up" in proc.stdout


@pytest.mark.slow
def test_side_by_side_driver_against_itself(tiny_t5, shared_data, tmp_path):
    """bench/bench_original.py with the project on both sides (CI has no original): each side's long-lived process
    runs its blocks of steps in turn, the probe times them from inside, and the summary pairs each round's blocks."""
    out = tmp_path / "sbs.json"
    cmd = [sys.executable, str(BENCH / "bench_original.py"), "--sides", "project", "project-without=all",
           "--from_pretrained", str(tiny_t5), "--data_dir", str(shared_data), "--dataset", "svamp",
           "--modes", "standard", "--rounds", "2", "--block", "2", "--warmup", "1", "--threads", "1",
           "--batch_size", "4", "--max_input_length", "64", "--gen_max_len", "4",
           "--eval", "--eval_modes", "standard", "--eval_rows", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]["train"]["standard"]
    for side in ("project", "project-without=all"):
        record = runs[side]
        assert len(record["steps"]) == 1 + 2 * 2 and record["exit_code"] == 0
        assert len(record["resumes"]) == 2 and len(record["blocks"]) == 2, "stopped after warm-up and one block"
        assert record["resumes"][0][0] > record["steps"][0][0] and record["resumes"][1][0] > record["steps"][2][0]
        assert 0 < record["import_rss_bytes"] < record["peak_rss_bytes"]
        assert 0 < record["first_step_begin"][0] < record["steps"][0][0]
    ratio = report["summary"]["train"]["standard"]["ratios"]["project-without=all"]["wall"]
    expected = [a[0] / b[0] for a, b in zip(runs["project"]["blocks"], runs["project-without=all"]["blocks"])]
    assert ratio["values"] == expected and ratio["min"] <= ratio["median"] <= ratio["max"]
    flops = report["summary"]["train"]["standard"]["step_flops"]
    assert flops > 0 and all(rate > 0 for rate in report["summary"]["matmul_flops_per_s"])
    achieved = report["summary"]["train"]["standard"]["sides"]["project"]["achieved_flops_per_s"]
    assert achieved == pytest.approx(flops / statistics.median(wall for wall, _ in runs["project"]["blocks"]))
    [evaluation] = report["runs"]["eval"]["standard"]["project"]
    assert len(evaluation["steps"]) == 1 and evaluation["evaluations"][0][0] > 0 and not evaluation["resumes"]
    assert "| standard | project-without=all |" in proc.stdout


def test_block_step_times_start_at_each_resume_and_skip_the_warmup():
    from bench_original import block_step_seconds

    record = {"steps": [[1.0, 2.0], [5.0, 9.0], [6.0, 11.0], [7.5, 14.0], [20.0, 30.0], [20.5, 31.0]],
              "resumes": [[4.0, 8.0], [19.0, 28.0]]}
    # block 1: resume 4.0, then 5.0, 6.0, 7.5 (intervals 1, 1, 1.5); block 2: 19.0, 20.0, 20.5 (1, 0.5), warm-up 1
    assert block_step_seconds(record, warmup=1, block=3) == [(1.0, 2.0), (0.75, 1.5)]


def test_probe_times_outermost_evaluations_and_cuts_their_rows():
    """As transformers 4.30 calls it (one evaluate per split, the set passed in) and as 5 does (the trainer's own
    dict, evaluate calling itself per split): each outermost call is timed once, on the first rows only."""
    import time

    from datasets import Dataset

    from bench_probe import timed_outermost

    seen = []

    class Trainer:
        eval_dataset = {"test": Dataset.from_dict({"x": list(range(5))})}

        def evaluate(self, eval_dataset=None):
            if eval_dataset is None:
                return [self.evaluate(eval_dataset=split) for split in self.eval_dataset.values()]
            seen.append(eval_dataset["x"])

    timings = []
    timed_outermost(Trainer, "evaluate", (time.perf_counter(), time.process_time()), timings, eval_rows=2)
    Trainer().evaluate(eval_dataset=Dataset.from_dict({"x": [7, 8, 9]}))
    Trainer().evaluate()
    assert seen == [[7, 8], [0, 1]] and len(timings) == 2 and all(wall >= 0 for wall, _ in timings)


def test_make_esnli_writes_the_paper_layout_with_unique_rows(shared_data, tmp_path):
    """bench/make_esnli.py: 100 train chunks of 5,500 teacher outputs (empty past the rows asked for), premises made
    unique, and the project's loader reads every row with its recycled teacher output."""
    import make_esnli

    from data_utils import DATASETS, load_data, parse_esnli

    rows = 10000  # past the 9,842 shipped valid rows, so that some are recycled
    folder = make_esnli.make(shared_data, rows, tmp_path / "data") / "esnli"
    chunks = [json.loads((folder / "llm" / f"train_CoT_{i}.json").read_text()) for i in range(100)]
    assert [len(c) for c in chunks[:3]] == [5500, 4500, 0] and not any(chunks[3:])
    train = [json.loads(line) for line in (folder / "esnli_train.json").read_text().splitlines()]
    assert len(train) == rows and len({row["premise"] for row in train}) == rows
    shipped = [json.loads(line) for line in (shared_data / "esnli" / "esnli_valid.json").read_text().splitlines()]
    assert train[len(shipped)]["premise"] == f"{shipped[0]['premise']} ({len(shipped)})"
    splits = load_data("esnli", tmp_path / "data")
    assert len(splits["train"]) == rows and DATASETS["esnli"].chunk_size == make_esnli.CHUNK_ROWS
    assert splits["train"][9900]["llm_rationale"] == parse_esnli(chunks[1][4400])[0]
    assert chunks[1][4400] == json.loads((shared_data / "esnli" / "llm" / "valid_CoT_0.json").read_text())[58]
    with pytest.raises(SystemExit, match="--rows 550001"):
        make_esnli.make(shared_data, 550001, tmp_path / "too-many")


def test_make_long_lengthens_only_the_questions(shared_data, tmp_path):
    """bench/make_long.py: cqa as shipped but for questions repeated to about --tokens tokens; the loader reads it."""
    import make_long

    from data_utils import load_data

    make_long.make(shared_data, 300, tmp_path / "data")
    shipped = load_data("cqa", shared_data, fixed_valid=True)
    long = load_data("cqa", tmp_path / "data", fixed_valid=True)
    for name in ("train", "valid", "test"):
        assert long[name]["llm_rationale"] == shipped[name]["llm_rationale"]
        assert long[name]["label"] == shipped[name]["label"]
    short, longer = shipped["test"]["input"][0], long["test"]["input"][0]
    question = short.split("\nAnswer Choices:")[0]
    assert longer.split("\nAnswer Choices:")[1] == short.split("\nAnswer Choices:")[1], "choices unchanged"
    assert longer.startswith(f"{question} {question} ") and len(longer) >= 300 * make_long.CHARACTERS_PER_TOKEN


@pytest.mark.slow
def test_startup_driver_times_a_first_run_and_a_cached_rerun(tiny_t5, shared_data, tmp_path):
    """bench/bench_startup.py on the project side alone (CI has no original): each run ends as its first step begins,
    and the rerun reads the first run's tokenised splits (no datasets map) instead of tokenising."""
    out = tmp_path / "startup.json"
    cmd = [sys.executable, str(BENCH / "bench_startup.py"), "--sides", "project", "--source", str(shared_data),
           "--rows", "40", "--data_root", str(tmp_path / "data"), "--from_pretrained", str(tiny_t5),
           "--max_input_length", "64", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    [first], [rerun] = (report["runs"]["40"]["project"][run] for run in ("first", "rerun"))
    for run in (first, rerun):
        assert run["seconds"] > 0 and 0 < run["import_rss_bytes"] < run["peak_rss_bytes"]
    assert first["map_s"] > 0 and rerun["map_s"] == 0
    assert report["summary"]["40"]["rerun"]["project"]["seconds"] == rerun["seconds"]
    assert "| 40 | rerun |" in proc.stdout
