"""Distilling step-by-step: train a student (T5, BART, any seq2seq or decoder-only causal LM, fully or with LoRA) on
labels and teacher rationales (Hsieh et al., 2023).

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

STARTUP_INTERRUPTED = "interrupted before training started; nothing was written"


def _stop_while_starting(signum, frame):
    print(STARTUP_INTERRUPTED, file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM while this module's imports load end with the line main() gives, not a traceback or a silent
    # exit 143; main() takes over from its first line.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    signal.signal(signal.SIGINT, _stop_while_starting)

from cli import first_line, fraction, folder_name, positive_float, positive_int, seed, unit_interval
from data_utils import DATA_URL, DATASETS, DataError, load_data
from download import fetch_data
from metrics import METRICS
from rationales import (
    RATIONALE_MODES,
    audit,
    choose_rationales,
    describe_audit,
    describe_counts,
    kept_counts,
    tokenize_kept_rationales,
)

# Kept here rather than imported from train_utils, so a mistyped flag is answered before torch loads.
OPTIMIZER_NAMES = ("AdamW", "Adafactor")
# --gen_max_len's default, the original's generation_max_length; predict.py generates one token less by default.
GEN_MAX_LEN = 64

# --report_to name -> (the package it needs, how to install it); checked here, before torch loads.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "uv sync (it is a core dependency)"),
    "wandb": ("wandb", "uv sync --extra wandb (or pip install wandb)"),
    "mlflow": ("mlflow", "uv sync --extra mlflow (or pip install mlflow)"),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(DATASETS),
        help="which dataset of datasets.zip, or custom (your own, in <data_dir>/custom/)")
    add("--from_pretrained", default="google/t5-v1_1-base",
        help="student: hub id or local model directory of any seq2seq or causal LM (family read from its config)")
    add("--model_type", default="task_prefix", choices=["task_prefix", "standard"],
        help="task_prefix: distilling step-by-step (label + rationale); standard: input -> label only")
    add("--label_type", default="gt", choices=["gt", "llm"], help="train on ground-truth or teacher labels")
    add("--llm", default="palm", help="teacher outputs: palm (<data>/<name>/llm/), gpt (<data>/gpt-neox/<name>/), "
        "none (no rationales), dataset (the rows' own 'rationale' field), or the name of a folder beside llm/ "
        "holding another teacher's chunks (see annotate.py)")
    add("--custom_metric", choices=sorted(METRICS), help="--dataset custom: compare labels as text (default) or "
        "by arithmetic value (equation)")
    add("--rationales", default="first", choices=RATIONALE_MODES,
        help="which teacher samples become rationale rows: first (the paper), all, correct (label matches gold), "
        "vote (majority label, agreeing rationales); see README, Choosing rationales")
    add("--alpha", type=unit_interval, default=0.5, help="weight of the label loss; 1 - alpha weighs rationales")
    add("--batch_size", type=positive_int, default=64, help="per-device training batch size")
    add("--eval_batch_size", type=positive_int, default=None,
        help="evaluation batch size (default: 4 x --batch_size on a GPU, 8 x on a CPU: generation needs far less "
        "memory per row than training)")
    add("--grad_steps", type=positive_int, default=1, help="gradient accumulation steps")
    add("--max_input_length", type=positive_int, default=1024, help="input tokens kept (truncation)")
    add("--eval_steps", type=positive_int, default=250, help="evaluate and checkpoint every N steps")
    add("--max_steps", type=positive_int, default=10000, help="training steps")
    add("--lr", type=positive_float, default=5e-5, help="learning rate")
    add("--optimizer_name", default="AdamW", choices=OPTIMIZER_NAMES, help="optimizer")
    add("--run", type=seed, default=0, help="seed: data subsample, shuffling and dropout")
    add("--subsample", type=fraction, default=1.0, help="fraction of train used (seeded by --run)")
    add("--max_eval_samples", type=positive_int, default=None,
        help="for debugging and smoke tests: evaluate on the first N rows of valid/test only (not the paper's protocol)")
    add("--gen_max_len", type=positive_int, default=GEN_MAX_LEN, help="generation length at evaluation, counting the "
        "decoder's start token as the original's generation_max_length did (64: up to 63 generated tokens)")
    add("--fixed_valid", action="store_true", help="hold out valid (10%%, seed 0) from the whole train file before "
        "--subsample, so every fraction and seed shares it (the original holds it out of the subsample)")
    add("--tolerant_equations", action="store_true", help="svamp/asdiv/--custom_metric equation: values within 1e-9 "
        "(relative or absolute) count as equal (the original: exact equality)")
    add("--dump_data", metavar="FILE", help="write every prepared row (text and token ids, train/valid/test) to FILE "
        "as JSON lines and exit without training; needs only the tokenizer of --from_pretrained")
    add("--output_rationale", action="store_true", help="also generate rationales at evaluation and record them")
    add("--bf16", action="store_true", help="bfloat16 mixed precision")
    add("--gradient_checkpointing", action="store_true",
        help="recompute activations in the backward pass: less memory, one more forward pass per step")
    add("--chat_template", action="store_true",
        help="decoder-only students: wrap prompts in the tokenizer's chat template (instruct models)")
    add("--lora_r", type=positive_int, default=None, help="train LoRA adapters of this rank instead of all weights")
    add("--lora_alpha", type=positive_float, default=16.0, help="LoRA scaling numerator (scale = alpha / r)")
    add("--lora_dropout", type=unit_interval, default=0.05, help="dropout on the LoRA branch")
    add("--lora_targets", nargs="+", metavar="MODULE", default=None,
        help="module names LoRA adapts (default: the family's attention and MLP projections, see students.py)")
    add("--report_to", nargs="+", default=["tensorboard"], choices=[*TRACKERS, "none"], metavar="TRACKER",
        help=f"where training is logged, one or more of {', '.join(TRACKERS)}; or none")
    add("--no_log", action="store_true", help="log nowhere (the same as --report_to none)")
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
    add("--download", action="store_true", help="fetch and unpack the paper's datasets.zip into --data_dir if missing")
    add("--data_url", default=DATA_URL, help="where --download fetches datasets.zip from (URL or local path)")
    add("--cache_dir", default=None, help="where tokenised splits are kept for reruns, resumes and sweeps "
        "(default: $DSS_CACHE, else ~/.cache/dss)")
    add("--no_cache", action="store_true", help="tokenise without reading or writing the cache")
    args = parser.parse_args(argv)

    if args.llm == "none" and args.label_type == "llm":
        parser.error("--label_type llm needs teacher labels: choose --llm palm/gpt/<folder> or --label_type gt")
    if args.llm == "none" and args.model_type == "task_prefix":
        parser.error("--model_type task_prefix needs teacher rationales: choose --llm palm/gpt/<folder> "
                     "or --model_type standard")
    if args.llm == "dataset" and args.label_type == "llm":
        parser.error("--llm dataset has rationales but no teacher labels: use --label_type gt")
    if args.rationales != "first" and args.llm in ("none", "dataset"):
        parser.error(f"--rationales {args.rationales} chooses among teacher samples: use it with --llm "
                     "palm/gpt/<folder>, or leave --rationales first")
    if args.rationales in ("all", "correct") and args.model_type == "standard":
        parser.error(f"--rationales {args.rationales} chooses rationales, which --model_type standard does not train "
                     "on: use --model_type task_prefix, or --rationales vote for voted teacher labels")
    spec = DATASETS[args.dataset]
    if args.llm in ("palm", "gpt") and not spec.from_paper:
        parser.error(f"--dataset {args.dataset} has no PaLM/GPT outputs: annotate it with annotate.py and pass "
                     "--llm <llm_name>, or choose --llm dataset/none")
    if args.llm == "gpt" and spec.parse_gpt is None:
        parser.error(f"--llm gpt: the paper has no GPT-NeoX outputs for --dataset {args.dataset}; choose --llm palm")
    if args.custom_metric and spec.from_paper:
        parser.error(f"--custom_metric is for --dataset custom; {args.dataset} is scored as in the paper")
    if args.no_log:
        if args.report_to != parser.get_default("report_to"):
            parser.error("--no_log and --report_to both say where to log: choose one")
        args.report_to = ["none"]
    args.report_to = list(dict.fromkeys(args.report_to))
    if "none" in args.report_to and len(args.report_to) > 1:
        parser.error("--report_to none logs nowhere: pass it alone")
    for tracker in [name for name in args.report_to if name != "none"]:
        package, install = TRACKERS[tracker]
        if importlib.util.find_spec(package) is None:
            parser.error(f"--report_to {tracker} needs the {package} package, which is not installed: {install}")
    if args.gen_max_len < 2:
        parser.error("--gen_max_len counts the decoder's start token, as the original's generation_max_length: "
                     "use 2 or more")
    if args.tolerant_equations and (args.custom_metric or spec.metric) != "equation":
        parser.error(f"--tolerant_equations applies to equation answers; --dataset {args.dataset} is scored as text")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: choose one")
    if args.parallelize and args.deepspeed:
        parser.error("--parallelize and --deepspeed both place the model: choose one")
    if args.deepspeed and not Path(args.deepspeed).is_file():
        parser.error(f"--deepspeed {args.deepspeed!r}: no such file")
    if not folder_name(args.llm):
        parser.error(f"--llm {args.llm!r}: expected palm, gpt, none or a folder name")
    if args.lora_r is None and args.lora_targets:
        parser.error("--lora_targets needs --lora_r (the adapters' rank)")
    if args.lora_r and (args.parallelize or args.deepspeed):
        parser.error("--lora_r is not supported with --parallelize or --deepspeed: train LoRA on one GPU or with "
                     "torchrun/accelerate data parallel")
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


HUB_REMEDIES = ("pass --from_pretrained a local directory holding a saved model and tokenizer, set HF_HUB_OFFLINE=1 "
                "with the model in the Hugging Face cache (HF_HOME), or set HF_ENDPOINT to a reachable mirror")
# transformers 5 ties every T5's head to its embeddings and warns when a checkpoint (t5-v1_1, and every student
# saved from one) has its own head, which it then keeps as saved; the Trainer, reloading the best checkpoint, warns
# that the embeddings tied to `shared` are not in it (they are saved once, as `shared`). Both are what these models
# are, on every run, and a user cannot act on them.
UNTIED_HEAD_NOTICE = "to tie shared.weight to lm_head.weight, but both are present in the checkpoints with different"
MISSING_KEYS_NOTICE = re.compile(r"There were missing keys in the checkpoint model loaded: \[([^\]]*)\]")
T5_TIED_KEYS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}


def without_tied_weight_notices(record) -> bool:
    message = record.getMessage()
    missing = MISSING_KEYS_NOTICE.search(message)
    if missing:
        return not set(re.findall(r"'([^']+)'", missing.group(1))) <= T5_TIED_KEYS
    return UNTIED_HEAD_NOTICE not in message


def quiet_tied_weight_notices() -> None:
    """Drop transformers' warnings about a T5 checkpoint's tied and untied weights: harmless, and not actionable."""
    from transformers.utils import logging

    for name in ("transformers.modeling_utils", "transformers.trainer"):
        logging.get_logger(name).addFilter(without_tied_weight_notices)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint (HF_ENDPOINT) gives no answer, or None when it answers: one request and no retries,
    bounded in time even where name resolution hangs, instead of transformers' minute of retries per file."""
    import threading

    from huggingface_hub import constants, get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP status is an answer
            outcome.append(None)
        except Exception as e:  # whatever the HTTP stack raises, there was no answer
            outcome.append(first_line(e))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_options(name: str) -> dict:
    """from_pretrained options for a hub id: none while the hub answers; local_files_only where it does not but the
    model is cached; where neither, a RunError naming the remedies."""
    from huggingface_hub import constants, try_to_load_from_cache

    from train_utils import RunError

    if Path(name).is_dir() or constants.is_offline_mode():
        return {}
    reason = hub_unreachable()
    if reason is None:
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        print(f"the hub ({constants.ENDPOINT}) cannot be reached: using the cached copy of {name}", file=sys.stderr)
        return {"local_files_only": True}
    raise RunError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) to fetch {name!r}, "
                   f"and it is not in the local cache: {HUB_REMEDIES}")


def load_student(args: argparse.Namespace):
    """Tokenizer and model (seq2seq or causal LM, LoRA-wrapped with --lora_r) from a local directory or the hub;
    --parallelize spreads the model over GPUs."""
    from recovery import check_tokenizer
    from students import UnsupportedStudent, add_lora, load_student as load, parameter_counts
    from train_utils import RunError, is_main_process

    placement = {"device_map": "auto"} if args.parallelize else {}
    source = hub_options(args.from_pretrained)
    quiet_tied_weight_notices()
    try:
        family, tokenizer, model = load(args.from_pretrained, source=source, **placement)
    except UnsupportedStudent as e:
        raise RunError(f"--from_pretrained {e}") from None
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, or the weight loaders' own errors for truncated files
        raise RunError(f"could not load --from_pretrained {args.from_pretrained!r} ({first_line(e)}); pass a local "
                       "directory holding a saved seq2seq or causal LM and its tokenizer, or a reachable hub "
                       "id") from None
    check_tokenizer(tokenizer, f"--from_pretrained {args.from_pretrained}")
    chat_template = getattr(args, "chat_template", False)  # bench.py passes only what loading needs
    if chat_template and not family.prompt_in_output:
        raise RunError(f"--chat_template is for decoder-only students; {args.from_pretrained} is {family.name}: "
                       "drop --chat_template")
    if chat_template and not tokenizer.chat_template:
        raise RunError(f"--chat_template: the tokenizer of {args.from_pretrained} has no chat template; use an "
                       "instruct model or drop --chat_template")
    if getattr(args, "lora_r", None):
        try:
            model = add_lora(model, args)
        except ValueError as e:  # peft: target modules not found in the model
            raise RunError(f"--lora_targets: {first_line(e)}; name modules of "
                           f"{model.config.model_type} (see print(model)) or leave --lora_targets out") from None
    if is_main_process():
        trainable, total = parameter_counts(model)
        print(f"student {model.config.model_type} ({family.name}): {trainable:,} of {total:,} parameters trainable")
    return tokenizer, model


def ensure_data(args: argparse.Namespace) -> None:
    """A missing data folder is fetched (or offered) before any model loads, so a first run learns of it at once."""
    if not Path(args.data_dir).is_dir() and DATASETS[args.dataset].from_paper:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DataError(f"data folder {args.data_dir} not found: download {DATA_URL} and unzip it there before "
                            "launching several processes (they must not all fetch it at once)")
        fetch_data(args.data_url, Path(args.data_dir), ask=not args.download, dataset=args.dataset)


def metric_name(args: argparse.Namespace) -> str:
    name = args.custom_metric or DATASETS[args.dataset].metric
    return "equation_tolerant" if name == "equation" and args.tolerant_equations else name


def uses_samples(args: argparse.Namespace) -> bool:
    """Whether every teacher sample is loaded: to choose among them, or for the teacher audit of --label_type llm."""
    return args.llm not in ("none", "dataset") and (args.rationales != "first" or args.label_type == "llm")


def teacher_audits(args: argparse.Namespace, splits) -> dict[str, dict]:
    """The teacher audit (rationales.audit) of train, as subsampled, and of test."""
    classes = DATASETS[args.dataset].classes
    return {name: audit(splits[name]["llm_labels"], splits[name]["label"], metric_name(args), classes)
            for name in ("train", "test")}


def prepare_splits(args: argparse.Namespace, eos: str, record: dict | None = None):
    """The paper's data pipeline: load, subsample, carve valid, then swap in teacher labels if asked.
    With --rationales other than first, train gets the `rationales` chosen per input (rationales.py). `record`, if
    given, receives what results.json keeps of this: the teacher audit and the kept counts."""
    record = {} if record is None else record
    splits = load_data(args.dataset, args.data_dir, llm=args.llm, eos=eos, fraction=args.subsample, seed=args.run,
                       fixed_valid=args.fixed_valid, samples=uses_samples(args))
    from train_utils import is_main_process

    if args.label_type == "llm":
        record["teacher_audit"] = teacher_audits(args, splits)
        if is_main_process():
            score = METRICS[metric_name(args)]
            print(f"LLM Train Acc: {score(list(splits['train']['llm_label']), list(splits['train']['label'])):.4f}")
            print(f"LLM Test Acc: {score(list(splits['test']['llm_label']), list(splits['test']['label'])):.4f}")
            for name, split_audit in record["teacher_audit"].items():
                print(describe_audit(name, split_audit))
    if args.rationales != "first":
        splits["train"] = choose_rationales(splits["train"], args.rationales, metric_name(args))
        record["rationale_counts"] = kept_counts(splits["train"], args.rationales)
        if is_main_process():
            print(describe_counts(record["rationale_counts"]))
    if uses_samples(args):  # what is kept of the samples is in `rationales` and `llm_label` now
        for name in splits:
            splits[name] = splits[name].remove_columns(["llm_rationales", "llm_labels"])
    if args.label_type == "llm":
        splits["train"] = splits["train"].remove_columns("label").rename_column("llm_label", "label")
    if args.llm != "none":
        for name in splits:
            splits[name] = splits[name].rename_column("llm_rationale", "rationale")
    # Only what is evaluated gets tokenised: valid only when it selects the checkpoint (or is dumped).
    if args.select_on != "valid" and not args.dump_data:
        del splits["valid"]
    if args.max_eval_samples:
        for name in splits.keys() - {"train"}:
            splits[name] = splits[name].select(range(min(args.max_eval_samples, len(splits[name]))))
    return splits


def dump_data(args: argparse.Namespace) -> None:
    """--dump_data: the prepared rows and their token ids, from the tokenizer alone (no model weights are read)."""
    from transformers import AutoTokenizer

    from train_utils import RunError, write_prepared_rows
    from views import tokenize_seq2seq

    path = Path(args.dump_data)
    if path.exists():
        raise RunError(f"--dump_data {path} already exists: remove it or choose another file")
    if not path.parent.is_dir():
        raise RunError(f"--dump_data {path}: folder {path.parent} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.from_pretrained)
    except OSError as e:
        raise RunError(f"could not load the tokenizer of --from_pretrained {args.from_pretrained!r} ({first_line(e)}); "
                       "pass a local directory holding it, or a reachable hub id") from None
    splits = prepare_splits(args, tokenizer.eos_token)
    tokenized = tokenize_seq2seq(splits, tokenizer, args.model_type, args.max_input_length)
    count = write_prepared_rows(path, splits, tokenized, args.model_type)
    print(f"wrote {count} rows ({', '.join(f'{name} {len(split)}' for name, split in splits.items())}) to {path}")


def warn_of_a_batch_beyond_the_split(batch_size: int, rows: int) -> None:
    """A batch larger than the training split is the whole split at every step: memory for all of its rows at once,
    which a mistyped --batch_size makes a kernel kill rather than a run."""
    if batch_size > rows:
        print(f"warning: --batch_size {batch_size} is larger than the training split ({rows} rows): every step trains "
              f"on all {rows} rows at once; choose a --batch_size of at most {rows} to train on batches",
              file=sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's pre-emption, a sweep that stops) ends the run as Ctrl-C does: both raise
    KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """The run, as its folder's only writer; Ctrl-C and SIGTERM end it with a line saying how to go on, from the
    first import of torch on."""
    args = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return train_in_run_folder(args)
    except KeyboardInterrupt:
        print(STARTUP_INTERRUPTED, file=sys.stderr)
        return 130


def train_in_run_folder(args: argparse.Namespace) -> int:
    from recovery import Interrupted, RunError, run_folder
    from train_utils import is_main_process, run_dirs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        with run_folder(*run_dirs(args), is_main_process(), share_refusal=launched) as refusal:
            return run_training(args, refusal)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130


def run_training(args: argparse.Namespace, refusal: str | None = None) -> int:
    """Check, load, tokenise, train and record; refusal: rank 0's refusal of the run folder in a launched run,
    raised in every process as soon as they have all joined (recovery.stop_together)."""
    from recovery import FaultGuard, check_same_run, faults_explained, stop_together
    from students import family_of
    from train_utils import RunError, is_main_process, run_dirs, train_and_evaluate, training_arguments
    from token_cache import cached_tokenize, default_cache_dir

    try:
        if args.dump_data:
            dump_data(args)
            return 0
        check_devices(args)
        ckpt_dir, log_dir = run_dirs(args)
        if args.resume and (ckpt_dir / "results.json").is_file():
            if is_main_process():
                print(f"run already finished: see {ckpt_dir / 'results.json'}")
            return 0
        if args.resume:
            check_same_run(args, ckpt_dir)
        ensure_data(args)
        # Before the student: a launched run's process group and a ZeRO-3 config must exist when weights load.
        training_args = training_arguments(args, ckpt_dir, log_dir)
        stop_together(refusal)
        tokenizer, model = load_student(args)
        family = family_of(model.config)
        if args.rationales != "first" and family.prompt_in_output:
            raise RunError(f"--rationales {args.rationales} is implemented for encoder-decoder students only; "
                           "use --rationales first with a decoder-only student")
        record_extra: dict = {}
        splits = prepare_splits(args, family.segment_joiner(tokenizer), record_extra)
        cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        tokenized = cached_tokenize(cache_dir, family.tokenize, splits, tokenizer, args.model_type,
                                    args.max_input_length, args.chat_template, write=is_main_process())
        if is_main_process():
            warn_of_a_batch_beyond_the_split(args.batch_size, len(tokenized["train"]))
        if args.rationales != "first" and args.model_type == "task_prefix":
            from views import MAX_TARGET_LENGTH, original_t5_pretokenization

            tokenized["train"] = tokenize_kept_rationales(
                tokenized["train"], splits["train"]["rationales"], original_t5_pretokenization(tokenizer),
                MAX_TARGET_LENGTH,
            )
        guard = FaultGuard()
        with faults_explained(guard, ckpt_dir, model):
            record = train_and_evaluate(args, training_args, model, tokenizer, tokenized, metric_name(args),
                                        record_extra, guard)
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
