"""Fault injection, done for real: SIGKILL inside a checkpoint save, a full file system, two writers, a killed
sweep, corrupt checkpoints, bad bytes. Each asserts one line and no traceback, and that a resumed run ends with the
evaluations of an uninterrupted one."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run
import summarize
from conftest import ROOT, WORDS
from data_utils import DataError, load_data, read_teacher_outputs
from recovery import checkpoint_problem, checkpoint_step, resume_checkpoint, write_json_atomic

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory) -> Path:
    """A --dataset custom folder whose rows carry their own rationales (--llm dataset): no teacher files needed."""
    root = tmp_path_factory.mktemp("data")
    (root / "custom").mkdir()
    for split, count in (("train", 40), ("test", 8)):
        rows = []
        for i in range(count):
            a, b = i % 7 + 1, i % 5 + 2
            words = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(6))
            row = {"input": f"{words} {a} and {b}", "label": str(a + b), "rationale": f"{a} plus {b}"}
            rows.append(json.dumps(row))
        (root / "custom" / f"custom_{split}.json").write_text("\n".join(rows) + "\n")
    return root


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "custom", "--llm", "dataset", "--from_pretrained", str(model), "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--eval_batch_size", "8", "--gen_max_len", "4",
            "--max_input_length", "32", "--max_steps", "6", "--eval_steps", "2", "--lr", "1e-3", "--no_log",
            "--save_total_limit", "3", *extra]


def run_dir(out: Path) -> Path:
    [folder] = [p for p in out.glob("ckpts/custom/*/*/*/*/*/*/*/*/*/*/*") if p.is_dir()]
    return folder


def evaluations(out: Path) -> list[tuple]:
    record = json.loads((run_dir(out) / "results.json").read_text())
    return [(e["step"], round(e["train_loss"], 5), e["test_accuracy"]) for e in record["evaluations"]]


def one_line(err: str) -> str:
    """The last line besides progress bars; asserts there is no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    return lines[-1].strip()


@pytest.fixture(scope="module")
def uninterrupted(tiny_t5, custom_data, tmp_path_factory) -> tuple[Path, list[tuple]]:
    out = tmp_path_factory.mktemp("whole")
    assert run.main(argv(tiny_t5, custom_data, out)) == 0
    return out, evaluations(out)


# SIGKILL at a chosen point inside the trainer's save of a checkpoint (checkpoint-4 unless told): the folder just made
# (empty), after the weights (no optimizer or state), or halfway through writing trainer_state.json.
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from transformers import Trainer, TrainerState
import run

point = {point!r}

def kill_at_step(original, owner_of_state):
    def wrapper(self, *args, **kwargs):
        step = (self if owner_of_state else self.state).global_step
        if step == {step}:
            if point == "save_model":
                os.makedirs(args[0], exist_ok=True)
            if point == "save_to_json":  # as if killed while the file was half written
                original(self, *args, **kwargs)
                text = open(args[0]).read()
                with open(args[0], "w") as f:
                    f.write(text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    return wrapper

owner = TrainerState if point == "save_to_json" else Trainer
setattr(owner, point, kill_at_step(getattr(owner, point), owner is TrainerState))
sys.exit(run.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("point, why", [
    ("save_model", "incomplete"), ("_save_optimizer_and_scheduler", "incomplete"),
    ("save_to_json", "trainer_state.json is truncated"),
])
def test_sigkill_inside_a_checkpoint_save_resumes_from_the_previous_one(
    tiny_t5, custom_data, uninterrupted, tmp_path, capsys, point, why
):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT), point=point, step=4))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), *argv(tiny_t5, custom_data, out)], capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == -signal.SIGKILL
    broken = run_dir(out) / "checkpoint-4"
    assert broken.is_dir() and checkpoint_problem(broken) and not (run_dir(out) / "results.json").exists()

    assert run.main(argv(tiny_t5, custom_data, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"not resuming from {broken}: {why}" in err and "Traceback" not in err
    assert evaluations(out) == uninterrupted[1]
    assert json.loads((run_dir(out) / "results.json").read_text())["resumed_from"].endswith("checkpoint-2")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"])
def test_a_corrupt_checkpoint_file_falls_back_to_the_checkpoint_before(
    tiny_t5, custom_data, uninterrupted, tmp_path, capsys, name
):
    whole, expected = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    folder = run_dir(out)
    for state in folder.glob("checkpoint-*/trainer_state.json"):  # the copy's own paths, not the original's
        state.write_text(state.read_text().replace(str(run_dir(whole)), str(folder)))
    (folder / "results.json").unlink()
    target = folder / "checkpoint-6" / name
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    assert run.main(argv(tiny_t5, custom_data, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"not resuming from {folder / 'checkpoint-6'}: {name} is truncated" in err and "Traceback" not in err
    assert evaluations(out) == expected


def test_checkpoint_checks_find_truncation_and_accept_whole_checkpoints(uninterrupted, tmp_path):
    folder = run_dir(uninterrupted[0])
    assert [checkpoint_problem(p) for p in sorted(folder.glob("checkpoint-*"))] == [None, None, None]
    assert resume_checkpoint(folder, say=False) == folder / "checkpoint-6"
    empty = tmp_path / "checkpoint-9"
    empty.mkdir()
    assert "incomplete" in checkpoint_problem(empty)
    copy = tmp_path / "checkpoint-8"
    shutil.copytree(folder / "checkpoint-6", copy)
    (copy / "model.safetensors").unlink()
    assert checkpoint_problem(copy) == "it holds no model weights"
    shutil.copy(folder / "checkpoint-6" / "model.safetensors", copy / "model.safetensors")
    (copy / "optimizer.pt").write_bytes(b"")
    assert checkpoint_problem(copy) == "optimizer.pt is empty"


def test_injected_disk_full_in_a_save_gives_one_line_and_resumes(tiny_t5, custom_data, uninterrupted, tmp_path,
                                                                 capsys, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_rng_state

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "rng_state.pth"))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk)
    out = tmp_path / "out"
    assert run.main(argv(tiny_t5, custom_data, out)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: disk full writing ") and "rng_state.pth" in line
    assert "free, a checkpoint needs about" in line and "--resume" in line

    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert run.main(argv(tiny_t5, custom_data, out, "--resume")) == 0
    assert evaluations(out) == uninterrupted[1]


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and unprivileged user namespaces to mount a tmpfs")
def test_a_really_full_file_system_then_freed_space_resumes_to_the_same_end(tiny_t5, custom_data, uninterrupted,
                                                                            tmp_path):
    out, report = tmp_path / "small-disk", tmp_path / "report"
    out.mkdir()
    report.mkdir()
    command = [sys.executable, str(ROOT / "run.py"), *argv(tiny_t5, custom_data, out)]
    # A checkpoint of the tiny T5 is ~1.3 MB: checkpoint-2 fits in 2 MB, checkpoint-4 does not.
    script = f"""
mount -t tmpfs -o size=2m tmpfs {out}
{" ".join(command)} 2> {report}/first.err; echo $? > {report}/first.rc
mount -o remount,size=64m {out}
{" ".join(command)} --resume 2> {report}/second.err; echo $? > {report}/second.rc
cp -r {out}/ckpts {report}/ckpts
"""
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], timeout=2 * TIMEOUT_S)
    assert (report / "first.rc").read_text().strip() == "1"
    line = one_line((report / "first.err").read_text())
    assert line.startswith("error: disk full writing") and "--resume" in line
    assert (report / "second.rc").read_text().strip() == "0", (report / "second.err").read_text()
    assert "Traceback" not in (report / "second.err").read_text()
    assert evaluations(report) == uninterrupted[1]


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and unprivileged user namespaces to mount")
def test_a_read_only_output_dir_is_one_line(tiny_t5, custom_data, tmp_path):
    folder, report = tmp_path / "read-only", tmp_path / "report"
    folder.mkdir()
    report.mkdir()
    command = " ".join([sys.executable, str(ROOT / "run.py"), *argv(tiny_t5, custom_data, folder / "out")])
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
              f"{command} 2> {report}/err; echo $? > {report}/rc")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], timeout=TIMEOUT_S)
    assert (report / "rc").read_text().strip() == "1"
    line = one_line((report / "err").read_text())
    assert line.startswith(f"error: cannot create the run folder {folder / 'out'}") and "Read-only" in line


def wait_for(condition, what: str, timeout: float = TIMEOUT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def lock_holder(out: Path):
    locks = list(out.glob("ckpts/**/*.lock"))
    try:
        return json.loads(locks[0].read_text())["pid"] if locks else None
    except (OSError, ValueError):
        return None


def test_a_second_writer_is_refused_naming_the_first_and_ctrl_c_says_how_to_resume(tiny_t5, custom_data, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out"
    long_run = argv(tiny_t5, custom_data, out, "--max_steps", "5000", "--eval_steps", "1000")
    first = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *long_run], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: list(out.glob("ckpts/**/run_args.json")), "the first run to start training")
        assert lock_holder(out) == first.pid
        # Another --max_steps is not in the folder name: without the lock both would write results.json and best/.
        assert run.main(argv(tiny_t5, custom_data, out, "--max_steps", "8", "--resume")) == 1
        line = one_line(capsys.readouterr().err)
        assert "is in use by process " + str(first.pid) in line
        time.sleep(1.0)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130
    line = one_line(err)
    assert line.startswith("interrupted at step ") and line.endswith("run the same command with --resume to continue "
                                                                       "from its last checkpoint")
    assert not list(out.glob("ckpts/**/*.lock"))


def test_killing_the_sweep_stops_its_run(tiny_t5, custom_data, tmp_path):
    out = tmp_path / "out"
    flags = argv(tiny_t5, custom_data, out, "--max_steps", "5000", "--eval_steps", "1000")
    sweep = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--methods", "dss_gt", "--fractions", "1.0",
                              *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        child = wait_for(lambda: lock_holder(out), "the sweep's run to start")
        assert child != sweep.pid and alive(child)
        sweep.kill()  # the sweep alone, as a scheduler or `kill -9` would
        sweep.wait()
        wait_for(lambda: not alive(child), "the orphaned run to stop", timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()


def test_resume_with_other_flags_that_change_the_run_is_refused(tiny_t5, custom_data, uninterrupted, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    (run_dir(out) / "results.json").unlink()  # as if the run had died
    for extra, listed in ((["--max_steps", "8"], "--max_steps 6 -> 8"),
                          (["--gen_max_len", "9"], "--gen_max_len 4 -> 9"),
                          (["--max_eval_samples", "4"], "--max_eval_samples None -> 4")):
        assert run.main([*argv(tiny_t5, custom_data, out, "--resume"), *extra]) == 1
        line = one_line(capsys.readouterr().err)
        assert "started with other flags" in line and listed in line
    assert not (run_dir(out) / "results.json").exists()


def test_divergence_stops_with_one_line_and_is_never_the_best_model(tiny_t5, custom_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(argv(tiny_t5, custom_data, out, "--lr", "1e30")) == 1
    line = one_line(capsys.readouterr().err)
    assert "training diverged" in line and "by step " in line and "--lr" in line
    assert not (run_dir(out) / "best").exists() and not (run_dir(out) / "results.json").exists()


def cuda_out_of_memory():
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def cpu_out_of_memory():
    """A real failed allocation of torch's CPU allocator (4 PiB), which raises a plain RuntimeError."""
    import torch

    torch.empty(1 << 52, dtype=torch.uint8)


@pytest.mark.parametrize("allocate", [cuda_out_of_memory, cpu_out_of_memory])
def test_out_of_memory_is_one_line(tiny_t5, custom_data, tmp_path, capsys, monkeypatch, allocate):
    from model_utils import TaskPrefixTrainer

    def no_memory(*args, **kwargs):
        allocate()

    monkeypatch.setattr(TaskPrefixTrainer, "compute_loss", no_memory)
    assert run.main(argv(tiny_t5, custom_data, tmp_path / "out")) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory") and "--batch_size" in line and "--eval_batch_size" in line


def interrupt(*args, **kwargs):
    """Stands in for any call that the user interrupts with Ctrl-C."""
    raise KeyboardInterrupt


def test_ctrl_c_in_the_first_evaluation_leaves_no_empty_folder(tiny_t5, custom_data, tmp_path, capsys, monkeypatch):
    from model_utils import TaskPrefixTrainer

    monkeypatch.setattr(TaskPrefixTrainer, "prediction_step", interrupt)
    out = tmp_path / "out"
    assert run.main(argv(tiny_t5, custom_data, out)) == 130
    assert one_line(capsys.readouterr().err) == ("interrupted at step 2; run the same command with --resume to "
                                                 "continue from its last checkpoint")
    assert all(any(d.iterdir()) for d in out.rglob("*") if d.is_dir())
    assert not list(out.rglob("*.lock"))


def test_ctrl_c_while_loading_leaves_nothing(tiny_t5, custom_data, tmp_path, capsys, monkeypatch):
    import train_utils

    monkeypatch.setattr(train_utils, "load_student", interrupt)
    out = tmp_path / "out"
    assert run.main(argv(tiny_t5, custom_data, out)) == 130
    assert one_line(capsys.readouterr().err) == "interrupted before training started; nothing was written"
    assert not out.exists() or not any(out.iterdir())


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_t5, custom_data, tmp_path, capsys):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_t5 / name).is_file():
            shutil.copy(tiny_t5 / name, model / name)
    out = tmp_path / "out"
    assert run.main(argv(model, custom_data, out)) == 1
    line = one_line(capsys.readouterr().err)
    assert "encodes ordinary words as <unk>" in line and "tokenizer files" in line
    assert not out.exists() or not any(out.iterdir())

    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(model), "where is the bus"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1 and "encodes ordinary words as <unk>" in one_line(done.stderr)


def test_output_dir_that_is_a_file_is_one_line(tiny_t5, custom_data, tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("mine")
    assert run.main(argv(tiny_t5, custom_data, path)) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot create the run folder" in line and "--output_dir" in line
    assert path.read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr: must be positive and finite"),
    (["--lr", "nan"], "--lr: must be positive and finite"),
    (["--run", "-1"], "--run: must be a seed from 0 to 4294967295, got -1"),
    (["--run", "4294967296"], "--run: must be a seed from 0 to 4294967295, got 4294967296"),
    (["--llm", ".."], "--llm '..'"),
    (["--llm", "."], "--llm '.'"),
])
def test_values_that_would_train_garbage_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--dataset", "cqa", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "."])
def test_annotate_refuses_llm_names_that_leave_the_data_folder(name, capsys):
    import annotate

    with pytest.raises(SystemExit) as exit_info:
        annotate.parse_args(["--dataset", "svamp", "--teacher", "hf", "--model", "m", "--llm_name", name])
    assert exit_info.value.code == 2
    assert f"--llm_name {name!r}" in capsys.readouterr().err


def svamp_folder(root: Path, train: bytes, test: bytes) -> Path:
    (root / "svamp").mkdir(parents=True)
    (root / "svamp" / "svamp_train.json").write_bytes(train)
    (root / "svamp" / "svamp_test.json").write_bytes(test)
    return root


ROW = b'{"input": "Tom has 3 apples", "label": "( 3.0 - 1.0 )"}\n'


@pytest.mark.parametrize("train, test, message", [
    (ROW * 20, ROW + b'{"input": "caf\xe9", "label": "(1)"}\n',
     "svamp_test.json:2: byte 0xe9 at column 15 is not UTF-8 text"),
    (ROW * 20, ROW + b'{"input": "Tom", "label": 42}\n', "svamp_test.json:2: row 2's label is int 42"),
    (ROW * 20, ROW + b'{"input": ["a"], "label": "(1)"}\n', "svamp_test.json:2: row 2's input is list"),
    (b"", ROW, "svamp_train.json holds no rows"),
    (ROW * 20, b"\n", "svamp_test.json holds no rows"),
])
def test_bad_bytes_and_types_name_file_and_line(tmp_path, train, test, message):
    data = svamp_folder(tmp_path, train, test)
    with pytest.raises(DataError, match=re.escape(message)):
        load_data("svamp", data, llm="none")


def test_bad_bytes_in_a_teacher_chunk_name_file_and_line(tmp_path):
    (tmp_path / "svamp" / "llm").mkdir(parents=True)
    (tmp_path / "svamp" / "llm" / "test_CoT_0.json").write_bytes(b'["ok. The answer is (1).",\n "caf\xff"]')
    with pytest.raises(DataError, match=re.escape("test_CoT_0.json:2: byte 0xff at column 6 is not UTF-8 text")):
        read_teacher_outputs(tmp_path, "svamp", "test", "palm")


def test_predict_on_binary_stdin_and_truncated_weights_is_one_line(tiny_t5, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(tiny_t5)], input=b"\xff\xfe\x00x",
                          capture_output=True, timeout=TIMEOUT_S)
    assert done.returncode == 1 and "<stdin>: byte 0 is not UTF-8 text" in one_line(done.stderr.decode())

    model = tmp_path / "truncated"
    shutil.copytree(tiny_t5, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(model), "where is the bus"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1 and one_line(done.stderr).startswith(f"error: could not load --model {model}")


def test_results_json_is_strict(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"train_loss": math.nan, "evaluations": [{"x": math.inf, "y": 0.5}]})

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"train_loss": None,
                                                                   "evaluations": [{"x": None, "y": 0.5}]}
    assert not list(tmp_path.glob("*.tmp"))


def test_summarize_keeps_debug_runs_apart_from_full_runs(tmp_path, capsys):
    base = {"dataset": "svamp", "from_pretrained": "t5-small", "model_type": "task_prefix", "label_type": "gt",
            "llm": "palm", "alpha": 0.5, "subsample": 1.0, "run": 0, "lr": 5e-5, "select_on": "test"}
    for name, samples, accuracy in (("a-full", None, 0.4), ("b-debug", 16, 0.9)):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {**base, "max_eval_samples": samples},
                                    "selected_test_accuracy": accuracy}))
    assert summarize.main([str(tmp_path)]) == 0
    markdown, notes = capsys.readouterr()
    assert "already counted" not in notes
    assert "## svamp, t5-small (debug: max_eval_samples=16)" in markdown and "| dss_gt | 90.00 (n=1) |" in markdown
    assert "## svamp, t5-small\n" in markdown and "| dss_gt | 40.00 (n=1) |" in markdown


def test_a_skipped_checkpoint_is_marked_incomplete_before_it_is_saved_again(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from recovery import FaultGuard

    stale = tmp_path / "checkpoint-4"
    stale.mkdir()
    (stale / "trainer_state.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"from an earlier attempt")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(global_step=4)
    guard = FaultGuard()
    guard.on_step_end(args, state, TrainerControl(should_save=False))
    assert (stale / "trainer_state.json").exists() and guard.step == 4
    guard.on_step_end(args, state, TrainerControl(should_save=True))
    assert not (stale / "trainer_state.json").exists() and checkpoint_problem(stale).startswith("incomplete")


# Runs run.py as `python run.py` does, sending the process a signal the moment a module is first imported.
SIGNAL_AT_IMPORT = """
import os, runpy, signal, sys
module, signum = sys.argv[1], getattr(signal, sys.argv[2])

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signum)
        return None

sys.meta_path.insert(0, SignalAtImport())
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("module, signum", [
    ("numpy", "SIGTERM"),  # run.py's own imports
    ("torch", "SIGTERM"),  # main()'s imports of the training libraries
    ("torch", "SIGINT"),
])
def test_a_signal_during_imports_is_one_line_and_leaves_nothing(tiny_t5, custom_data, tmp_path, module, signum):
    script = tmp_path / "signal_at_import.py"
    script.write_text(SIGNAL_AT_IMPORT)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), module, signum, str(ROOT / "run.py"),
                           *argv(tiny_t5, custom_data, out)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 130
    assert one_line(done.stderr) == "interrupted before training started; nothing was written"
    assert not out.exists()


def test_a_model_that_does_not_generate_text_is_refused_naming_it(tiny_t5, custom_data, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    model = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(model)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_t5 / name, model / name)
    out = tmp_path / "out"
    assert run.main(argv(model, custom_data, out)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --from_pretrained {model} holds a BertForMaskedLM (bert), which does not "
                           "generate text; students are seq2seq LMs")
    assert not out.exists()


@pytest.mark.parametrize("config, heads, supported", [
    ("T5Config", ["T5ForConditionalGeneration"], True),
    ("T5Config", ["T5WithLMHeadModel"], True),  # how t5-small's config names it
    ("BartConfig", ["BartForConditionalGeneration"], True),
    ("GPT2Config", ["GPT2LMHeadModel"], True),
    ("LlamaConfig", ["LlamaForCausalLM"], True),
    ("Qwen2Config", None, True),  # a config saved without its architecture: the family's head
    ("BartConfig", ["BartModel"], True),  # facebook/bart-base: the base model, whose head is its embeddings
    ("T5Config", ["T5EncoderModel"], False),
    ("BertConfig", ["BertForSequenceClassification"], False),
    ("ViTConfig", None, False),
])
def test_only_text_generating_heads_of_a_family_or_their_base_models_are_students(config, heads, supported):
    import transformers

    from students import UnsupportedStudent, supported_family

    model_config = getattr(transformers, config)(architectures=heads)
    if supported:
        assert supported_family(model_config, "m").name in ("seq2seq", "causal")
    else:
        with pytest.raises(UnsupportedStudent, match="which does not generate text"):
            supported_family(model_config, "m")


def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_plain_rerun(tiny_t5, custom_data, tmp_path,
                                                                                  capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "run.py"),
                              *argv(tiny_t5, custom_data, out, "--max_steps", "5000", "--eval_steps", "1000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(out.glob("ckpts/**/run_args.json")), "the first run to start training")
        first.kill()  # as the kernel's out-of-memory killer does
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    folder = run_dir(out)
    assert [p.name for p in folder.iterdir()] == ["run_args.json"]
    # The same command, as a user reruns it (without --resume): there is nothing to resume, so it starts afresh.
    assert run.main(argv(tiny_t5, custom_data, out)) == 0
    err = capsys.readouterr().err
    assert f"note: the earlier attempt in {folder} stopped before its first checkpoint" in err
    assert json.loads((folder / "run_args.json").read_text())["max_steps"] == 6, "the record is this run's"
    assert (folder / "results.json").is_file()
    # With a checkpoint in the folder, the rerun without --resume is refused as before.
    (folder / "results.json").unlink()
    assert run.main(argv(tiny_t5, custom_data, out)) == 1
    assert "results already exist in" in one_line(capsys.readouterr().err)


def test_a_batch_larger_than_the_training_split_is_warned_of(tiny_t5, custom_data, tmp_path, capsys):
    assert run.main(argv(tiny_t5, custom_data, tmp_path / "out", "--batch_size", "100", "--max_steps", "2")) == 0
    err = capsys.readouterr().err
    rows = len(load_data("custom", custom_data, llm="dataset")["train"])
    assert (f"warning: --batch_size 100 is larger than the training split ({rows} rows): every step trains on all "
            f"{rows} rows at once") in err


@pytest.mark.parametrize("damage, why", [("truncate", "model.safetensors is truncated"),
                                         ("remove", "its folder no longer exists")])
def test_an_unreadable_best_checkpoint_falls_back_to_the_best_readable_one(tiny_t5, custom_data, tmp_path, capsys,
                                                                           damage, why):
    from safetensors.torch import load_file

    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT), point="save_model", step=8))
    out = tmp_path / "out"
    flags = argv(tiny_t5, custom_data, out, "--max_steps", "10")
    done = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == -signal.SIGKILL  # stopped after its third checkpoint
    folder = run_dir(out)
    best = Path(json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["best_model_checkpoint"])
    weights = best / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # which the trainer itself would only ignore, keeping the last model while the record names the best
        shutil.rmtree(best)

    assert run.main([*flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [note] = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("note: not loading")]
    record = json.loads((folder / "results.json").read_text())
    chosen = record["selection"]["step"]
    assert note.startswith(f"note: not loading the best checkpoint {best} (step {checkpoint_step(best)}, "
                           "eval_test_accuracy ")
    assert why in note
    assert f"the selected model is {folder / f'checkpoint-{chosen}'} (step {chosen}, " in note
    assert record["unreadable_best_checkpoints"] == [{"step": checkpoint_step(best), "checkpoint": str(best),
                                                      "problem": note.split(": ", 2)[2].split("; ")[0]}]
    # The best evaluation among the checkpoints left, earliest first among equals, as the trainer chooses.
    scores = {e["step"]: e["test_accuracy"] for e in record["evaluations"]}
    readable = [step for step in scores if step != checkpoint_step(best) and (folder / f"checkpoint-{step}").is_dir()]
    assert chosen == min(readable, key=lambda step: (-scores[step], step))
    assert record["selected_test_accuracy"] == scores[chosen]
    saved, loaded = load_file(folder / "best" / "model.safetensors"), load_file(
        folder / f"checkpoint-{chosen}" / "model.safetensors")
    assert saved.keys() == loaded.keys() and all((saved[k] == loaded[k]).all() for k in saved)


def test_no_readable_checkpoint_to_select_is_one_line_naming_each(tmp_path):
    from transformers import TrainerState, TrainingArguments

    from recovery import RunError, fall_back_to_readable_best

    for step, weights in ((2, b"\x10"), (4, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")
    state = TrainerState(best_model_checkpoint=str(tmp_path / "checkpoint-2"), best_global_step=2, log_history=[
        {"step": 2, "eval_test_accuracy": 0.5}, {"step": 4, "eval_test_accuracy": 0.25},
        {"step": 6, "eval_test_accuracy": 0.75}])  # checkpoint-6 was removed by the rotation
    args = TrainingArguments(output_dir=str(tmp_path), metric_for_best_model="eval_test_accuracy",
                             greater_is_better=True, report_to="none")
    with pytest.raises(RunError) as error:
        fall_back_to_readable_best(state, args, say=False)
    assert str(error.value) == (f"no checkpoint of {tmp_path} holds readable weights to load the selected model from "
                                f"({tmp_path / 'checkpoint-2'}: model.safetensors is truncated; "
                                f"{tmp_path / 'checkpoint-4'}: it holds no model weights); start the run again with "
                                "--overwrite")


def test_under_torchrun_a_refused_run_folder_stops_every_rank_with_its_line(tiny_t5, custom_data, tmp_path):
    from recovery import RunLock
    from test_distributed import torchrun
    from train_utils import data_parallel_size

    out = tmp_path / "out"
    flags = argv(tiny_t5, custom_data, out)
    # The folder of two processes with --batch_size 4 is that of one with 8: the same effective batch.
    config = run.parse_args([*flags, "--batch_size", "8"])
    ckpt_dir, _ = config.run_dirs(data_parallel_size(config.student.parallelize))
    ckpt_dir.parent.mkdir(parents=True)
    held = RunLock(ckpt_dir)
    held.acquire()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        done = subprocess.run([*torchrun(), str(ROOT / "run.py"), *flags], capture_output=True, text=True,
                              env={**env, "OMP_NUM_THREADS": "1"}, timeout=TIMEOUT_S)
    finally:
        held.release()
    assert done.returncode == 1
    # Each rank stops with rank 0's line, by itself: none waits in the process group until the launcher kills it
    # (SIGTERM, which a wait in C++ does not see, then SIGKILL 30 s later).
    assert done.stderr.count(f"is in use by process {os.getpid()} on ") == 2
    assert "Unable to shutdown" not in done.stderr and "(SIGKILL)" not in done.stderr
    assert not list(out.glob("ckpts/**/checkpoint-*")) and not list(out.glob("ckpts/**/run_args.json"))


@pytest.mark.parametrize("base, accepted", [("GPT2Model", True), ("BertModel", False)])
def test_a_bare_base_model_is_a_student_only_where_no_head_weights_would_start_at_random(tiny_t5, tmp_path, base,
                                                                                          accepted):
    import transformers

    from students import UnsupportedStudent, load_pretrained

    config = {"GPT2Model": transformers.GPT2Config(vocab_size=600, n_embd=16, n_layer=1, n_head=2),
              "BertModel": transformers.BertConfig(vocab_size=600, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)}[base]
    getattr(transformers, base)(config).save_pretrained(tmp_path)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_t5 / name, tmp_path / name)
    if accepted:  # GPT-2's head is tied to its embeddings: nothing is missing
        assert load_pretrained(str(tmp_path))[0].name == "causal"
    else:  # BERT's prediction head has weights of its own, which a BertModel lacks
        with pytest.raises(UnsupportedStudent, match=r"holds a BertModel \(bert\), without the weights of a "
                                                     r"text-generating head \(cls\.predictions\."):
            load_pretrained(str(tmp_path))


def test_a_best_checkpoint_damaged_during_the_run_is_passed_over_when_the_selected_model_loads(
    tiny_t5, custom_data, tmp_path, capsys, monkeypatch
):
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def save_then_damage_the_best(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.global_step == 6:  # the last save: the best checkpoint goes bad after it was written
            weights = Path(self.state.best_model_checkpoint) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_damage_the_best)
    out = tmp_path / "out"
    assert run.main(argv(tiny_t5, custom_data, out)) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("note: not loading")]
    assert len(notes) == 1 and "model.safetensors is truncated" in notes[0] and "Traceback" not in err
    record = json.loads((run_dir(out) / "results.json").read_text())
    [skipped] = record["unreadable_best_checkpoints"]
    assert record["selection"]["step"] != skipped["step"]
