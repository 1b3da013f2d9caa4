"""Bad input gets one clear line and a non-zero exit, never a traceback; earlier results are never touched."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import run
from conftest import ROOT


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = run.main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--dataset", "cqa", "--model_type", "big"], "--model_type: invalid choice"),
        (["--dataset", "cqa", "--label_type", "silver"], "--label_type: invalid choice"),
        (["--dataset", "cqa", "--alpha", "1.5"], "--alpha: must be within [0, 1]"),
        (["--dataset", "cqa", "--alpha", "-0.1"], "--alpha: must be within [0, 1]"),
        (["--dataset", "cqa", "--batch_size", "0"], "--batch_size: must be a positive integer"),
        (["--dataset", "cqa", "--max_steps", "-5"], "--max_steps: must be a positive integer"),
        (["--dataset", "cqa", "--eval_steps", "0"], "--eval_steps: must be a positive integer"),
        (["--dataset", "cqa", "--grad_steps", "0"], "--grad_steps: must be a positive integer"),
        (["--dataset", "cqa", "--lr", "0"], "--lr: must be positive"),
        (["--dataset", "cqa", "--subsample", "0"], "--subsample: must be within (0, 1]"),
        (["--dataset", "cqa", "--label_type", "llm", "--llm", "none", "--model_type", "standard"],
         "--label_type llm needs teacher labels"),
        (["--dataset", "cqa", "--llm", "none"], "--model_type task_prefix needs teacher rationales"),
        (["--dataset", "cqa", "--from_pretrained", "./no/such/dir"], "neither a readable directory nor a hub id"),
        (["--dataset", "cqa", "--llm", "../etc"], "--llm '../etc'"),
        (["--dataset", "cqa", "--resume", "--overwrite"], "--resume and --overwrite contradict"),
    ],
)
def test_invalid_flags(flags, message, capsys):
    status, err = run_cli(flags, capsys)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_data_folder_says_how_to_get_it(tiny_t5, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status, err = run_cli(["--dataset", "cqa", "--from_pretrained", str(tiny_t5), "--data_dir", str(tmp_path / "none"),
                           "--output_dir", str(tmp_path)], capsys)
    assert status == 1
    assert f"data folder {tmp_path / 'none'} not found" in err and "datasets.zip" in err and "--download" in err


def test_unreachable_hub_id_is_one_line(fake_data_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    status, err = run_cli(["--dataset", "cqa", "--from_pretrained", "nobody/no-such-model-xyz",
                           "--data_dir", str(fake_data_dir), "--output_dir", str(tmp_path)], capsys)
    assert status == 1
    assert "could not load --from_pretrained 'nobody/no-such-model-xyz'" in err


def test_the_configuration_holds_every_flag_as_parsed():
    from config import RunConfig

    config = run.parse_args(["--dataset", "svamp", "--run", "3", "--lora_r", "4", "--lora_targets", "q", "v",
                             "--no_log", "--select_on", "valid", "--eval_batch_size", "5"])
    flags = config.flags()
    assert RunConfig.from_flags(flags) == config
    assert flags["run"] == config.training.seed == 3 and config.student.lora.targets == ("q", "v")
    assert flags["lora_targets"] == ["q", "v"] and flags["report_to"] == ["none"] and flags["eval_batch_size"] == 5
    assert json.loads(json.dumps(flags)) == flags, "results.json and run_args.json give back what was recorded"
    assert config.config_dir(data_parallel=2).startswith("svamp/t5-v1_1-base/task_prefix/palm/1.0/gt/0.5/1024/128/")
    with pytest.raises(ValueError, match="flags without a place in RunConfig: no_such_flag"):
        RunConfig.from_flags({**flags, "no_such_flag": 1})


def test_optimizer_choices_match_the_trainer():
    from config import OPTIMIZER_NAMES
    from train_utils import OPTIMIZERS

    assert set(OPTIMIZER_NAMES) == set(OPTIMIZERS)


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--dataset", "cqa", "--alpha", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "--alpha: must be within [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def make_archive(tmp_path: Path, corrupt: bool = False) -> Path:
    archive = tmp_path / "datasets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        train = [{"input": f"a{i}", "label": "( 1.0 + 1.0 )"} for i in range(10)]
        zf.writestr("datasets/svamp/svamp_train.json", "".join(json.dumps(row) + "\n" for row in train))
        zf.writestr("datasets/svamp/svamp_test.json", json.dumps({"input": "b", "label": "( 2.0 )"}) + "\n")
    if corrupt:
        data = bytearray(archive.read_bytes())
        data[40:60] = b"\0" * 20
        archive.write_bytes(bytes(data))
    return archive


def test_download_unpacks_all_or_nothing(tmp_path):
    from data_utils import load_data
    from download import fetch_data

    target = tmp_path / "data" / "datasets"
    fetch_data(make_archive(tmp_path).as_uri(), target, ask=False)
    assert list(load_data("svamp", target, llm="none")["test"]["input"]) == ["b"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".datasets-download")]


def test_corrupt_or_unreachable_archive_leaves_nothing_behind(tmp_path):
    from data_utils import DataError
    from download import fetch_data

    target = tmp_path / "data" / "datasets"
    with pytest.raises(DataError, match="corrupt|not a zip"):
        fetch_data(str(make_archive(tmp_path, corrupt=True)), target, ask=False)
    with pytest.raises(DataError, match="could not fetch"):
        fetch_data(str(tmp_path / "missing.zip"), target, ask=False)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_download_flag_fetches_before_loading(tiny_t5, tmp_path, capsys):
    target = tmp_path / "datasets"
    status, err = run_cli(["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(target),
                           "--download", "--data_url", str(make_archive(tmp_path)), "--llm", "none",
                           "--model_type", "standard", "--max_steps", "1", "--eval_steps", "1", "--batch_size", "1",
                           "--gen_max_len", "2", "--no_log", "--output_dir", str(tmp_path / "out")], capsys)
    assert (target / "svamp" / "svamp_test.json").is_file()
    assert status == 0, err


def svamp_folder(root: Path) -> Path:
    """A well-formed svamp folder with PaLM-style outputs: 20 train rows (one chunk), 2 test rows."""
    for split, n in (("train", 20), ("test", 2)):
        rows = [{"input": f"Tom has {i} apples", "label": f"( {i}.0 + 1.0 )"} for i in range(n)]
        (root / "svamp" / "llm").mkdir(parents=True, exist_ok=True)
        (root / "svamp" / f"svamp_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        outputs = [f"He has {i}. The answer is ({i} + 1)." for i in range(n)]
        (root / "svamp" / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(outputs))
    (root / "svamp" / "llm" / "train_CoT_1.json").write_text("[]")
    return root


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "svamp" / "svamp_test.json").write_text('{"input": "a", "label": "1"}\n{oops\n'),
         "svamp_test.json:2: not valid JSON"),
        (lambda d: (d / "svamp" / "llm" / "test_CoT_0.json").write_text('{"not": "a list"}'),
         "test_CoT_0.json: expected a JSON list of strings"),
        (lambda d: (d / "svamp" / "llm" / "test_CoT_0.json").write_text('["one", 2]'),
         "test_CoT_0.json: expected a JSON list of strings"),
        (lambda d: (d / "svamp" / "llm" / "test_CoT_0.json").write_text('["only one output"]'),
         "svamp test: 1 teacher outputs (--llm palm) for 2 data rows"),
        (lambda d: (d / "svamp" / "llm" / "test_CoT_0.json").write_text('["a", "b", "c"]'),
         "svamp test: 3 teacher outputs (--llm palm) for 2 data rows"),
        (lambda d: (d / "svamp" / "llm" / "train_CoT_1.json").unlink(), "missing teacher outputs"),
        (lambda d: (d / "svamp" / "svamp_train.json").unlink(), "missing data file"),
        (lambda d: (d / "svamp" / "svamp_test.json").write_text('{"input": "a"}\n'), "row 1 lacks field(s) label"),
    ],
)
def test_bad_data_files_are_named_with_what_to_do(tiny_t5, tmp_path, capsys, damage, message):
    data = svamp_folder(tmp_path / "data")
    damage(data)
    status, err = run_cli(["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(data),
                           "--output_dir", str(tmp_path / "out"), "--no_log"], capsys)
    assert status == 1
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert message in line
