"""Past one device: launched data-parallel runs (torchrun, accelerate launch) on CPU with gloo, the effective batch
they record, and the one-line refusals of --parallelize, --deepspeed and FSDP where they cannot run."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_cli import run_cli

TWO_PROCESS_FLAGS = ["--dataset", "svamp", "--max_steps", "2", "--eval_steps", "1", "--batch_size", "4",
                     "--eval_batch_size", "24", "--gen_max_len", "4", "--no_log", "--max_input_length", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], tiny_t5: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*launcher, str(ROOT / "run.py"), "--from_pretrained", str(tiny_t5), "--data_dir", str(data),
           "--output_dir", str(out), *TWO_PROCESS_FLAGS, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env={**env, "OMP_NUM_THREADS": "1"},
                          timeout=300)


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_port", str(free_port())]


def greedy_labels(model_dir: Path, inputs: list[str], batch_size: int) -> list[str]:
    """What the saved model predicts for these inputs, batched as evaluation batched them."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    labels = []
    for start in range(0, len(inputs), batch_size):
        batch = tokenizer([f"predict: {text}" for text in inputs[start : start + batch_size]], max_length=64,
                          truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=3, num_beams=1, do_sample=False)  # --gen_max_len 4
        labels += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return labels


@pytest.mark.slow
def test_torchrun_two_processes_evaluate_each_test_row_once(tiny_t5, shared_data, tmp_path):
    from data_utils import load_data

    out = tmp_path / "out"
    proc = launch(torchrun(), tiny_t5, shared_data, out, "--label_type", "llm", "--output_rationale")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Summary lines come from the main process only.
    assert proc.stdout.count("LLM Test Acc:") == 1 and proc.stdout.count("best test accuracy") == 1
    [results] = list(out.glob("ckpts/**/results.json"))
    record = json.loads(results.read_text())
    assert record["world_size"] == 2 and record["effective_batch_size"] == 4 * 1 * 2
    assert record["config_dir"] == f"svamp/{tiny_t5.name}/task_prefix/palm/1.0/llm/0.5/64/8/AdamW/5e-05"
    assert [e["step"] for e in record["evaluations"]] == [1, 2]
    run_dir = results.parent
    # One set of checkpoints, written together (each process adds its RNG state); at the end the trainer keeps
    # only the selected one (--save_total_limit 1).
    [checkpoint] = list(out.glob("ckpts/**/checkpoint-*"))
    assert checkpoint == run_dir / f"checkpoint-{record['selection']['step']}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    # 200 test rows over 2 processes in batches of 24 (9 batches): the last round is filled up with copies of
    # rows, which must reach neither the accuracy nor the records.
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test_inputs = list(load_data("svamp", shared_data, llm="palm")["test"]["input"])
    assert len(rows) == len(test_inputs) == 200
    assert Counter(row["input"] for row in rows) == Counter(test_inputs)
    # Each prediction sits beside its own input: the selected (best) model, run here in one process, agrees.
    regenerated = greedy_labels(run_dir / "best", [row["input"] for row in rows], batch_size=24)
    assert len(set(regenerated)) > 1, "predictions must differ between rows for this check to mean anything"
    assert [row["pred_label"] for row in rows] == regenerated
    # The per-example file puts the gathered rows back in split order, each prediction with its own row.
    kept = [json.loads(line) for line in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in kept] == list(range(200))
    predicted = {row["input"]: row["pred_label"] for row in rows}
    assert [row["prediction"] for row in kept] == [predicted[text] for text in test_inputs]


@pytest.mark.slow
def test_accelerate_launch_two_processes_and_refusals_on_every_rank(tiny_t5, shared_data, tmp_path):
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = launch(launcher, tiny_t5, shared_data, out, "--model_type", "standard", "--llm", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = list(out.glob("ckpts/**/results.json"))
    record = json.loads(results.read_text())
    assert record["world_size"] == 2 and "/64/8/AdamW/" in record["config_dir"]
    before = results.read_bytes()
    # Every process gives the same refusal and exits, rather than one waiting for the other forever.
    proc = launch(torchrun(), tiny_t5, shared_data, out, "--model_type", "standard", "--llm", "none")
    assert proc.returncode != 0
    assert proc.stderr.count("error: results already exist in") == 2
    assert results.read_bytes() == before
    # Several processes never fetch the data at once.
    proc = launch(torchrun(), tiny_t5, tmp_path / "no-data", out, "--model_type", "standard", "--llm", "none")
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: data folder {tmp_path / 'no-data'} not found") == 2


@pytest.mark.parametrize(
    "env, parallelize, gpus, expected",
    [
        ({}, False, 0, 1),  # CPU
        ({}, False, 4, 4),  # one process on 4 GPUs: the Trainer's nn.DataParallel
        ({}, True, 4, 1),  # --parallelize: one model across the 4 GPUs
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "8"}, False, 8, 8),  # torchrun / accelerate launch
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, False, 4, 1),
    ],
)
def test_effective_batch_counts_every_model_copy(env, parallelize, gpus, expected, monkeypatch):
    import train_utils
    from config import TrainingConfig

    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    training = TrainingConfig(batch_size=8, grad_steps=2)
    assert training.effective_batch_size(train_utils.data_parallel_size(parallelize)) == 8 * 2 * expected


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="--parallelize runs here")
def test_parallelize_without_two_gpus_is_one_line_before_any_loading(tiny_t5, tmp_path, capsys):
    # The data folder does not exist: the GPU check comes first.
    status, err = run_cli(["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--parallelize",
                           "--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path)], capsys)
    assert status == 1
    assert err == f"error: --parallelize needs at least two visible GPUs; {torch.cuda.device_count()} found\n"


def test_parallelize_under_a_launcher_is_refused(tiny_t5, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = run_cli(["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--parallelize",
                           "--output_dir", str(tmp_path)], capsys)
    assert status == 1 and "--parallelize splits one model over all GPUs from a single process" in err


def test_deepspeed_flag_checks_file_then_package(tiny_t5, tmp_path, capsys):
    base = ["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--output_dir", str(tmp_path)]
    status, err = run_cli([*base, "--deepspeed", str(tmp_path / "none.json")], capsys)
    assert status == 2 and "--deepspeed" in err and "no such file" in err
    status, err = run_cli([*base, "--deepspeed", str(ROOT / "configs" / "ds_zero3.json"), "--parallelize"], capsys)
    assert status == 2 and "choose one" in err
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        status, err = run_cli([*base, "--deepspeed", str(ROOT / "configs" / "ds_zero3.json")], capsys)
        assert status == 1
        assert err == "error: --deepspeed needs the deepspeed package, which is not installed: pip install deepspeed\n"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs here")
def test_fsdp_config_without_gpus_is_refused_not_silently_unsharded(tiny_t5, shared_data, tmp_path, capsys,
                                                                     monkeypatch):
    # What `accelerate launch --config_file configs/fsdp_t5_xxl.yaml` sets; accelerate only shards on GPUs.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "T5Block")
    status, err = run_cli(["--from_pretrained", str(tiny_t5), "--data_dir", str(shared_data), "--output_dir",
                           str(tmp_path), *TWO_PROCESS_FLAGS, "--model_type", "standard", "--llm", "none"], capsys)
    assert status == 1 and "asks for FSDP, which accelerate runs only on GPUs" in err
    assert not list(tmp_path.glob("ckpts/**/checkpoint-*"))


def test_shipped_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("fsdp_t5_xxl.yaml", "fsdp_multinode.yaml"):
        config = load_config_from_file(str(ROOT / "configs" / name))
        assert config.distributed_type == "FSDP"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "T5Block"
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert config.mixed_precision == "bf16"
    zero3 = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["train_micro_batch_size_per_gpu"] == zero3["gradient_accumulation_steps"] == "auto"
