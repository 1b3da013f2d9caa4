"""Run the paper's comparisons: each method over seeds, alphas and training-set fractions, one run after another,
or all at once as a Slurm job array (--slurm).

    python sweep.py --dataset cqa --from_pretrained google/t5-v1_1-base --seeds 0 1 2
    python sweep.py --dataset cqa --seeds 0 1 2 --output_dir sweeps/cqa --slurm --slurm_partition gpu

Every flag sweep.py does not know goes to run.py unchanged. Finished runs (those with a results.json) are
skipped and unfinished ones resume from their checkpoint, so a killed sweep is restarted with the same command.
"""

import argparse
import ctypes
import getpass
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli
import run
from rationales import RATIONALE_MODES
from train_utils import data_parallel_size

RUN_PY = Path(__file__).resolve().with_name("run.py")
METHODS: dict[str, list[str]] = {
    "standard_finetune": ["--model_type", "standard", "--label_type", "gt", "--llm", "none"],
    "standard_distill": ["--model_type", "standard", "--label_type", "llm"],
    "dss_gt": ["--model_type", "task_prefix", "--label_type", "gt"],
    "dss_llm": ["--model_type", "task_prefix", "--label_type", "llm"],
}
# run.py flags the grid sets itself; passing them through would silently fight the grid.
GRID_FLAGS = (
    "--model_type", "--label_type", "--run", "--subsample", "--alpha", "--rationales", "--resume", "--overwrite",
    "--kd_weight",
)
# run.py flags that score rationales, which standard methods do not train: their runs go without them.
RATIONALE_ONLY_FLAGS = ("--eval_rationales",)
# run.py's flags that name the distillation teacher: passed to the runs with --kd_weight > 0 only.
KD_SOURCE_FLAGS = ("--kd_teacher", "--kd_logits")
# submitit's executor for --slurm; the tests use its "local" one, which runs the jobs as processes on this machine.
SLURM_CLUSTER = "slurm"
SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# prctl's option that has the kernel signal a process when its parent dies (Linux).
PR_SET_PDEATHSIG = 1
# After Ctrl-C, how long a run has to write its last line before it is told to stop.
INTERRUPT_GRACE_S = 5.0


def slurm_minutes(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes, rounded up."""
    match = SLURM_TIME.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected minutes, HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, first, second, third = (int(part) if part else None for part in match.groups())
    if days is None:
        # minutes | minutes:seconds | hours:minutes:seconds
        hours, minutes, seconds = (first, second, third) if third is not None else (0, first, second or 0)
    else:
        # days-hours | days-hours:minutes | days-hours:minutes:seconds
        hours, minutes, seconds = first, second or 0, third or 0
    total = (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return -(-total // 60)


def slurm_memory(text: str) -> str:
    if not re.fullmatch(r"\d+[KMGT]?", text):
        raise argparse.ArgumentTypeError(f"expected a size such as 32G or 64000M, got {text!r}")
    return text


def slurm_option(text: str) -> tuple[str, str]:
    key, equals, value = text.removeprefix("--").partition("=")
    if not equals or not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
        raise argparse.ArgumentTypeError(f"expected an sbatch option as KEY=VALUE (such as account=abc), got {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Any other flag (--dataset, --from_pretrained, --output_dir, ...) is passed to run.py.",
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    add("--seeds", nargs="+", type=cli.seed, default=[0], help="values of run.py --run")
    add("--alphas", nargs="+", type=cli.unit_interval, default=[0.5],
        help="label-loss weights; only the task_prefix methods (dss_*) run once per alpha")
    add("--fractions", nargs="+", type=cli.fraction, default=[0.125, 0.25, 0.5, 1.0],
        help="values of run.py --subsample (the paper's by default)")
    add("--rationale_modes", nargs="+", default=["first"], choices=RATIONALE_MODES,
        help="values of run.py --rationales; dss_* run once per mode, standard_distill once for first/all/correct "
        "(its labels are the first sample's) and once for vote")
    add("--kd_weights", nargs="+", type=cli.non_negative_float, default=[0.0],
        help="values of run.py --kd_weight (beta, token-level distillation; > 0 needs --kd_teacher or --kd_logits)")
    add("--print", action="store_true", help="print the pending runs' commands, one per line, and run nothing")
    slurm = parser.add_argument_group("Slurm (through submitit: uv sync --extra slurm)")
    slurm.add_argument("--slurm", action="store_true",
                       help="submit the pending runs as one Slurm job array and return; run it again to resubmit "
                       "what is unfinished")
    slurm.add_argument("--slurm_partition", help="partition (default: the cluster's)")
    slurm.add_argument("--slurm_gpus", type=cli.non_negative_int, default=1, help="GPUs per run")
    slurm.add_argument("--slurm_time", type=slurm_minutes, default=slurm_minutes("24:00:00"),
                       help="time limit per run: minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    slurm.add_argument("--slurm_mem", type=slurm_memory, help="memory per run, such as 64G (default: the cluster's)")
    slurm.add_argument("--slurm_arg", type=slurm_option, action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, repeatable: --slurm_arg account=abc --slurm_arg qos=high")
    args, passthrough = parser.parse_known_args(argv)
    if args.slurm and args.print:
        parser.error("--slurm submits the runs and --print only prints them: choose one")
    given = [flag for flag in ("slurm_partition", "slurm_mem") if getattr(args, flag) is not None]
    given += ["slurm_arg"] if args.slurm_arg else []
    given += [flag for flag in ("slurm_gpus", "slurm_time") if getattr(args, flag) != parser.get_default(flag)]
    if given and not args.slurm:
        parser.error(f"--{given[0]} is for --slurm: add --slurm, or leave it out")
    if args.slurm and importlib.util.find_spec("submitit") is None:
        parser.error("--slurm needs the submitit package, which is not installed: uv sync --extra slurm "
                     "(or pip install submitit)")
    for token in passthrough:
        name = token.split("=", 1)[0]
        # argparse accepts unambiguous prefixes (--sub for --subsample), so match those too.
        clash = [flag for flag in GRID_FLAGS if len(name) > 2 and flag.startswith(name)]
        if clash:
            parser.error(f"{token}: sweep.py sets {clash[0]} for each run; use --methods/--seeds/--alphas/--fractions"
                         "/--rationale_modes/--kd_weights")
    if any(beta > 0 for beta in args.kd_weights) and not kd_source(passthrough)[1]:
        parser.error("--kd_weights above 0 distil from a teacher: pass --kd_teacher or --kd_logits")
    return args, passthrough


def kd_source(passthrough: list[str]) -> tuple[list[str], list[str]]:
    """(passthrough less the teacher flags of KD_SOURCE_FLAGS, those flags with their values)."""
    rest, source = [], []
    tokens = iter(passthrough)
    for token in tokens:
        if token.split("=", 1)[0] in KD_SOURCE_FLAGS:
            source += [token] if "=" in token else [token, next(tokens, "")]
        else:
            rest.append(token)
    return rest, source


def method_modes(flags: list[str], modes: list[str]) -> list[str]:
    """The --rationales values that change a method's training: all for task_prefix; for standard distillation only
    the label, so first/all/correct are one run (as first) and vote another; none for standard finetuning."""
    if "task_prefix" in flags:
        return list(dict.fromkeys(modes))
    if "llm" in flags:
        return list(dict.fromkeys("vote" if mode == "vote" else "first" for mode in modes))
    return ["first"]


def run_argvs(args: argparse.Namespace, passthrough: list[str]) -> list[list[str]]:
    """run.py's argv for each run of the grid; seeds outermost, so an early stop leaves whole seeds done."""
    argvs = []
    without_teacher, teacher = kd_source(passthrough)
    for seed in dict.fromkeys(args.seeds):
        for fraction in dict.fromkeys(args.fractions):
            for method in dict.fromkeys(args.methods):
                flags = METHODS[method]
                # alpha weighs the rationale loss, which standard models do not have: one run at run.py's default.
                alphas = dict.fromkeys(args.alphas) if "task_prefix" in flags else [None]
                shared = [token for token in without_teacher
                          if "task_prefix" in flags or token not in RATIONALE_ONLY_FLAGS]
                for mode in method_modes(flags, args.rationale_modes):
                    for alpha in alphas:
                        grid = [*flags, "--run", str(seed), "--subsample", str(fraction), "--resume"]
                        if alpha is not None:
                            grid += ["--alpha", str(alpha)]
                        if mode != "first":  # the paper's choice is run.py's default: its argv stays as it was
                            grid += ["--rationales", mode]
                        for beta in dict.fromkeys(args.kd_weights):  # beta 0: the argv without distillation
                            kd = ["--kd_weight", str(beta), *teacher] if beta > 0 else []
                            argvs.append(shared + grid + kd)
    return argvs


def results_path(argv: list[str]) -> Path:
    """Where the run writes results.json, computed as run.py does (this also checks every flag up front)."""
    config = run.parse_args(argv)
    ckpt_dir, _ = config.run_dirs(data_parallel_size(config.student.parallelize))
    return ckpt_dir / "results.json"


def submit_to_slurm(args: argparse.Namespace, pending: list[list[str]], folder: Path, cluster: str) -> list:
    """One job array, a task per run, each running run.py from this directory with this Python; submitit keeps
    each task's log, pickles and result under folder/<job id>/."""
    import submitit
    from submitit.helpers import CommandFunction

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    executor.update_parameters(
        name="dss-sweep", timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
        slurm_partition=args.slurm_partition, slurm_mem=args.slurm_mem,
        slurm_additional_parameters=dict(args.slurm_arg) or None,
    )
    with executor.batch():
        return [executor.submit(CommandFunction([sys.executable, str(RUN_PY), *argv], cwd=os.getcwd()))
                for argv in pending]


def jobs_in_queue(folder: Path) -> dict[str, str]:
    """results.json path -> id of the latest job recorded for that run, for the runs whose job is still in Slurm's
    queue (pending or running): submitting them again would start them twice."""
    records = folder / "jobs.jsonl"
    if not records.is_file():
        return {}
    latest = {}
    for line in records.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        latest[record["results"]] = record["job_id"]
    # -r lists each array task on its own line (4242_0, 4242_1, ...), pending ones included.
    queue = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"], capture_output=True,
                           text=True, check=True)
    queued = set(queue.stdout.split())
    return {results: job_id for results, job_id in latest.items() if job_id in queued}


def slurm_main(args: argparse.Namespace, plan: list[tuple[list[str], Path]],
               pending: list[tuple[list[str], Path]]) -> int:
    """Submit the pending runs not already in the queue; print and record (in <output_dir>/slurm/jobs.jsonl) each
    job id and log path."""
    if not pending:
        print(f"sweep: nothing to submit, all {len(plan)} runs are finished")
        return 0
    folder = Path(run.parse_args(pending[0][0]).output.output_dir).resolve() / "slurm"
    queued = {}
    if SLURM_CLUSTER == "slurm":
        missing = [command for command in ("sbatch", "srun", "squeue") if shutil.which(command) is None]
        if missing:
            print(f"error: --slurm needs Slurm's {missing[0]}, which is not on PATH: run sweep.py on the cluster's "
                  "login node, or use --print to get the commands", file=sys.stderr)
            return 1
        try:
            queued = jobs_in_queue(folder)
        except subprocess.CalledProcessError as e:
            print(f"error: squeue failed ({e.stderr.strip() or e.returncode}): cannot tell which runs are still "
                  "queued", file=sys.stderr)
            return 1
    waiting = [(argv, results) for argv, results in pending if str(results.resolve()) in queued]
    for argv, results in waiting:
        print(f"still queued or running as job {queued[str(results.resolve())]}: "
              f"{shlex.join([sys.executable, str(RUN_PY), *argv])}")
    to_submit = [(argv, results) for argv, results in pending if str(results.resolve()) not in queued]
    from submitit.core.utils import FailedJobError

    try:
        jobs = submit_to_slurm(args, [argv for argv, _ in to_submit], folder, SLURM_CLUSTER) if to_submit else []
    except FailedJobError as e:
        reason = (str(e).strip().splitlines() or ["no message"])[-1]
        print(f"error: sbatch refused the jobs ({reason}); check the --slurm_* flags", file=sys.stderr)
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(folder / "jobs.jsonl", "a", encoding="utf-8") as records:
        for job, (argv, results) in zip(jobs, to_submit):
            command = shlex.join([sys.executable, str(RUN_PY), *argv])
            print(f"job {job.job_id}: {command}\n    log: {job.paths.stdout}", flush=True)
            records.write(json.dumps({"job_id": job.job_id, "submitted": submitted, "command": command,
                                      "results": str(results.resolve()), "stdout": str(job.paths.stdout),
                                      "stderr": str(job.paths.stderr)}) + "\n")
    print(f"sweep: {len(plan)} runs: {len(jobs)} submitted, {len(waiting)} still in the queue, "
          f"{len(plan) - len(pending)} skipped (finished); job ids and logs in {folder / 'jobs.jsonl'}; "
          "run the same command again to resubmit unfinished runs")
    return 0


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
    if args.slurm:
        return slurm_main(args, plan, pending)
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
