"""sweep.py --slurm, offline: the sbatch file submitit writes (through a stand-in sbatch that records it), and whole
runs through submitit's local executor."""

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

import sweep

pytest.importorskip("submitit", reason="submitit is the optional extra 'slurm' (uv sync --extra slurm)")

GRID = ["--dataset", "cqa", "--from_pretrained", "t5-small", "--methods", "standard_finetune", "dss_gt",
        "--fractions", "0.5", "1.0"]


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """Slurm's commands on PATH: squeue lists the job ids in <tmp>/queue.txt; sbatch keeps each submitted file in
    <tmp>/submitted/ and answers job 4242, 4243, ... (or refuses partition nowhere)."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    kept.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(
        "#!/bin/sh\n"
        'if grep -q "partition=nowhere" "$1"; then\n'
        '  echo "sbatch: error: invalid partition specified: nowhere" >&2; exit 1\n'
        'fi\n'
        f'n=$(ls {kept} | wc -l)\ncp "$1" {kept}/$n.sh\necho "Submitted batch job $((4242 + n))"\n'
    )
    script.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only looks for it; the jobs never run
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path}/queue.txt 2>/dev/null || true\n")  # the ids in queue.txt
    for name in ("srun", "squeue"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return kept


def test_pending_runs_go_as_one_array_with_the_slurm_flags(fake_sbatch, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*GRID, "--output_dir", str(out), "--slurm", "--slurm_partition", "gpu", "--slurm_gpus", "2",
            "--slurm_time", "1-00:00:00", "--slurm_mem", "64G", "--slurm_arg", "account=abc", "--slurm_arg=--qos=high"]
    args, passthrough = sweep.parse_args(argv)
    finished_argv = sweep.run_argvs(args, passthrough)[1]
    finished = sweep.results_path(finished_argv)
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")

    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    [script] = [path.read_text() for path in fake_sbatch.iterdir()]
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=1440", "--mem=64G", "--account=abc", "--qos=high",
                 "--array=0-2%3", "--job-name=dss-sweep"):
        assert f"#SBATCH {line}\n" in script
    records = [json.loads(line) for line in (out / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [r["job_id"] for r in records] == ["4242_0", "4242_1", "4242_2"]
    assert all("run.py" in r["command"] and "--resume" in r["command"] for r in records)
    assert shlex.join([sys.executable, str(sweep.RUN_PY), *finished_argv]) not in [r["command"] for r in records]
    for record in records:
        assert f"job {record['job_id']}: {record['command']}\n    log: {record['stdout']}" in printed
        assert record["stdout"].startswith(str(out / "slurm" / "4242_")) and record["stdout"].endswith(".out")
    assert "4 runs: 3 submitted, 0 still in the queue, 1 skipped (finished)" in printed

    (tmp_path / "queue.txt").write_text("4242_1\n977\n")
    assert sweep.main(argv) == 0, "resubmitting what is unfinished and not in the queue"
    assert f"still queued or running as job 4242_1: {records[1]['command']}" in capsys.readouterr().out
    lines = (out / "slurm" / "jobs.jsonl").read_text().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == ["4242_0", "4242_1", "4242_2", "4243_0", "4243_1"]
    assert [json.loads(line)["command"] for line in lines[3:]] == [records[0]["command"], records[2]["command"]]


def test_sbatch_refusal_is_one_line(fake_sbatch, tmp_path, capsys):
    out = tmp_path / "out"
    assert sweep.main([*GRID, "--output_dir", str(out), "--slurm", "--slurm_partition", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert "error: sbatch refused the jobs (sbatch: error: invalid partition specified: nowhere)" in err
    assert "Traceback" not in err and not (out / "slurm" / "jobs.jsonl").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--slurm", "--print"], "--slurm submits the runs and --print only prints them"),
        (["--slurm_partition", "gpu"], "--slurm_partition is for --slurm"),
        (["--slurm_gpus", "4"], "--slurm_gpus is for --slurm"),
        (["--slurm", "--slurm_time", "soon"], "--slurm_time: expected minutes, HH:MM:SS or D-HH:MM:SS"),
        (["--slurm", "--slurm_mem", "lots"], "--slurm_mem: expected a size such as 32G"),
        (["--slurm", "--slurm_arg", "account"], "--slurm_arg: expected an sbatch option as KEY=VALUE"),
    ],
)
def test_bad_slurm_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*GRID, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_slurm_without_submitit_or_sbatch_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit):
        sweep.parse_args([*GRID, "--slurm"])
    err = capsys.readouterr().err
    assert "--slurm needs the submitit package, which is not installed: uv sync --extra slurm" in err
    monkeypatch.undo()

    monkeypatch.setenv("PATH", str(tmp_path))
    assert sweep.main([*GRID, "--output_dir", str(tmp_path / "out"), "--slurm"]) == 1
    assert "--slurm needs Slurm's sbatch, which is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_local_executor_runs_the_pending_runs_and_a_second_submission_skips_them(tiny_t5, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(sweep, "SLURM_CLUSTER", "local")
    rows = [{"input": f"the apple tree {i}", "label": str(i % 3)} for i in range(20)]  # 0.5 leaves 10, valid needs 10
    for split, split_rows in (("train", rows), ("test", rows[:4])):
        path = tmp_path / "data" / "custom" / f"custom_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    out = tmp_path / "out"
    argv = ["--dataset", "custom", "--data_dir", str(tmp_path / "data"), "--from_pretrained", str(tiny_t5),
            "--methods", "standard_finetune", "--fractions", "0.5", "1.0", "--max_steps", "1", "--eval_steps", "1",
            "--batch_size", "2", "--gen_max_len", "2", "--no_log", "--output_dir", str(out),
            "--slurm", "--slurm_gpus", "0", "--slurm_time", "10"]
    assert sweep.main(argv) == 0
    records = [json.loads(line) for line in (out / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert len(records) == 2

    def job_logs() -> str:
        return "".join(Path(r["stdout"]).read_text() + Path(r["stderr"]).read_text() for r in records
                       if Path(r["stdout"]).exists() and Path(r["stderr"]).exists())

    # A job prints its last line after it writes results.json: wait for both, or a loaded machine reads the log early.
    deadline = time.monotonic() + 300
    while (len(list(out.rglob("results.json"))) < 2 or job_logs().count("best test accuracy") < 2) \
            and time.monotonic() < deadline:
        time.sleep(1)
    logs = job_logs()
    assert len(list(out.rglob("results.json"))) == 2, logs[-3000:]
    assert logs.count("best test accuracy") == 2
    capsys.readouterr()

    assert sweep.main(argv) == 0
    assert "nothing to submit, all 2 runs are finished" in capsys.readouterr().out
    assert len((out / "slurm" / "jobs.jsonl").read_text().splitlines()) == 2
