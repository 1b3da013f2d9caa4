"""A first run as a new user meets it: no data folder, no network, nothing beside the checkout.

Data comes from the `fake_data_dir` fixture (the datasets.zip layout, written by the tests), so these run everywhere.
"""

import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import data_utils
import download
import run
import students
import train_utils
from conftest import ROOT
from test_cli import run_cli


def closed_port() -> int:
    """A local port nothing listens on: connecting to it fails at once, as a machine without network does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub behind a closed port and an empty cache, in this process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


@pytest.fixture
def transformers_warnings():
    """What transformers logs, as in a fresh process (the project's filters not yet installed)."""
    from transformers.utils import logging as hf_logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name in ("transformers.modeling_utils", "transformers.trainer"):
        hf_logging.get_logger(name).removeFilter(students.without_tied_weight_notices)
    library = hf_logging.get_logger("transformers")
    library.addHandler(handler)
    yield seen
    library.removeHandler(handler)


def test_fake_data_loads_like_the_paper_data(fake_data_dir, capsys):
    config = run.parse_args(["--dataset", "cqa", "--data_dir", str(fake_data_dir), "--label_type", "llm"])
    splits = train_utils.prepare_splits(config.data, config.training.seed, eos="</s>")
    # 5 of the 6 test outputs name the gold choice; valid is 10% of train, drawn with seed 0.
    assert "LLM Test Acc: 0.8333" in capsys.readouterr().out
    assert (len(splits["train"]), len(splits["test"])) == (36, 6)
    assert splits["test"]["input"][0].startswith("Where would you find apples number 0?\nAnswer Choices:\n(a) park")
    assert splits["test"]["rationale"][0] == ("The answer must be a place with apples. Of the above choices, "
                                              "only park has apples.")
    svamp = data_utils.load_data("svamp", fake_data_dir, llm="palm")
    assert svamp["test"]["llm_label"][:2] == ["(2 * 2)", "(3 / 2)"]
    assert len(svamp["train"]) + len(svamp["valid"]) == 30


def test_end_to_end_run_on_the_fake_data(tiny_t5, fake_data_dir, tmp_path, capsys, transformers_warnings):
    status = run.main(["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(fake_data_dir),
                       "--output_dir", str(tmp_path / "out"), "--label_type", "llm", "--batch_size", "4",
                       "--max_steps", "2", "--eval_steps", "1", "--gen_max_len", "4", "--no_log"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "LLM Test Acc: 0.6000" in captured.out
    [results] = (tmp_path / "out").glob("ckpts/**/results.json")
    record = json.loads(results.read_text())
    assert [e["step"] for e in record["evaluations"]] == [1, 2]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in record["evaluations"])
    # Loading t5-v1_1-shaped weights, and reloading the best checkpoint at the end, says nothing about tied weights.
    assert not [w for w in transformers_warnings if "tie" in w or "missing keys" in w], transformers_warnings


def test_missing_data_is_found_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model was loaded before the data folder was checked")

    monkeypatch.setattr(train_utils, "load_student", no_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status, err = run_cli(["--dataset", "cqa", "--from_pretrained", "google/t5-v1_1-base", "--label_type", "llm",
                           "--data_dir", str(tmp_path / "datasets"), "--output_dir", str(tmp_path)], capsys)
    assert status == 1
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: data folder {tmp_path / 'datasets'} not found") and "--download" in line


def test_unreachable_hub_is_one_line_naming_the_remedies(fake_data_dir, no_hub, tmp_path, capsys):
    status, err = run_cli(["--dataset", "cqa", "--from_pretrained", "google/t5-v1_1-base", "--data_dir",
                           str(fake_data_dir), "--output_dir", str(tmp_path)], capsys)
    assert status == 1
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: cannot reach the Hugging Face hub at http://127.0.0.1:")
    assert "'google/t5-v1_1-base'" in line
    assert "local directory" in line and "HF_HUB_OFFLINE=1" in line and "HF_ENDPOINT" in line


def test_any_http_answer_means_the_hub_is_reachable(monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert students.hub_unreachable() is None
    finally:
        server.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert students.hub_unreachable()


def test_unreachable_hub_uses_a_cached_model(tiny_t5, no_hub, capsys):
    """The cache layout of huggingface_hub: models--<org>--<name>/refs/main naming a snapshot folder."""
    repo = no_hub / "models--someone--tiny-t5"
    shutil.copytree(tiny_t5, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    config = run.parse_args(["--dataset", "cqa", "--from_pretrained", "someone/tiny-t5"])
    _, tokenizer, model = students.load_student(config.student, config.training.seed)
    assert tokenizer.eos_token == "</s>" and model.config.d_model == 32
    assert "using the cached copy of someone/tiny-t5" in capsys.readouterr().err


def test_readme_command_offline_in_a_real_process(fake_data_dir, tmp_path):
    """Data present (./datasets, the default --data_dir), hub unreachable: one line and status 1, no retries, no
    traceback."""
    assert fake_data_dir == tmp_path / "datasets"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--dataset", "cqa", "--from_pretrained",
                           "google/t5-v1_1-base", "--label_type", "llm"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Hugging Face hub")


@pytest.mark.parametrize("loader", ["run", "predict"])
def test_untied_head_notice_is_silenced(tiny_t5, transformers_warnings, loader):
    """The fixture's head is untied, as in t5-v1_1: transformers 5 warns on every load unless told it is harmless."""
    import predict

    if loader == "run":
        config = run.parse_args(["--dataset", "cqa", "--from_pretrained", str(tiny_t5)])
        students.load_student(config.student, config.training.seed)
    else:
        predict.load_model(str(tiny_t5))
    assert transformers_warnings == []


def test_only_the_tied_weight_notices_are_dropped(transformers_warnings):
    from transformers.utils import logging as hf_logging

    students.quiet_tied_weight_notices()
    trainer_log = hf_logging.get_logger("transformers.trainer")
    trainer_log.warning("There were missing keys in the checkpoint model loaded: ['encoder.embed_tokens.weight'].")
    trainer_log.warning("There were missing keys in the checkpoint model loaded: ['lm_head.weight', 'shared.weight'].")
    hf_logging.get_logger("transformers.modeling_utils").warning("another warning still shows")
    assert transformers_warnings == [
        "There were missing keys in the checkpoint model loaded: ['lm_head.weight', 'shared.weight'].",
        "another warning still shows",
    ]


def test_default_download_is_the_papers_repository():
    assert run.parse_args(["--dataset", "cqa"]).data.data_url == (
        "https://raw.githubusercontent.com/google-research/distilling-step-by-step/refs/heads/main/datasets.zip")


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + str(path.relative_to(folder)))
    return archive


@pytest.mark.parametrize("prefix", ["datasets/", ""])
def test_download_unpacks_with_or_without_a_top_level_datasets_folder(fake_data_dir, tmp_path, prefix, capsys):
    archive = zip_folder(fake_data_dir, tmp_path / "datasets.zip", prefix)
    target = tmp_path / "fetched" / "datasets"
    download.fetch_data(archive.as_uri(), target, ask=False, dataset="cqa")
    assert sorted(p.name for p in target.iterdir()) == ["cqa", "svamp"]
    assert (target / "cqa" / "llm" / "train_CoT_9.json").is_file()
    assert f"unpacked cqa, svamp into {target}" in capsys.readouterr().err


def test_download_without_the_datasets_folder_is_refused_and_leaves_nothing(fake_data_dir, tmp_path):
    archive = zip_folder(fake_data_dir / "svamp", tmp_path / "datasets.zip", "datasets/svamp/")
    target = tmp_path / "fetched" / "datasets"
    with pytest.raises(data_utils.DataError, match=r"holds svamp but not cqa/, which --dataset cqa reads"):
        download.fetch_data(str(archive), target, ask=False, dataset="cqa")
    with pytest.raises(data_utils.DataError, match=r"holds svamp but not asdiv/, which --dataset asdiv reads"):
        download.fetch_data(str(archive), target, ask=False, dataset="asdiv")
    assert list(target.parent.iterdir()) == []
