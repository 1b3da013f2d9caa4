"""Run the paper's comparisons: each method over seeds, alphas and training-set fractions, one run after another.

    python sweep.py --dataset cqa --from_pretrained google/t5-v1_1-base --seeds 0 1 2

Every flag sweep.py does not know goes to run.py unchanged. Finished runs (those with a results.json) are
skipped and unfinished ones resume from their checkpoint, so a killed sweep is restarted with the same command.
"""

import argparse
import ctypes
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import run
from train_utils import run_dirs

RUN_PY = Path(__file__).resolve().with_name("run.py")
METHODS: dict[str, list[str]] = {
    "standard_finetune": ["--model_type", "standard", "--label_type", "gt", "--llm", "none"],
    "standard_distill": ["--model_type", "standard", "--label_type", "llm"],
    "dss_gt": ["--model_type", "task_prefix", "--label_type", "gt"],
    "dss_llm": ["--model_type", "task_prefix", "--label_type", "llm"],
}
# run.py flags the grid sets itself; passing them through would silently fight the grid.
GRID_FLAGS = ("--model_type", "--label_type", "--run", "--subsample", "--alpha", "--resume", "--overwrite")
PR_SET_PDEATHSIG = 1
# After Ctrl-C, how long a run has to write its last line before it is told to stop.
INTERRUPT_GRACE_S = 5.0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Any other flag (--dataset, --from_pretrained, --output_dir, ...) is passed to run.py.",
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    add("--seeds", nargs="+", type=int, default=[0], help="values of run.py --run")
    add("--alphas", nargs="+", type=run.unit_interval, default=[0.5],
        help="label-loss weights; only the task_prefix methods (dss_*) run once per alpha")
    add("--fractions", nargs="+", type=run.fraction, default=[0.125, 0.25, 0.5, 1.0],
        help="values of run.py --subsample (the paper's by default)")
    add("--print", action="store_true", help="print the pending runs' commands, one per line, and run nothing")
    args, passthrough = parser.parse_known_args(argv)
    for token in passthrough:
        name = token.split("=", 1)[0]
        # argparse accepts unambiguous prefixes (--sub for --subsample), so match those too.
        clash = [flag for flag in GRID_FLAGS if len(name) > 2 and flag.startswith(name)]
        if clash:
            parser.error(f"{token}: sweep.py sets {clash[0]} for each run; use --methods/--seeds/--alphas/--fractions")
    return args, passthrough


def run_argvs(args: argparse.Namespace, passthrough: list[str]) -> list[list[str]]:
    """run.py's argv for each run of the grid; seeds outermost, so an early stop leaves whole seeds done."""
    argvs = []
    for seed in dict.fromkeys(args.seeds):
        for fraction in dict.fromkeys(args.fractions):
            for method in dict.fromkeys(args.methods):
                flags = METHODS[method]
                # alpha weighs the rationale loss, which standard models do not have: one run at run.py's default.
                alphas = dict.fromkeys(args.alphas) if "task_prefix" in flags else [None]
                for alpha in alphas:
                    grid = [*flags, "--run", str(seed), "--subsample", str(fraction), "--resume"]
                    if alpha is not None:
                        grid += ["--alpha", str(alpha)]
                    argvs.append(passthrough + grid)
    return argvs


def results_path(argv: list[str]) -> Path:
    """Where the run writes results.json, computed as run.py does (this also checks every flag up front)."""
    ckpt_dir, _ = run_dirs(run.parse_args(argv))
    return ckpt_dir / "results.json"


def die_with_sweep(sweep_pid: int):
    """preexec_fn for a run: on Linux the kernel sends it SIGTERM (which run.py ends like Ctrl-C) when the sweep dies
    by any means, so no run keeps writing into its folder behind a sweep that is gone or started again."""

    def arrange() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
                os._exit(1)

    return arrange


def run_one(command: list[str]) -> int:
    """Run one run.py to its end; on Ctrl-C (which reaches the run too) give it time to say where it stopped."""
    child = subprocess.Popen(command, preexec_fn=die_with_sweep(os.getpid()))
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    plan = [(argv, results_path(argv)) for argv in run_argvs(args, passthrough)]
    pending = [(argv, results) for argv, results in plan if not results.is_file()]
    if args.print:
        for argv, _ in pending:
            print(shlex.join([sys.executable, str(RUN_PY), *argv]))
        print(f"# {len(pending)} runs to do, {len(plan) - len(pending)} finished left out", file=sys.stderr)
        return 0
    ran = skipped = 0
    failed = []
    for i, (argv, results) in enumerate(plan, 1):
        command = shlex.join([sys.executable, str(RUN_PY), *argv])
        if results.is_file():
            skipped += 1
            print(f"[{i}/{len(plan)}] skip (finished, {results}): {command}", flush=True)
            continue
        print(f"[{i}/{len(plan)}] run: {command}", flush=True)
        try:
            code = run_one([sys.executable, str(RUN_PY), *argv])
        except KeyboardInterrupt:
            print("sweep interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            return 130
        ran += 1
        if code != 0:
            failed.append(command)
            print(f"[{i}/{len(plan)}] failed (exit {code}): {command}", flush=True)
    print(f"sweep: {len(plan)} runs: {ran} ran, {skipped} skipped (finished), {len(failed)} failed")
    for command in failed:
        print(f"failed: {command}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
