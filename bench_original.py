"""Side by side: the original research code against this project, in alternating rounds, timed inside each process.

    OMP_NUM_THREADS=2 python bench_original.py --original_src /tmp/original/src \
        --original_python /tmp/original/venv/bin/python --from_pretrained /tmp/ref-t5 \
        --data_dir ../shared/datasets --rounds 7 --eval --out bench_original.json

Each round runs every side once per mode (task_prefix, standard), in alternating order (ABBA), as its own process
under bench_probe.py, which timestamps the end of each optimizer step inside the process. A side's step time is
the median interval between consecutive steps after --warmup steps, in wall time and in process CPU time (which
other load on shared cores disturbs less); the ratio of a round is the first side's step time over each other
side's. Reported per mode: the median of the rounds' ratios and their spread (min, max), never a figure divided
by one from another run. Start-up (process start to the first step: imports, data, model and tokenisation or a
read of its cache), the time in datasets' map (tokenisation), and working memory (peak RSS minus the RSS after
importing the script's modules) are reported separately. --eval adds runs of one step with one evaluation of the
whole test split per side (the Trainer's evaluate call alone, as each side runs it).

Sides: `original` (its run.py, its own interpreter, cwd with datasets/ linked to --data_dir), `project`, and
`project-without=NAME+NAME` (the project with those speedups.SPEEDUPS switched off: each trick's own gain is
`--sides project-without=cpu_dropout project`). Two `project` sides check the driver itself (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODES = ("task_prefix", "standard")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--sides", nargs="+", default=["original", "project"],
        help="original, project or project-without=NAME+NAME; ratios are the first side's time over each other's")
    add("--original_src", type=Path, default=Path("/tmp/original/src"), help="the original code's folder (run.py)")
    add("--original_python", type=Path, default=Path("/tmp/original/venv/bin/python"),
        help="the interpreter of the original's own environment (transformers 4.30)")
    add("--from_pretrained", required=True, help="the student both sides load (a local T5 folder)")
    add("--data_dir", type=Path, required=True, help="the unzipped datasets.zip folder")
    add("--dataset", default="cqa")
    add("--modes", nargs="+", default=list(MODES), choices=MODES)
    add("--rounds", type=int, default=7)
    add("--steps", type=int, default=16, help="training steps per run")
    add("--warmup", type=int, default=4, help="first steps left out of the step times")
    add("--batch_size", type=int, default=8)
    add("--max_input_length", type=int, default=256)
    add("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="OMP_NUM_THREADS of each side")
    add("--eval", action="store_true", help="also time one evaluation of the test split per side and mode")
    add("--eval_rounds", type=int, default=1)
    add("--eval_modes", nargs="+", default=["task_prefix"], choices=MODES)
    add("--gen_max_len", type=int, default=64)
    add("--eval_rows", type=int, default=None,
        help="project sides only (the original cannot): evaluate this many test rows, for smoke tests")
    add("--out", type=Path, default=Path("bench_original.json"))
    args = parser.parse_args(argv)
    args.data_dir, args.from_pretrained = args.data_dir.resolve(), str(Path(args.from_pretrained).resolve())
    for side in args.sides:
        if side not in ("original", "project") and not side.startswith("project-without="):
            parser.error(f"--sides {side!r}: expected original, project or project-without=NAME+NAME")
    if len(args.sides) < 2:
        parser.error("--sides: name at least two sides to compare")
    if "original" in args.sides and not (args.original_src / "run.py").is_file():
        parser.error(f"--original_src {args.original_src}: no run.py there (see ../shared/bench/README.md to set it up)")
    if "original" in args.sides and not args.original_python.is_file():
        parser.error(f"--original_python {args.original_python}: no such interpreter")
    if "original" in args.sides and args.eval_rows:
        parser.error("--eval_rows: the original evaluates the whole test split; leave it out")
    if args.warmup + 2 > args.steps:
        parser.error("--steps must exceed --warmup by at least 2 (one interval to time)")
    return args


def side_command(args: argparse.Namespace, side: str, mode: str, steps: int, evaluate: bool, work: Path):
    """(argv, env) of one run of one side, under bench_probe.py."""
    common = ["--dataset", args.dataset, "--from_pretrained", str(args.from_pretrained), "--model_type", mode,
              "--label_type", "gt", "--llm", "palm", "--batch_size", str(args.batch_size),
              "--max_input_length", str(args.max_input_length), "--max_steps", str(steps),
              "--eval_steps", "1" if evaluate else "100000", "--gen_max_len", str(args.gen_max_len), "--no_log"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DSS_DISABLE_SPEEDUPS", None)
    if side == "original":
        return [str(args.original_python), str(ROOT / "bench_probe.py"), str(args.original_src / "run.py"), *common], env
    if side.startswith("project-without="):
        env["DSS_DISABLE_SPEEDUPS"] = side.split("=", 1)[1].replace("+", ",")
    output = work / "project-out"
    project = ["--data_dir", str(args.data_dir), "--output_dir", str(output), "--cache_dir", str(work / "cache")]
    # The project evaluates at the end of training; in timing runs a few rows keep that short.
    rows = args.eval_rows if evaluate else 16
    if rows:
        project += ["--max_eval_samples", str(rows)]
    return [sys.executable, str(ROOT / "bench_probe.py"), str(ROOT / "run.py"), *common, *project], env


def run_side(args, side: str, mode: str, steps: int, evaluate: bool, work: Path) -> dict:
    for leftover in ("ckpts", "logs", "project-out"):  # each run starts from no earlier results
        shutil.rmtree(work / leftover, ignore_errors=True)
    argv, env = side_command(args, side, mode, steps, evaluate, work)
    env["DSS_PROBE_OUT"] = str(work / "probe.json")
    begin = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    record = json.loads((work / "probe.json").read_text()) if (work / "probe.json").is_file() else {}
    (work / "probe.json").unlink(missing_ok=True)
    if proc.returncode != 0 or record.get("exit_code") != 0:
        sys.exit(f"error: {side} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record["process_wall_s"] = time.perf_counter() - begin
    return record


def step_seconds(record: dict, warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds between consecutive step ends, after the warm-up steps."""
    ends = record["steps"][warmup:]
    walls = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpus = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    return statistics.median(walls), statistics.median(cpus)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def measure(args: argparse.Namespace, work: Path) -> dict:
    runs: dict[str, dict[str, list[dict]]] = {mode: {side: [] for side in args.sides} for mode in args.modes}
    for round_index in range(args.rounds):
        for mode in args.modes:
            order = args.sides if round_index % 2 == 0 else args.sides[::-1]
            for side in order:
                record = run_side(args, side, mode, args.steps, False, work)
                record["step_wall_s"], record["step_cpu_s"] = step_seconds(record, args.warmup)
                runs[mode][side].append(record)
            line = ", ".join(f"{side} {runs[mode][side][-1]['step_wall_s']:.3f}" for side in args.sides)
            print(f"round {round_index + 1} {mode}: s/step {line}", flush=True)
    evaluations: dict[str, dict[str, list[dict]]] = {}
    if args.eval:
        for round_index in range(args.eval_rounds):
            for mode in args.eval_modes:
                evaluations.setdefault(mode, {side: [] for side in args.sides})
                order = args.sides if round_index % 2 == 0 else args.sides[::-1]
                for side in order:
                    record = run_side(args, side, mode, 1, True, work)
                    evaluations[mode][side].append(record)
                    print(f"eval {mode} {side}: {record['evaluations'][0][0]:.1f} s", flush=True)
    return {"train": runs, "eval": evaluations}


def summarise(args: argparse.Namespace, measured: dict) -> dict:
    base = args.sides[0]
    summary = {"train": {}, "eval": {}}
    for mode, by_side in measured["train"].items():
        entry = {"sides": {}, "ratios": {}}
        for side, records in by_side.items():
            entry["sides"][side] = {
                "step_wall_s": spread([r["step_wall_s"] for r in records]),
                "step_cpu_s": spread([r["step_cpu_s"] for r in records]),
                "startup_s": spread([r["first_step_begin"][0] for r in records]),
                "map_s": spread([sum(m[0] for m in r["maps"]) for r in records]),
                "working_bytes": spread([r["peak_rss_bytes"] - r["import_rss_bytes"] for r in records]),
                "import_rss_bytes": spread([r["import_rss_bytes"] for r in records]),
                "peak_rss_bytes": spread([r["peak_rss_bytes"] for r in records]),
            }
        for side in args.sides[1:]:
            pairs = list(zip(by_side[base], by_side[side]))
            entry["ratios"][side] = {
                "wall": spread([a["step_wall_s"] / b["step_wall_s"] for a, b in pairs]),
                "cpu": spread([a["step_cpu_s"] / b["step_cpu_s"] for a, b in pairs]),
                "working_memory": spread([(b["peak_rss_bytes"] - b["import_rss_bytes"])
                                          / (a["peak_rss_bytes"] - a["import_rss_bytes"]) for a, b in pairs]),
            }
        summary["train"][mode] = entry
    for mode, by_side in measured["eval"].items():
        seconds = {side: [r["evaluations"][0][0] for r in records] for side, records in by_side.items()}
        summary["eval"][mode] = {
            "seconds": {side: spread(values) for side, values in seconds.items()},
            "ratios": {side: spread([a / b for a, b in zip(seconds[base], seconds[side])]) for side in args.sides[1:]},
        }
    return summary


def table(args: argparse.Namespace, summary: dict) -> str:
    base = args.sides[0]
    lines = [f"| mode | side | s/step (median) | ratio {base}/side, wall: median [min, max] | CPU: median [min, max] "
             "| start-up s | map s | working memory (peak - imports) |", "|---|---|---|---|---|---|---|---|"]
    for mode, entry in summary["train"].items():
        for side in args.sides:
            s = entry["sides"][side]
            ratio = entry["ratios"].get(side)
            wall = f"**{ratio['wall']['median']:.2f}x** [{ratio['wall']['min']:.2f}, {ratio['wall']['max']:.2f}]" if ratio else ""
            cpu = f"{ratio['cpu']['median']:.2f}x [{ratio['cpu']['min']:.2f}, {ratio['cpu']['max']:.2f}]" if ratio else ""
            lines.append(f"| {mode} | {side} | {s['step_wall_s']['median']:.3f} | {wall} | {cpu} | "
                         f"{s['startup_s']['median']:.1f} | {s['map_s']['median']:.1f} | "
                         f"{s['working_bytes']['median'] / 2**30:.2f} GiB |")
    for mode, entry in summary["eval"].items():
        for side in args.sides:
            ratio = entry["ratios"].get(side)
            text = f"**{ratio['median']:.2f}x** [{ratio['min']:.2f}, {ratio['max']:.2f}]" if ratio else ""
            lines.append(f"| {mode} test evaluation | {side} | {entry['seconds'][side]['median']:.1f} s | {text} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-original-") as tmp:
        work = Path(tmp)
        (work / "datasets").symlink_to(args.data_dir.resolve())  # the original reads ./datasets
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        measured = measure(args, work)
    summary = summarise(args, measured)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"started": started, "commit": commit.strip(), "argv": sys.argv[1:], "config": vars(args) | {
        "original_src": str(args.original_src), "original_python": str(args.original_python),
        "data_dir": str(args.data_dir), "out": str(args.out)}, "summary": summary, "runs": measured}
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{started}, commit {report['commit']}, {args.rounds} rounds, {args.threads} threads\n")
    print(table(args, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
