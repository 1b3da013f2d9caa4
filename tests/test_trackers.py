"""run.py --report_to: trackers asked for but not installed stop before training; trackers get the run's flags
and the paper's figures. W&B and MLflow are optional extras, not installed for the tests: their parts are checked
against stand-ins."""

import json
import sys
import types
from pathlib import Path

import pytest

import run
import sweep
import trackers
from config import TRACKERS


def custom_run_flags(tiny_t5: Path, tmp_path: Path, *extra: str) -> list[str]:
    rows = [{"input": f"the apple tree {i}", "label": str(i % 3), "rationale": f"{i} apples"} for i in range(12)]
    for split, split_rows in (("train", rows), ("valid", rows[:3]), ("test", rows[:3])):
        path = tmp_path / "data" / "custom" / f"custom_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    return ["--dataset", "custom", "--data_dir", str(tmp_path / "data"), "--llm", "dataset",
            "--from_pretrained", str(tiny_t5), "--gen_max_len", "2", "--max_steps", "3", "--eval_steps", "1",
            "--batch_size", "4", "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_tracker_not_installed_is_one_line_before_anything_runs(tracker, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # not importable, whether or not it is installed here
    for main in (run.parse_args, sweep.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--dataset", "cqa", "--report_to", "tensorboard", tracker])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"--report_to {tracker} needs the {tracker} package, which is not installed" in err
        assert f"uv sync --extra {tracker}" in err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], ["tensorboard"]),
        (["--no_log"], ["none"]),
        (["--report_to", "none"], ["none"]),
        (["--report_to", "tensorboard", "tensorboard"], ["tensorboard"]),
        (["--report_to", "none", "tensorboard"], "--report_to none logs nowhere: pass it alone"),
        (["--no_log", "--report_to", "none"], "--no_log and --report_to both say where to log"),
        (["--report_to", "comet"], "--report_to: invalid choice: 'comet'"),
    ],
)
def test_report_to_flags(flags, expected, capsys):
    if isinstance(expected, list):
        assert run.parse_args(["--dataset", "cqa", *flags]).flags()["report_to"] == expected
        return
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--dataset", "cqa", *flags])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_every_tracker_gets_the_run_config():
    assert set(trackers.CONFIG_WRITERS) == set(TRACKERS)


def test_tensorboard_gets_the_run_config_and_the_papers_figures(tiny_t5, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    status = run.main(custom_run_flags(tiny_t5, tmp_path, "--select_on", "valid", "--run", "7"))
    assert status == 0, capsys.readouterr().err
    [results] = (tmp_path / "out" / "ckpts").rglob("results.json")
    record = json.loads(results.read_text())
    [log_dir] = {path.parent for path in (tmp_path / "out" / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]

    evaluations = record["evaluations"]
    assert scalars("eval/test_accuracy") == [(e["step"], e["test_accuracy"]) for e in evaluations]
    best_so_far = [max(e["test_accuracy"] for e in evaluations[: i + 1]) for i in range(len(evaluations))]
    assert scalars("eval/best_test_accuracy") == list(zip([e["step"] for e in evaluations], best_so_far))
    assert scalars("eval/selected_test_accuracy")[-1][1] == record["selected_test_accuracy"]
    assert all(set(e) <= {"step", "train_loss", "test_accuracy", "valid_accuracy"} for e in evaluations), (
        "the added figures reach the trackers only, not the run record's history"
    )

    [text] = events.Tensors("dss_config/text_summary")
    config = json.loads(text.tensor_proto.string_val[0].decode().strip("`\n"))
    assert (config["dataset"], config["run"], config["select_on"], config["report_to"]) == (
        "custom", 7, "valid", ["tensorboard"]
    )


def test_no_log_writes_no_tensorboard_folder(tiny_t5, tmp_path, capsys):
    assert run.main(custom_run_flags(tiny_t5, tmp_path, "--report_to", "none", "--max_steps", "1")) == 0, (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out" / "logs").exists() or not any((tmp_path / "out" / "logs").rglob("events.*"))


CONFIG = {"dataset": "cqa", "alpha": 0.5, "run": 2, "report_to": ["wandb", "mlflow"], "custom_metric": None}
FLAT = {"dataset": "cqa", "alpha": 0.5, "run": 2, "report_to": '["wandb", "mlflow"]', "custom_metric": "null"}


def test_wandb_run_gets_the_flags_under_their_own_name(monkeypatch):
    updates = []
    config = types.SimpleNamespace(update=lambda values, allow_val_change: updates.append((values, allow_val_change)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=types.SimpleNamespace(config=config)))
    trackers.config_to_wandb([], CONFIG)
    assert updates == [({"dss": FLAT}, True)]


def test_mlflow_run_gets_the_flags_as_prefixed_params(monkeypatch):
    logged = []
    stand_in = types.SimpleNamespace(active_run=lambda: object(), log_params=logged.append)
    monkeypatch.setitem(sys.modules, "mlflow", stand_in)
    trackers.config_to_mlflow([], CONFIG)
    assert logged == [{f"dss.{key}": value for key, value in FLAT.items()}]
