"""Side by side: the original research code against this project, in alternating rounds, timed inside each process.

    OMP_NUM_THREADS=2 python bench/bench_original.py --original_src /tmp/original/src \
        --original_python /tmp/original/venv/bin/python --from_pretrained /tmp/ref-t5 \
        --data_dir ../shared/datasets --rounds 9 --block 6 --eval --out bench_original.json

Per mode (task_prefix, standard), each side trains in one long-lived process under bench_probe.py, which
timestamps the end of every optimizer step inside the process and stops the process (SIGSTOP) after --warmup
steps and after every further --block steps. The driver starts the sides one at a time, then resumes them in
turn, one running at a time, alternating the order every round (ABBA), so each round is one block of steps per
side under the same load, and start-ups are paid once. A block's step time is the median interval between its
step ends, in wall time and in process CPU time (which other load on shared cores disturbs less); a round's ratio
is the first side's block time over each other side's. Reported per mode: the median of the rounds' ratios and
their spread (min, max), never a figure divided by one from another run. Start-up (process start to the first
step: imports, data, model and tokenisation, cold for both sides), the time in datasets' map (tokenisation), and
working memory (peak RSS minus the RSS after importing the script's modules) are reported separately. --eval adds
runs of one step with one evaluation of the whole test split per side (the Trainer's evaluate call alone, as each
side runs it: batch sizes and loss passes are each side's own).

Sides: `original` (its run.py, its own interpreter, cwd with datasets/ linked to --data_dir), `project`, and
`project-without=NAME+NAME` (the project with those speedups.SPEEDUPS switched off: each trick's own gain is
`--sides project-without=cpu_dropout project`). Two `project` sides check the driver itself (tests/test_bench.py).

Shapes: --shape NAME (bench.RANDOM_CONFIGS: tiny, the reference student; t5-v1_1-small; t5-v1_1-base) trains a
random T5 of that shape with the public vocabulary (--tokenizer), built once with seed 0 by the original's own
interpreter (so that transformers 4.30 and 5 both load it) and kept in --shapes_dir; --from_pretrained names a ready
student instead. Per mode the report gives the model FLOPs of a training step, counted from the shape and the token
counts of the training rows (bench.forward_flops, real tokens only, averaged over the split: both sides draw the
same batches), each side's achieved GFLOP/s, and the machine's dense fp32 matmul rate measured in the same run
(before and after the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import RANDOM_CONFIGS, VIEWS, forward_flops, matmul_peak_flops

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where run.py lives
sys.path.insert(0, str(ROOT))  # the project's modules, for counting a step's FLOPs
PROBE = Path(__file__).resolve().parent / "bench_probe.py"
MODES = ("task_prefix", "standard")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--sides", nargs="+", default=["original", "project"],
        help="original, project or project-without=NAME+NAME; ratios are the first side's time over each other's")
    add("--original_src", type=Path, default=Path("/tmp/original/src"), help="the original code's folder (run.py)")
    add("--original_python", type=Path, default=Path("/tmp/original/venv/bin/python"),
        help="the interpreter of the original's own environment (transformers 4.30)")
    add("--from_pretrained", help="the student both sides load (a local T5 folder); or --shape")
    add("--shape", choices=sorted(RANDOM_CONFIGS), help="train a random T5 of this shape (built once, see above)")
    add("--tokenizer", type=Path, default=ROOT.parent / "shared" / "t5-tokenizer",
        help="the vocabulary of --shape's models (a T5 tokenizer folder)")
    add("--shapes_dir", type=Path, default=Path(tempfile.gettempdir()) / "dss-shapes",
        help="where --shape's models are kept between runs")
    add("--data_dir", type=Path, required=True, help="the unzipped datasets.zip folder")
    add("--dataset", default="cqa")
    add("--modes", nargs="*", default=list(MODES), choices=MODES, help="modes to train (none: --eval only)")
    add("--rounds", type=int, default=9, help="blocks of steps per side, alternating between the sides")
    add("--block", type=int, default=6, help="training steps per block")
    add("--warmup", type=int, default=4, help="steps before the first block, left out of the step times")
    add("--batch_size", type=int, default=8)
    add("--max_input_length", type=int, default=256)
    add("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="OMP_NUM_THREADS of each side")
    add("--eval", action="store_true", help="also time one evaluation of the test split per side and mode")
    add("--eval_rounds", type=int, default=1)
    add("--eval_modes", nargs="+", default=["task_prefix"], choices=MODES)
    add("--gen_max_len", type=int, default=64)
    add("--eval_rows", type=int, default=None,
        help="evaluate only the first N test rows, on every side (the project by --max_eval_samples, the original "
        "through bench_probe.py); default: the whole test split")
    add("--out", type=Path, default=Path("bench_original.json"))
    args = parser.parse_args(argv)
    if (args.from_pretrained is None) == (args.shape is None):
        parser.error("name the student: --from_pretrained FOLDER or --shape NAME (one of them)")
    if args.shape and not (args.tokenizer / "tokenizer_config.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there (a T5 tokenizer folder)")
    args.data_dir = args.data_dir.resolve()
    if args.from_pretrained:
        args.from_pretrained = str(Path(args.from_pretrained).resolve())
    for side in args.sides:
        if side not in ("original", "project") and not side.startswith("project-without="):
            parser.error(f"--sides {side!r}: expected original, project or project-without=NAME+NAME")
    if len(args.sides) < 2:
        parser.error("--sides: name at least two sides to compare")
    if "original" in args.sides and not (args.original_src / "run.py").is_file():
        parser.error(f"--original_src {args.original_src}: no run.py there (see ../shared/bench/README.md to set it up)")
    if "original" in args.sides and not args.original_python.is_file():
        parser.error(f"--original_python {args.original_python}: no such interpreter")
    if min(args.rounds, args.block, args.warmup) < 1:
        parser.error("--rounds, --block and --warmup must be at least 1")
    return args


# Run by the original's interpreter (transformers 4.30), whose T5 keeps an untied lm_head of its own when built from
# a config, as t5-v1_1's: argv is the output folder and the T5Config fields as JSON.
BUILD_RANDOM_T5 = """
import json, sys
import torch
from transformers import T5Config, T5ForConditionalGeneration
torch.manual_seed(0)
T5ForConditionalGeneration(T5Config(**json.loads(sys.argv[2]))).save_pretrained(sys.argv[1], safe_serialization=True)
"""


def shape_config(shape: str) -> dict:
    """T5Config fields of a random t5-v1_1-shaped student with the public T5 vocabulary."""
    return {"vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "dropout_rate": 0.1, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
            **RANDOM_CONFIGS[shape]}


def shape_model(args: argparse.Namespace) -> str:
    """The folder of --shape's random model with --tokenizer's files, built on first use."""
    folder = args.shapes_dir / args.shape
    if not (folder / "config.json").is_file():
        python = args.original_python if args.original_python.is_file() else Path(sys.executable)
        partial = Path(tempfile.mkdtemp(prefix=f".{args.shape}.", dir=args.shapes_dir.mkdir(parents=True, exist_ok=True)
                                        or args.shapes_dir))
        subprocess.run([str(python), "-c", BUILD_RANDOM_T5, str(partial), json.dumps(shape_config(args.shape))],
                       check=True)
        for path in args.tokenizer.iterdir():
            if path.is_file():
                shutil.copyfile(path, partial / path.name)
        os.rename(partial, folder)
    return str(folder.resolve())


def step_flops(args: argparse.Namespace, mode: str) -> float:
    """Model FLOPs of one training step: batch size x the mean over the training rows of 3 x each view's forward
    FLOPs (bench.forward_flops), the rows tokenised as the project tokenises them."""
    from transformers import AutoConfig, AutoTokenizer

    from config import DataConfig
    from train_utils import prepare_splits
    from views import tokenize_seq2seq

    config = AutoConfig.from_pretrained(args.from_pretrained)
    tokenizer = AutoTokenizer.from_pretrained(args.from_pretrained)
    splits = prepare_splits(DataConfig(dataset=args.dataset, data_dir=str(args.data_dir)), 0, tokenizer.eos_token)
    train = tokenize_seq2seq(splits, tokenizer, mode, args.max_input_length)["train"]
    total = 0
    for input_key, label_key in VIEWS:
        if input_key in train.column_names:
            total += sum(3 * forward_flops(config, len(s), len(t)) for s, t in zip(train[input_key], train[label_key]))
    return args.batch_size * total / len(train)


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
        if evaluate and args.eval_rows:
            env["DSS_PROBE_EVAL_ROWS"] = str(args.eval_rows)
        return [str(args.original_python), str(PROBE), str(args.original_src / "run.py"), *common], env
    if side.startswith("project-without="):
        env["DSS_DISABLE_SPEEDUPS"] = side.split("=", 1)[1].replace("+", ",")
    output = work / "project-out"
    project = ["--data_dir", str(args.data_dir), "--output_dir", str(output), "--cache_dir", str(work / "cache")]
    # The project evaluates at the end of training; in timing runs a few rows keep that short.
    rows = args.eval_rows if evaluate else 16
    if rows:
        project += ["--max_eval_samples", str(rows)]
    return [sys.executable, str(PROBE), str(ROOT / "run.py"), *common, *project], env


def launch(args, side: str, mode: str, steps: int, evaluate: bool, folder: Path, block: int = 0):
    """Start one run of one side in its own folder (./datasets linked to --data_dir, as the original expects)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "datasets").symlink_to(args.data_dir)
    argv, env = side_command(args, side, mode, steps, evaluate, folder)
    env.update(DSS_PROBE_OUT=str(folder / "probe.json"), DSS_PROBE_WARMUP=str(args.warmup), DSS_PROBE_BLOCK=str(block))
    with open(folder / "stderr.log", "w") as stderr:
        return subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def wait(proc: subprocess.Popen, side: str, folder: Path, expect_stop: bool) -> None:
    """Until the process stops itself (end of a block) or exits; anything else is an error naming the side."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status) and expect_stop:
        return
    if os.WIFSTOPPED(status):
        sys.exit(f"error: {side} stopped where it should have finished: see {folder}")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or expect_stop:
        log = (folder / "stderr.log").read_text()[-3000:]
        sys.exit(f"error: {side} exited (code {proc.returncode}) before its last step:\n{log}")


def read_probe(folder: Path) -> dict:
    return json.loads((folder / "probe.json").read_text())


def block_step_seconds(record: dict, warmup: int, block: int) -> list[tuple[float, float]]:
    """Per block of steps after the warm-up: median (wall, CPU) seconds per step, from the block's resume."""
    medians = []
    for index, resumed in enumerate(record["resumes"]):
        ends = [resumed, *record["steps"][warmup + index * block : warmup + (index + 1) * block]]
        medians.append((statistics.median(b[0] - a[0] for a, b in zip(ends, ends[1:])),
                        statistics.median(b[1] - a[1] for a, b in zip(ends, ends[1:]))))
    return medians


def train_mode(args, mode: str, work: Path) -> dict[str, dict]:
    """One long-lived process per side; their blocks of steps alternate, ABBA, one process running at a time."""
    folders = {side: work / f"side{i}" for i, side in enumerate(args.sides)}
    procs = {}
    try:
        for side in args.sides:  # start-ups one at a time, each up to the end of its warm-up
            procs[side] = launch(args, side, mode, args.warmup + args.rounds * args.block, False, folders[side],
                                 args.block)
            wait(procs[side], side, folders[side], expect_stop=True)
        for round_index in range(args.rounds):
            last = round_index == args.rounds - 1
            for side in args.sides if round_index % 2 == 0 else args.sides[::-1]:
                os.kill(procs[side].pid, signal.SIGCONT)
                wait(procs[side], side, folders[side], expect_stop=not last)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                os.kill(proc.pid, signal.SIGCONT)
                proc.wait()
    records = {}
    for side in args.sides:
        record = read_probe(folders[side])
        record["blocks"] = block_step_seconds(record, args.warmup, args.block)
        records[side] = record
    for round_index in range(args.rounds):
        line = ", ".join(f"{side} {records[side]['blocks'][round_index][0]:.3f}" for side in args.sides)
        print(f"round {round_index + 1} {mode}: s/step {line}", flush=True)
    return records


def evaluate_once(args, side: str, mode: str, work: Path) -> dict:
    folder = work / "eval"
    proc = launch(args, side, mode, 1, True, folder)
    wait(proc, side, folder, expect_stop=False)
    return read_probe(folder)


def matmul_rate(args: argparse.Namespace) -> float:
    """The machine's dense fp32 matmul FLOP/s now, with the sides' thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return matmul_peak_flops("cpu")
    finally:
        torch.set_num_threads(threads)


def measure(args: argparse.Namespace, work: Path) -> dict:
    runs = {}
    flops = {mode: step_flops(args, mode) for mode in args.modes}
    machine = {"matmul_flops_per_s": [matmul_rate(args)]}
    for mode in args.modes:
        runs[mode] = train_mode(args, mode, work)
        # What is measured so far survives a benchmark stopped before its end.
        args.out.with_suffix(".partial.json").write_text(json.dumps({"train": runs}, default=str))
    machine["matmul_flops_per_s"].append(matmul_rate(args))
    evaluations: dict[str, dict[str, list[dict]]] = {}
    for round_index in range(args.eval_rounds if args.eval else 0):
        for mode in args.eval_modes:
            evaluations.setdefault(mode, {side: [] for side in args.sides})
            for side in args.sides if round_index % 2 == 0 else args.sides[::-1]:
                record = evaluate_once(args, side, mode, work)
                evaluations[mode][side].append(record)
                print(f"eval {mode} {side}: {record['evaluations'][0][0]:.1f} s", flush=True)
    return {"train": runs, "eval": evaluations, "step_flops": flops, "machine": machine}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarise(args: argparse.Namespace, measured: dict) -> dict:
    base = args.sides[0]
    peak = statistics.median(measured["machine"]["matmul_flops_per_s"])
    summary = {"train": {}, "eval": {}, "matmul_flops_per_s": measured["machine"]["matmul_flops_per_s"]}
    for mode, records in measured["train"].items():
        flops = measured["step_flops"][mode]
        entry = {"sides": {}, "ratios": {}, "step_flops": flops}
        for side, r in records.items():
            step_s = statistics.median(wall for wall, _ in r["blocks"])
            entry["sides"][side] = {
                "achieved_flops_per_s": flops / step_s,
                "fraction_of_matmul_peak": flops / step_s / peak,
                "step_wall_s": spread([wall for wall, _ in r["blocks"]]),
                "step_cpu_s": spread([cpu for _, cpu in r["blocks"]]),
                "startup_s": r["first_step_begin"][0],
                "map_s": sum(m[0] for m in r["maps"]),
                "import_rss_bytes": r["import_rss_bytes"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "working_bytes": r["peak_rss_bytes"] - r["import_rss_bytes"],
            }
        for side in args.sides[1:]:
            pairs = list(zip(records[base]["blocks"], records[side]["blocks"]))
            entry["ratios"][side] = {
                "wall": spread([a[0] / b[0] for a, b in pairs]),
                "cpu": spread([a[1] / b[1] for a, b in pairs]),
                "working_memory": entry["sides"][side]["working_bytes"] / entry["sides"][base]["working_bytes"],
            }
        summary["train"][mode] = entry
    for mode, by_side in measured["eval"].items():
        seconds = {side: [r["evaluations"][0][0] for r in runs] for side, runs in by_side.items()}
        summary["eval"][mode] = {
            "seconds": {side: spread(values) for side, values in seconds.items()},
            "ratios": {side: spread([a / b for a, b in zip(seconds[base], seconds[side])]) for side in args.sides[1:]},
        }
    return summary


def table(args: argparse.Namespace, summary: dict) -> str:
    base = args.sides[0]
    rates = ", ".join(f"{rate / 1e9:.0f}" for rate in summary["matmul_flops_per_s"])
    lines = [f"student {args.shape or args.from_pretrained}, input {args.max_input_length}, batch {args.batch_size}; "
             f"fp32 matmul peak (before, after) {rates} GFLOP/s", "",
             f"| mode | side | s/step, median of {args.rounds} blocks | ratio {base}/side per block, wall: median "
             "[min, max] | CPU: median [min, max] | start-up s (map s) | peak RSS - imports' RSS | "
             "GFLOP/step · GFLOP/s (of peak) |", "|---|---|---|---|---|---|---|---|"]
    for mode, entry in summary["train"].items():
        for side in args.sides:
            s, ratio = entry["sides"][side], entry["ratios"].get(side)
            wall = f"**{ratio['wall']['median']:.2f}x** [{ratio['wall']['min']:.2f}, {ratio['wall']['max']:.2f}]" if ratio else ""
            cpu = f"{ratio['cpu']['median']:.2f}x [{ratio['cpu']['min']:.2f}, {ratio['cpu']['max']:.2f}]" if ratio else ""
            memory = f"{s['working_bytes'] / 2**30:.2f} GiB" + (f" ({ratio['working_memory']:.2f}x)" if ratio else "")
            throughput = (f"{entry['step_flops'] / 1e9:.1f} · {s['achieved_flops_per_s'] / 1e9:.1f} "
                          f"({s['fraction_of_matmul_peak']:.0%})")
            lines.append(f"| {mode} | {side} | {s['step_wall_s']['median']:.3f} | {wall} | {cpu} | "
                         f"{s['startup_s']:.1f} ({s['map_s']:.1f}) | {memory} | {throughput} |")
    for mode, entry in summary["eval"].items():
        for side in args.sides:
            ratio = entry["ratios"].get(side)
            text = f"**{ratio['median']:.2f}x** [{ratio['min']:.2f}, {ratio['max']:.2f}]" if ratio else ""
            lines.append(f"| {mode} test evaluation | {side} | {entry['seconds'][side]['median']:.1f} s | {text} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shape:
        args.from_pretrained = shape_model(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped: the sides' processes are ended"))  # runs `finally`
    with tempfile.TemporaryDirectory(prefix="bench-original-") as tmp:
        work = Path(tmp)
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
