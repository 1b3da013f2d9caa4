"""Start-up at e-SNLI's size, side by side: launch to the first training step, and peak memory, first run and rerun.

    OMP_NUM_THREADS=2 python bench/bench_startup.py --source ../shared/datasets --rows 10000 100000 \
        --original_src /tmp/original/src --original_python /tmp/original/venv/bin/python \
        --from_pretrained /tmp/ref-t5 --rounds 2 --out bench_startup.json

For each row count, bench/make_esnli.py writes synthetic e-SNLI in the paper's layout (reused from --data_root
when already there). Each round, each side (order alternating between rounds) runs twice with a cache folder of its
own made empty for the round: a first run, then a rerun that finds what the first run cached (the original:
datasets' Arrow copies of the JSON files, $HF_DATASETS_CACHE; the project: its tokenised splits, --cache_dir). Each run
is `run.py --dataset esnli` (task_prefix, PaLM rationales, batch 8) under bench_probe.py, which ends the process as
its first training step begins: the driver times the process from launch to its exit, and the probe reads its
peak RSS then. Reported per row count, side and run: seconds and peak RSS (medians over rounds), and per round the
original's time and memory over the project's.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_esnli  # noqa: E402 - a sibling developer tool

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "bench_probe.py"
SIDES = ("original", "project")
RUNS = ("first", "rerun")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--source", type=Path, required=True, help="a datasets folder with esnli's valid split (../shared/datasets)")
    add("--rows", type=int, nargs="+", default=[10000, 100000], help="train row counts to measure")
    add("--data_root", type=Path, default=Path(tempfile.gettempdir()) / "dss-esnli",
        help="where the synthetic datasets are written (one folder per row count), and reused")
    add("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    add("--original_src", type=Path, default=Path("/tmp/original/src"))
    add("--original_python", type=Path, default=Path("/tmp/original/venv/bin/python"))
    add("--from_pretrained", type=Path, required=True, help="the student both sides load (a local T5 folder)")
    add("--model_type", default="task_prefix", choices=("task_prefix", "standard"))
    add("--max_input_length", type=int, default=256)
    add("--rounds", type=int, default=1)
    add("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    add("--out", type=Path, default=Path("bench_startup.json"))
    args = parser.parse_args(argv)
    if "original" in args.sides and not (args.original_src / "run.py").is_file():
        parser.error(f"--original_src {args.original_src}: no run.py there (see ../shared/bench/README.md to set it up)")
    args.from_pretrained = args.from_pretrained.resolve()
    return args


def dataset_for(args: argparse.Namespace, rows: int) -> Path:
    """The data folder for `rows` train rows, written once."""
    folder = args.data_root / f"esnli-{rows}"
    if not (folder / "esnli" / "llm" / f"train_CoT_{make_esnli.TRAIN_CHUNKS - 1}.json").is_file():
        make_esnli.make(args.source, rows, folder)
    return folder


def command(args: argparse.Namespace, side: str, data: Path, folder: Path, cache: Path) -> tuple[list[str], dict]:
    """(argv, env) of one run of one side, up to its first training step."""
    flags = ["--dataset", "esnli", "--from_pretrained", str(args.from_pretrained), "--model_type", args.model_type,
             "--label_type", "gt", "--llm", "palm", "--batch_size", "8", "--max_input_length",
             str(args.max_input_length), "--max_steps", "2", "--eval_steps", "100000", "--no_log"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", "HF_DATASETS_CACHE": str(cache / "hf"), "DSS_PROBE_OUT": str(folder / "probe.json"),
           "DSS_PROBE_EXIT_AT_FIRST_STEP": "1"}
    if side == "original":
        return [str(args.original_python), str(PROBE), str(args.original_src / "run.py"), *flags], env
    project = ["--data_dir", str(data), "--output_dir", str(folder / "out"), "--cache_dir", str(cache / "dss")]
    return [sys.executable, str(PROBE), str(ROOT / "run.py"), *flags, *project], env


def run_once(args: argparse.Namespace, side: str, data: Path, folder: Path, cache: Path) -> dict:
    """One run: seconds from launch to the first step, and the peak RSS by then."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "datasets").symlink_to(data)  # the original reads ./datasets/esnli/...
    argv, env = command(args, side, data, folder, cache)
    begin = time.perf_counter()
    with open(folder / "stderr.log", "w") as stderr:
        code = subprocess.run(argv, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr).returncode
    seconds = time.perf_counter() - begin
    probe = folder / "probe.json"
    record = json.loads(probe.read_text()) if probe.is_file() else {}
    if code != 0 or record.get("first_step_begin") is None:
        sys.exit(f"error: {side} ended (code {code}) before its first step:\n"
                 f"{(folder / 'stderr.log').read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_bytes": record["peak_rss_bytes"],
            "map_s": sum(m[0] for m in record["maps"]), "import_rss_bytes": record["import_rss_bytes"]}


def measure(args: argparse.Namespace, work: Path) -> dict:
    measured: dict[str, dict[str, dict[str, list[dict]]]] = {}
    for rows in args.rows:
        data = dataset_for(args, rows)
        by_side = measured.setdefault(str(rows), {side: {run: [] for run in RUNS} for side in args.sides})
        for round_index in range(args.rounds):
            for side in args.sides if round_index % 2 == 0 else args.sides[::-1]:
                cache = work / f"cache-{side}"
                shutil.rmtree(cache, ignore_errors=True)
                for run in RUNS:
                    result = run_once(args, side, data, work / "run", cache)
                    by_side[side][run].append(result)
                    print(f"{rows} rows, round {round_index + 1}, {side} {run}: {result['seconds']:.1f} s, "
                          f"peak {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(measured))
    return measured


def summarise(measured: dict) -> dict:
    summary = {}
    for rows, by_side in measured.items():
        entry = summary.setdefault(rows, {})
        for run in RUNS:
            for side, runs in by_side.items():
                results = runs[run]
                entry.setdefault(run, {})[side] = {
                    "seconds": statistics.median(r["seconds"] for r in results),
                    "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in results),
                    "map_s": statistics.median(r["map_s"] for r in results),
                }
            if set(by_side) == set(SIDES):
                pairs = list(zip(by_side["original"][run], by_side["project"][run]))
                entry[run]["ratio"] = {
                    "seconds": [a["seconds"] / b["seconds"] for a, b in pairs],
                    "peak_rss": [b["peak_rss_bytes"] / a["peak_rss_bytes"] for a, b in pairs],
                }
    return summary


def table(summary: dict) -> str:
    lines = ["| train rows | run | original s · peak GiB | project s · peak GiB | original / project time, per round | "
             "project / original peak memory |", "|---|---|---|---|---|---|"]
    for rows, entry in summary.items():
        for run in RUNS:
            cells = []
            for side in SIDES:
                s = entry[run].get(side)
                cells.append(f"{s['seconds']:.1f} · {s['peak_rss_bytes'] / 2**30:.2f}" if s else "")
            ratio = entry[run].get("ratio")
            speed = ", ".join(f"{r:.2f}x" for r in ratio["seconds"]) if ratio else ""
            memory = ", ".join(f"{r:.2f}x" for r in ratio["peak_rss"]) if ratio else ""
            lines.append(f"| {int(rows):,} | {run} | {cells[0]} | {cells[1]} | {speed} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        measured = measure(args, Path(tmp))
    summary = summarise(measured)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    args.out.write_text(json.dumps({"started": started, "commit": commit.strip(), "argv": sys.argv[1:],
                                    "summary": summary, "runs": measured}, indent=1, default=str))
    print(f"\n{started}, commit {commit.strip()}, {args.rounds} rounds, {args.threads} threads\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
