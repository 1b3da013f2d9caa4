"""Distilling step-by-step: train a student (T5, BART, any seq2seq or decoder-only causal LM, fully or with LoRA) on
labels and teacher rationales (Hsieh et al., 2023).

    python run.py --dataset cqa --from_pretrained google/t5-v1_1-base --model_type task_prefix --label_type llm
"""

import argparse
import importlib.util
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

from cli import fraction, folder_name, non_negative_float, positive_float, positive_int, seed, unit_interval
from config import KD_LOSSES, OPTIMIZER_NAMES, TRACKERS, RunConfig, default_flag_values
from data_utils import DATASETS
from metrics import METRICS
from rationales import RATIONALE_MODES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """run.py's flags, checked against each other, as the run's configuration; a mistake exits with usage."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(DATASETS),
        help="which dataset of datasets.zip, or custom (your own, in <data_dir>/custom/)")
    add("--from_pretrained",
        help="student: hub id or local model directory of any seq2seq or causal LM (family read from its config)")
    add("--model_type", choices=["task_prefix", "standard"],
        help="task_prefix: distilling step-by-step (label + rationale); standard: input -> label only")
    add("--label_type", choices=["gt", "llm"], help="train on ground-truth or teacher labels")
    add("--llm", help="teacher outputs: palm (<data>/<name>/llm/), gpt (<data>/gpt-neox/<name>/), "
        "none (no rationales), dataset (the rows' own 'rationale' field), or the name of a folder beside llm/ "
        "holding another teacher's chunks (see annotate.py)")
    add("--custom_metric", choices=sorted(METRICS), help="--dataset custom: compare labels as text (default) or "
        "by arithmetic value (equation)")
    add("--rationales", choices=RATIONALE_MODES,
        help="which teacher samples become rationale rows: first (the paper), all, correct (label matches gold), "
        "vote (majority label, agreeing rationales); see README, Choosing rationales")
    add("--alpha", type=unit_interval, help="weight of the label loss; 1 - alpha weighs rationales")
    add("--batch_size", type=positive_int, help="per-device training batch size")
    add("--eval_batch_size", type=positive_int,
        help="evaluation batch size (default: 4 x --batch_size on a GPU, 8 x on a CPU: generation needs far less "
        "memory per row than training)")
    add("--grad_steps", type=positive_int, help="gradient accumulation steps")
    add("--max_input_length", type=positive_int, help="input tokens kept (truncation)")
    add("--eval_steps", type=positive_int, help="evaluate and checkpoint every N steps")
    add("--max_steps", type=positive_int, help="training steps")
    add("--lr", type=positive_float, help="learning rate")
    add("--optimizer_name", choices=OPTIMIZER_NAMES, help="optimizer")
    add("--run", type=seed, help="seed: data subsample, shuffling and dropout")
    add("--subsample", type=fraction, help="fraction of train used (seeded by --run)")
    add("--max_eval_samples", type=positive_int,
        help="for debugging and smoke tests: evaluate on the first N rows of valid/test only (not the paper's protocol)")
    add("--gen_max_len", type=positive_int, help="generation length at evaluation, counting the "
        "decoder's start token as the original's generation_max_length did (64: up to 63 generated tokens)")
    add("--fixed_valid", action="store_true", help="hold out valid (10%%, seed 0) from the whole train file before "
        "--subsample, so every fraction and seed shares it (the original holds it out of the subsample)")
    add("--tolerant_equations", action="store_true", help="svamp/asdiv/--custom_metric equation: values within 1e-9 "
        "(relative or absolute) count as equal (the original: exact equality)")
    add("--dump_data", metavar="FILE", help="write every prepared row (text and token ids, train/valid/test) to FILE "
        "as JSON lines and exit without training; needs only the tokenizer of --from_pretrained")
    add("--output_rationale", action="store_true", help="also generate rationales at evaluation and record them")
    add("--eval_rationales", action="store_true", help="after training, generate the selected model's rationales "
        "on test and score them: ROUGE-L against the teacher's, and agreement with its own labels (results.json "
        "rationale_eval)")
    add("--bf16", action="store_true", help="bfloat16 mixed precision")
    add("--gradient_checkpointing", action="store_true",
        help="recompute activations in the backward pass: less memory, one more forward pass per step")
    add("--chat_template", action="store_true",
        help="decoder-only students: wrap prompts in the tokenizer's chat template (instruct models)")
    add("--lora_r", type=positive_int, help="train LoRA adapters of this rank instead of all weights")
    add("--lora_alpha", type=positive_float, help="LoRA scaling numerator (scale = alpha / r)")
    add("--lora_dropout", type=unit_interval, help="dropout on the LoRA branch")
    add("--lora_targets", nargs="+", metavar="MODULE",
        help="module names LoRA adapts (default: the family's attention and MLP projections, see students.py)")
    add("--report_to", nargs="+", choices=[*TRACKERS, "none"], metavar="TRACKER",
        help=f"where training is logged, one or more of {', '.join(TRACKERS)}; or none")
    add("--no_log", action="store_true", help="log nowhere (the same as --report_to none)")
    add("--parallelize", action="store_true", help="split the model across all visible GPUs (models too big for one)")
    add("--deepspeed", metavar="JSON", help="DeepSpeed config (such as configs/ds_zero3.json) for the Trainer; "
        "launch with torchrun, accelerate launch or deepspeed")
    # Passed by the deepspeed launcher and torch.distributed.launch; the LOCAL_RANK variable they also set is used.
    add("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    add("--data_dir", help="the unzipped datasets.zip folder")
    add("--output_dir", help="where logs/ and ckpts/ are written")
    add("--select_on", choices=["test", "valid"],
        help="test: report the best test accuracy seen in training (the paper); valid: pick the checkpoint "
        "by valid accuracy and report its test accuracy")
    add("--save_total_limit", type=positive_int,
        help="checkpoints kept during training besides the best one (the latest ones, for --resume)")
    add("--resume", action="store_true", help="continue this configuration's run from its latest checkpoint")
    add("--overwrite", action="store_true", help="delete this configuration's earlier logs and checkpoints first")
    add("--download", action="store_true", help="fetch and unpack the paper's datasets.zip into --data_dir if missing")
    add("--data_url", help="where --download fetches datasets.zip from (URL or local path)")
    add("--cache_dir", help="where the splits as read from their files, and tokenised, are kept for reruns, resumes "
        "and sweeps (default: $DSS_CACHE, else ~/.cache/dss)")
    add("--no_cache", action="store_true", help="read and tokenise without reading or writing the cache")
    kd = parser.add_argument_group("token-level distillation (beside the paper's loss; see README)").add_argument
    kd("--kd_weight", type=non_negative_float,
       help="beta: add beta * kd_loss, token-level distillation from --kd_teacher or --kd_logits, to the paper's "
       "loss (0: the paper's loss alone)")
    kd("--kd_temperature", type=positive_float,
       help="softmax temperature of teacher and student in kd_loss")
    kd("--kd_loss", choices=KD_LOSSES,
       help="kd_loss's divergence: forward_kl KL(teacher||student), reverse_kl KL(student||teacher), jsd "
       "(Jensen-Shannon)")
    kd("--kd_teacher", metavar="PATH_OR_ID",
       help="online teacher for kd_loss: a model of the student's family and vocabulary, run in inference mode on "
       "the same views")
    kd("--kd_logits", metavar="DIR",
       help="offline teacher for kd_loss: the store of its top-k log-probabilities that teacher_logits.py printed "
       "for this run's data")
    parser.set_defaults(**default_flag_values())  # defined once, in config.py
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
    if args.eval_rationales and (args.llm == "none" or args.model_type == "standard"):
        parser.error("--eval_rationales scores a task_prefix student's rationales against the teacher's: use it with "
                     "--model_type task_prefix and --llm palm/gpt/dataset/<folder>")
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
    if args.kd_weight > 0 and (args.kd_teacher is None) == (args.kd_logits is None):
        parser.error("--kd_weight > 0 distils from a teacher: pass --kd_teacher or --kd_logits (one of them)")
    if args.kd_weight == 0 and (args.kd_teacher or args.kd_logits):
        parser.error("--kd_teacher/--kd_logits are used only with --kd_weight > 0: set --kd_weight or drop them")
    if args.kd_logits and args.rationales != "first":
        parser.error(f"--kd_logits stores one rationale per input: use --kd_teacher with --rationales "
                     f"{args.rationales}, or --rationales first")
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
    return RunConfig.from_flags(vars(args))


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
    config = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            from train_utils import train

            return train(config)
    except KeyboardInterrupt:
        print(STARTUP_INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
