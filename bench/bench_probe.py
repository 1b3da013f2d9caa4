"""Times a Hugging Face training script from inside its own process, for bench_original.py.

    DSS_PROBE_OUT=probe.json [DSS_PROBE_WARMUP=4 DSS_PROBE_BLOCK=8] [DSS_PROBE_EVAL_ROWS=256] \
        python bench/bench_probe.py path/to/run.py --flag value ...

Runs the script as __main__ (with its own interpreter, so the original code runs on its own library versions)
after adding a TrainerCallback to every Trainer, and writes to $DSS_PROBE_OUT: wall and process-CPU timestamps at
the end of each optimizer step, the duration of each top-level Trainer.evaluate call and of the datasets map calls
(tokenisation), the time to the first step, the RSS after importing the script's module (what the libraries cost
before any data or model) and the process's peak RSS. Nothing of the script is changed or copied. Plain Python 3
and any transformers version that has TrainerCallback; it imports nothing from this project.

With DSS_PROBE_BLOCK, the process stops itself (SIGSTOP) after DSS_PROBE_WARMUP steps and after every further
DSS_PROBE_BLOCK steps, until a driver sends SIGCONT, and records when it was resumed: a driver can then alternate
blocks of steps of several long-lived processes, paying each one's start-up once. With DSS_PROBE_EVAL_ROWS, every
evaluation covers only the first rows of each evaluation set (for a script that has no flag for it). With
DSS_PROBE_EXIT_AT_FIRST_STEP=1, the process writes its record and exits as its first training step begins (start-up
benchmarks: bench_startup.py), its peak RSS then being what start-up cost.
"""

import importlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path


def status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def clock(start: tuple[float, float]) -> list[float]:
    return [time.perf_counter() - start[0], time.process_time() - start[1]]


def first_rows(data, rows: int):
    """The first rows of an evaluation set (or of each set of a dict of them)."""
    if isinstance(data, dict):
        return {name: first_rows(split, rows) for name, split in data.items()}
    return data.select(range(min(rows, len(data))))


def timed_outermost(owner, name: str, start, into: list, eval_rows: int = 0) -> None:
    """Wrap owner.name so that each outermost call appends [wall_s, cpu_s]; nested calls (evaluate per split,
    DatasetDict.map calling Dataset.map) count once. eval_rows: evaluate only the sets' first rows."""
    function, depth = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        depth[0] += 1
        if eval_rows and depth[0] == 1:  # the set passed in (transformers 4.30, per split), else the trainer's
            if len(args) > 1 and args[1] is not None:
                args = (args[0], first_rows(args[1], eval_rows), *args[2:])
            elif kwargs.get("eval_dataset") is not None:
                kwargs["eval_dataset"] = first_rows(kwargs["eval_dataset"], eval_rows)
            elif args[0].eval_dataset is not None:
                args[0].eval_dataset = first_rows(args[0].eval_dataset, eval_rows)
        begin = clock(start)
        try:
            return function(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                end = clock(start)
                into.append([end[0] - begin[0], end[1] - begin[1]])

    setattr(owner, name, wrapper)


def main() -> int:
    start = (time.perf_counter(), time.process_time())
    out = Path(os.environ["DSS_PROBE_OUT"])
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))
    record = {"steps": [], "resumes": [], "evaluations": [], "maps": [], "first_step_begin": None, "exit_code": None}
    warmup, block = int(os.environ.get("DSS_PROBE_WARMUP", "0")), int(os.environ.get("DSS_PROBE_BLOCK", "0"))
    exit_at_first_step = os.environ.get("DSS_PROBE_EXIT_AT_FIRST_STEP") == "1"

    import datasets
    import transformers

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if record["first_step_begin"] is None:
                record["first_step_begin"] = clock(start)
                if exit_at_first_step:
                    record.update(exit_code=0, end=record["first_step_begin"], peak_rss_bytes=status_bytes("VmHWM"))
                    out.write_text(json.dumps(record))
                    os._exit(0)

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append(clock(start))
            done = len(record["steps"])
            if block and done >= warmup and (done - warmup) % block == 0 and state.global_step < state.max_steps:
                os.kill(os.getpid(), signal.SIGSTOP)
                record["resumes"].append(clock(start))

    trainer_init = transformers.Trainer.__init__

    def init_with_step_times(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        self.add_callback(StepTimes())

    transformers.Trainer.__init__ = init_with_step_times
    eval_rows = int(os.environ.get("DSS_PROBE_EVAL_ROWS", "0"))
    timed_outermost(transformers.Trainer, "evaluate", start, record["evaluations"], eval_rows)
    timed_outermost(datasets.Dataset, "map", start, record["maps"])

    importlib.import_module(script.stem)
    record["import_rss_bytes"] = status_bytes("VmRSS")
    record["imported_at"] = clock(start)
    try:
        runpy.run_path(str(script), run_name="__main__")
        record["exit_code"] = 0
    except SystemExit as e:
        record["exit_code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        record["end"] = clock(start)
        record["peak_rss_bytes"] = status_bytes("VmHWM")
        out.write_text(json.dumps(record))
    return record["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
