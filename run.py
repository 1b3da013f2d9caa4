"""Distilling step-by-step: train a T5 student on labels and teacher rationales (Hsieh et al., 2023).

    python run.py --dataset cqa --from_pretrained google/t5-v1_1-base --model_type task_prefix --label_type llm
"""

import argparse
import importlib.util
import math
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from data_utils import DATA_URL, DATASETS, DataError, fetch_data, load_data, subsample
from metrics import METRICS

# Kept here rather than imported from train_utils, so a mistyped flag is answered before torch loads.
OPTIMIZER_NAMES = ("AdamW", "Adafactor")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def folder_name(text: str) -> bool:
    """A single folder name: letters, digits, . _ -, and not . or .. (which would leave the data folder)."""
    return bool(re.fullmatch(r"[\w.-]+", text)) and text.strip(".") != ""


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(DATASETS),
        help="which dataset of datasets.zip, or custom (your own, in <data_dir>/custom/)")
    add("--from_pretrained", default="google/t5-v1_1-base", help="student: hub id or local model directory")
    add("--model_type", default="task_prefix", choices=["task_prefix", "standard"],
        help="task_prefix: distilling step-by-step (label + rationale); standard: input -> label only")
    add("--label_type", default="gt", choices=["gt", "llm"], help="train on ground-truth or teacher labels")
    add("--llm", default="palm", help="teacher outputs: palm (<data>/<name>/llm/), gpt (<data>/gpt-neox/<name>/), "
        "none (no rationales), dataset (the rows' own 'rationale' field), or the name of a folder beside llm/ "
        "holding another teacher's chunks (see annotate.py)")
    add("--custom_metric", choices=sorted(METRICS), help="--dataset custom: compare labels as text (default) or "
        "by arithmetic value (equation)")
    add("--alpha", type=unit_interval, default=0.5, help="weight of the label loss; 1 - alpha weighs rationales")
    add("--batch_size", type=positive_int, default=64, help="per-device training batch size")
    add("--eval_batch_size", type=positive_int, default=None,
        help="evaluation batch size (default: 4 x --batch_size: generation needs far less memory per row than training)")
    add("--grad_steps", type=positive_int, default=1, help="gradient accumulation steps")
    add("--max_input_length", type=positive_int, default=1024, help="input tokens kept (truncation)")
    add("--eval_steps", type=positive_int, default=250, help="evaluate and checkpoint every N steps")
    add("--max_steps", type=positive_int, default=10000, help="training steps")
    add("--lr", type=positive_float, default=5e-5, help="learning rate")
    add("--optimizer_name", default="AdamW", choices=OPTIMIZER_NAMES, help="optimizer")
    add("--run", type=non_negative_int, default=0, help="seed: data subsample, shuffling and dropout")
    add("--subsample", type=fraction, default=1.0, help="fraction of train used (seeded by --run)")
    add("--max_eval_samples", type=positive_int, default=None,
        help="for debugging and smoke tests: evaluate on the first N rows of valid/test only (not the paper's protocol)")
    add("--gen_max_len", type=positive_int, default=64, help="tokens generated per prediction at evaluation")
    add("--output_rationale", action="store_true", help="also generate rationales at evaluation and record them")
    add("--bf16", action="store_true", help="bfloat16 mixed precision")
    add("--no_log", action="store_true", help="no TensorBoard logs")
    add("--parallelize", action="store_true", help="split the model across all visible GPUs (models too big for one)")
    add("--deepspeed", metavar="JSON", help="DeepSpeed config (such as configs/ds_zero3.json) for the Trainer; "
        "launch with torchrun, accelerate launch or deepspeed")
    # Passed by the deepspeed launcher and torch.distributed.launch; the LOCAL_RANK variable they also set is used.
    add("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    add("--data_dir", default="./datasets", help="the unzipped datasets.zip folder")
    add("--output_dir", default=".", help="where logs/ and ckpts/ are written")
    add("--select_on", default="test", choices=["test", "valid"],
        help="test: report the best test accuracy seen in training (the paper); valid: pick the checkpoint "
        "by valid accuracy and report its test accuracy")
    add("--save_total_limit", type=positive_int, default=1,
        help="checkpoints kept during training besides the best one (the latest ones, for --resume)")
    add("--resume", action="store_true", help="continue this configuration's run from its latest checkpoint")
    add("--overwrite", action="store_true", help="delete this configuration's earlier logs and checkpoints first")
    add("--download", action="store_true", help=f"fetch and unpack the paper's datasets.zip into --data_dir if missing")
    add("--data_url", default=DATA_URL, help="where --download fetches datasets.zip from (URL or local path)")
    args = parser.parse_args(argv)

    if args.llm == "none" and args.label_type == "llm":
        parser.error("--label_type llm needs teacher labels: choose --llm palm/gpt/<folder> or --label_type gt")
    if args.llm == "none" and args.model_type == "task_prefix":
        parser.error("--model_type task_prefix needs teacher rationales: choose --llm palm/gpt/<folder> "
                     "or --model_type standard")
    if args.llm == "dataset" and args.label_type == "llm":
        parser.error("--llm dataset has rationales but no teacher labels: use --label_type gt")
    spec = DATASETS[args.dataset]
    if args.llm in ("palm", "gpt") and not spec.from_paper:
        parser.error(f"--dataset {args.dataset} has no PaLM/GPT outputs: annotate it with annotate.py and pass "
                     "--llm <llm_name>, or choose --llm dataset/none")
    if args.custom_metric and spec.from_paper:
        parser.error(f"--custom_metric is for --dataset custom; {args.dataset} is scored as in the paper")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: choose one")
    if args.parallelize and args.deepspeed:
        parser.error("--parallelize and --deepspeed both place the model: choose one")
    if args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed {args.deepspeed!r}: no such file")
    if not folder_name(args.llm):
        parser.error(f"--llm {args.llm!r}: expected palm, gpt, none or a folder name")
    if not Path(args.from_pretrained).is_dir() and not HUB_ID.fullmatch(args.from_pretrained):
        parser.error(f"--from_pretrained {args.from_pretrained!r} is neither a readable directory nor a hub id "
                     "(such as google/t5-v1_1-base)")
    return args


def check_devices(args: argparse.Namespace) -> None:
    """Refuse what this machine or launch cannot serve, before anything is loaded."""
    import torch

    from train_utils import RunError

    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise RunError("--deepspeed needs the deepspeed package, which is not installed: pip install deepspeed")
    if args.parallelize and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunError("--parallelize splits one model over all GPUs from a single process: run it with python, "
                       "not with several processes from torchrun or accelerate launch")
    if args.parallelize and torch.cuda.device_count() < 2:
        raise RunError(f"--parallelize needs at least two visible GPUs; {torch.cuda.device_count()} found")


def load_student(args: argparse.Namespace):
    """Tokenizer and model from a local directory or the hub; --parallelize spreads the model over GPUs."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from recovery import check_tokenizer
    from train_utils import RunError

    placement = {"device_map": "auto"} if args.parallelize else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.from_pretrained)
        model = T5ForConditionalGeneration.from_pretrained(args.from_pretrained, dtype=torch.float32, **placement)
    except Exception as e:  # noqa: BLE001 - OSError, or the weight loaders' own errors for truncated files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"could not load --from_pretrained {args.from_pretrained!r} ({first_line}); "
                       "pass a local directory holding a saved T5 model and tokenizer, or a reachable hub id") from None
    check_tokenizer(tokenizer, f"--from_pretrained {args.from_pretrained}")
    return tokenizer, model


def metric_name(args: argparse.Namespace) -> str:
    return args.custom_metric or DATASETS[args.dataset].metric


def prepare_splits(args: argparse.Namespace, eos: str):
    """The paper's data pipeline: load, carve valid, subsample, then swap in teacher labels if asked."""
    if not Path(args.data_dir).is_dir() and DATASETS[args.dataset].from_paper:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DataError(f"data folder {args.data_dir} not found: download {DATA_URL} and unzip it there before "
                            "launching several processes (they must not all fetch it at once)")
        fetch_data(args.data_url, Path(args.data_dir), ask=not args.download)
    splits = load_data(args.dataset, args.data_dir, llm=args.llm, eos=eos)
    splits["train"] = subsample(splits["train"], args.subsample, seed=args.run)
    if args.label_type == "llm":
        from train_utils import is_main_process

        if is_main_process():
            score = METRICS[metric_name(args)]
            print(f"LLM Train Acc: {score(list(splits['train']['llm_label']), list(splits['train']['label'])):.4f}")
            print(f"LLM Test Acc: {score(list(splits['test']['llm_label']), list(splits['test']['label'])):.4f}")
        splits["train"] = splits["train"].remove_columns("label").rename_column("llm_label", "label")
    if args.llm != "none":
        for name in splits:
            splits[name] = splits[name].rename_column("llm_rationale", "rationale")
    # Only what is evaluated gets tokenised: valid only when it selects the checkpoint.
    if args.select_on != "valid":
        del splits["valid"]
    if args.max_eval_samples:
        for name in splits.keys() - {"train"}:
            splits[name] = splits[name].select(range(min(args.max_eval_samples, len(splits[name]))))
    return splits


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's pre-emption, a sweep that stops) ends the run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """The run, as its folder's only writer; Ctrl-C and SIGTERM end it with a line saying how to go on."""
    args = parse_args(argv)
    from recovery import Interrupted, RunError, run_folder
    from train_utils import is_main_process, run_dirs

    try:
        with sigterm_as_interrupt(), run_folder(*run_dirs(args), is_main_process()):
            return run_training(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130


def run_training(args: argparse.Namespace) -> int:
    from recovery import FaultGuard, check_same_run, faults_explained
    from train_utils import RunError, is_main_process, run_dirs, tokenize, train_and_evaluate, training_arguments

    try:
        check_devices(args)
        ckpt_dir, log_dir = run_dirs(args)
        if args.resume and (ckpt_dir / "results.json").is_file():
            if is_main_process():
                print(f"run already finished: see {ckpt_dir / 'results.json'}")
            return 0
        if args.resume:
            check_same_run(args, ckpt_dir)
        # Before the student: a launched run's process group and a ZeRO-3 config must exist when weights load.
        training_args = training_arguments(args, ckpt_dir, log_dir)
        tokenizer, model = load_student(args)
        splits = prepare_splits(args, tokenizer.eos_token)
        tokenized = tokenize(splits, tokenizer, args.model_type, args.max_input_length)
        guard = FaultGuard()
        with faults_explained(guard, ckpt_dir, model):
            record = train_and_evaluate(args, training_args, model, tokenizer, tokenized, metric_name(args), guard)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if record is not None:
        print(f"best test accuracy {record['best_test_accuracy']:.4f}; "
              f"selected ({args.select_on}) test accuracy {record['selected_test_accuracy']:.4f}; "
              f"results in {ckpt_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
