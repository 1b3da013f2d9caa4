"""Training and evaluation setup: run folders, the trainer, and the per-run record."""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    PreTrainedTokenizerBase,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.utils import is_torch_tf32_available

from metrics import METRICS
from model_utils import LABEL_PAD, TaskPrefixTrainer
from speedups import disabled_speedups, enabled, eval_batch_factor, speed_up_student, tune_cpu_allocator
from students import family_of, lora_name, save_best, student_record
from trackers import track_run
from recovery import FaultGuard, RunError, attempt_left_nothing, record_run_args, resume_checkpoint, write_json_atomic

# AdamW as torch's fused kernel (CPU and CUDA), one pass over the weights instead of a dozen, 5x faster per step than
# the foreach kernel for the tiny T5 on 2 CPU cores (bench.py measures its share); the trainer gives it the
# original's arithmetic (faithful_training.OriginalAdamW). Adafactor is transformers' (the original had none).
OPTIMIZERS = {"AdamW": "adamw_torch_fused", "Adafactor": "adafactor"}
RATIONALE_SAMPLES = 5
# Evaluation generates: it keeps no activations for a backward pass, no gradients and no optimizer state, so a row
# costs it a fraction of the memory a training row does. Each decoding step streams every decoder and lm_head weight
# once for the whole batch, so bigger batches share that cost: by default evaluation batches are this many times the
# training batch (for the tiny T5 on 2 CPU cores, 32 rows decode 3x faster than 8; see bench.py), and twice that on a
# CPU (speedups.eval_batch_factor).
EVAL_BATCH_FACTOR = 4


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch / deepspeed run (they all set RANK), or the only process.

    Read from the environment so it holds before the trainer sets up the process group.
    """
    return int(os.environ.get("RANK", "0")) == 0


def data_parallel_size(args: argparse.Namespace) -> int:
    """Model copies that each take --batch_size rows per step.

    One per process under a launcher (they set LOCAL_RANK and WORLD_SIZE). A lone process sees every visible GPU
    through the Trainer's nn.DataParallel, unless --parallelize splits one model across them.
    """
    if "LOCAL_RANK" in os.environ or args.parallelize:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, torch.cuda.device_count())


def effective_batch_size(args: argparse.Namespace) -> int:
    return args.batch_size * args.grad_steps * data_parallel_size(args)


def config_dir(args: argparse.Namespace) -> str:
    """The experiment's folder name, as in the paper's code, so sweeps over any flag land side by side."""
    model_name = Path(args.from_pretrained.rstrip("/")).name
    parts = [
        args.dataset, model_name, args.model_type, args.llm, args.subsample, args.label_type, args.alpha,
        args.max_input_length, effective_batch_size(args), args.optimizer_name, args.lr,
    ]
    if args.select_on != "test":
        parts.append(f"select_{args.select_on}")
    if getattr(args, "rationales", "first") != "first":  # the paper's choice keeps the paper's folder names
        parts.append(f"rationales_{args.rationales}")
    # Runs on other data or scored otherwise than the paper's land apart from the faithful ones.
    if getattr(args, "fixed_valid", False):
        parts.append("fixed_valid")
    if getattr(args, "tolerant_equations", False):
        parts.append("tolerant_equations")
    if getattr(args, "chat_template", False):
        parts.append("chat_template")
    if getattr(args, "lora_r", None):
        parts.append(lora_name(args))
    return "/".join(str(part) for part in parts)


def run_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint folder, TensorBoard folder) of this run: <out>/ckpts/<config>/<run>, <out>/logs/<config>/<run>."""
    base = Path(args.output_dir)
    config = config_dir(args)
    return base / "ckpts" / config / str(args.run), base / "logs" / config / str(args.run)


def prepare_run_dirs(args: argparse.Namespace, is_main: bool, wait_for_everyone: Callable[[], None]) -> None:
    """Refuse to touch earlier results unless --resume (continue them) or --overwrite (replace them).

    With several processes, every one looks before any writes, so all give the same answer and none is left
    waiting on a process that stopped; the main process deletes, and nobody writes until it is done.
    """
    ckpt_dir, log_dir = run_dirs(args)
    existing = [d for d in (ckpt_dir, log_dir) if d.exists() and any(d.iterdir())]
    if existing and attempt_left_nothing(ckpt_dir):
        if is_main:
            logs = f" (its log files stay in {log_dir})" if log_dir in existing else ""
            print(f"note: the earlier attempt in {ckpt_dir} stopped before its first checkpoint, leaving nothing to "
                  f"resume: starting afresh{logs}", file=sys.stderr)
        existing = []
    wait_for_everyone()
    if existing and not (args.resume or args.overwrite):
        raise RunError(
            f"results already exist in {existing[0]}; pass --resume to continue that run, --overwrite to replace "
            "it, or change --run/--output_dir"
        )
    if existing and args.overwrite and is_main:
        for d in existing:
            shutil.rmtree(d)
    wait_for_everyone()


def write_prepared_rows(path: Path, splits: DatasetDict, tokenized: DatasetDict, model_type: str) -> int:
    """--dump_data: every prepared row as a JSON line, text beside the token ids the student gets, split after split
    in the prepared order (train, valid, test), rows in split order; returns how many rows were written."""
    text_columns, id_columns = ["input", "label"], ["input_ids", "labels"]
    if model_type == "task_prefix":
        text_columns, id_columns = text_columns + ["rationale"], id_columns + ["expl_input_ids", "rationale_labels"]
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for name, split in splits.items():
            texts = {column: list(split[column]) for column in text_columns}
            ids = {column: list(tokenized[name][column]) for column in id_columns}
            for idx in range(len(split)):
                row = {"split": name, "idx": idx, **{column: values[idx] for column, values in texts.items()}}
                row |= {column: values[idx] for column, values in ids.items()}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += len(split)
    os.replace(tmp, path)
    return count


def sort_by_length(split: Dataset) -> Dataset:
    lengths = [len(ids) for ids in split["input_ids"]]
    return split.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))


class Evaluator:
    """compute_metrics for the trainer: decodes generations, scores them, and keeps them for the run record."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, metric: str):
        self.tokenizer = tokenizer
        self.score = METRICS[metric]
        self.last: dict[str, list[str]] = {}

    def decode(self, ids: np.ndarray) -> list[str]:
        """Text as the original compared it: special tokens skipped, nothing stripped."""
        ids = np.where(ids == LABEL_PAD, self.tokenizer.pad_token_id, ids)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def __call__(self, eval_pred) -> dict[str, float]:
        predictions = eval_pred.predictions
        rationale_ids = None
        if isinstance(predictions, tuple):
            predictions, rationale_ids = predictions
        preds, golds = self.decode(predictions), self.decode(eval_pred.label_ids)
        self.last = {"pred": preds, "gold": golds}
        if rationale_ids is not None:
            self.last["rationale"] = self.decode(rationale_ids)
        return {"accuracy": self.score(preds, golds)}


class RunRecorder(TrainerCallback):
    """Prints each evaluation plainly and keeps the generations that results.json samples."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.predictions: dict[int, dict[str, list[str]]] = {}
        # Time inside optimizer steps only, so throughput leaves out evaluations and checkpoint saves.
        self.train_seconds = 0.0
        self.train_steps = 0
        self._step_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_start
        self.train_steps += 1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        for key, accuracy in metrics.items():
            if key.startswith("eval_") and key.endswith("_accuracy"):
                split = key[len("eval_") : -len("_accuracy")]
                if split == "test":
                    self.predictions[state.global_step] = self.evaluator.last
                if state.is_world_process_zero:
                    print(f"step {state.global_step}: {split} accuracy {accuracy:.4f}", file=sys.stderr, flush=True)


def evaluations_from_history(log_history: list[dict]) -> list[dict]:
    """One entry per evaluation step, from the trainer's log history (which a resumed run restores)."""
    by_step: dict[int, dict] = {}
    train_loss = math.nan
    for entry in log_history:
        if "loss" in entry:
            train_loss = float(entry["loss"])
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_accuracy"):
                step = entry["step"]
                by_step.setdefault(step, {"step": step, "train_loss": train_loss})
                by_step[step][key[len("eval_") :]] = value
    return [by_step[step] for step in sorted(by_step)]


def select_evaluation(evaluations: list[dict], select_on: str) -> dict | None:
    """The evaluation the protocol picks: best test accuracy (paper) or best valid accuracy (--select_on valid)."""
    key = f"{select_on}_accuracy"
    scored = [e for e in evaluations if key in e]
    return max(scored, key=lambda e: e[key]) if scored else None


def paper_metrics(log_history: list[dict], select_on: str) -> dict[str, float]:
    """The figures results.json ends with, so far: the best test accuracy and the selected checkpoint's."""
    evaluations = evaluations_from_history(log_history)
    test_scores = [e["test_accuracy"] for e in evaluations if "test_accuracy" in e]
    selected = select_evaluation(evaluations, select_on)
    metrics = {"best_test_accuracy": max(test_scores)} if test_scores else {}
    if selected and "test_accuracy" in selected:
        metrics["selected_test_accuracy"] = selected["test_accuracy"]
    return metrics


def optimizer(name: str) -> str:
    """The Trainer's optimizer for --optimizer_name; AdamW's foreach kernel where fused_adamw is switched off."""
    return "adamw_torch" if name == "AdamW" and not enabled("fused_adamw") else OPTIMIZERS[name]


def training_arguments(args: argparse.Namespace, ckpt_dir: Path, log_dir: Path) -> Seq2SeqTrainingArguments:
    """The paper's trainer settings on today's API (eval_strategy, report_to, use_cpu).

    Made before the student is loaded: in a launched run this sets up the process group, so that FSDP reads the
    weights in one process only, and registers a ZeRO-3 config, so that from_pretrained loads them partitioned.
    """
    try:
        disabled_speedups()
    except ValueError as e:
        raise RunError(str(e)) from None
    report_to = ["none"] if args.no_log else args.report_to
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
    return Seq2SeqTrainingArguments(
        output_dir=str(ckpt_dir),
        remove_unused_columns=False,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{args.select_on}_accuracy",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, min(50, args.eval_steps)),
        learning_rate=args.lr,
        optim=optimizer(args.optimizer_name),
        # TF32 matmuls on Ampere and newer GPUs only (10 mantissa bits inside fp32 matmuls); None leaves torch's default.
        tf32=True if is_torch_tf32_available() else None,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size
        or eval_batch_factor(EVAL_BATCH_FACTOR, on_gpu=torch.cuda.is_available()) * args.batch_size,
        gradient_accumulation_steps=args.grad_steps,
        predict_with_generate=True,
        seed=args.run,
        bf16=args.bf16,
        report_to=report_to,
        # How W&B and MLflow name the run: by its checkpoint folder, which holds the configuration and seed.
        run_name=str(ckpt_dir),
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA a launched process would otherwise run alone (the Trainer only goes multi-CPU when told).
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        deepspeed=args.deepspeed,
        activation_checkpointing=getattr(args, "gradient_checkpointing", False),
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Both views use every weight; looking for unused ones costs DDP an extra graph walk per step.
        ddp_find_unused_parameters=False,
    )


def build_trainer(
    args, training_args: Seq2SeqTrainingArguments, model, tokenizer, tokenized: DatasetDict, metric: str
):
    """The task-prefix Seq2SeqTrainer of the paper, scoring test (and valid) by generation."""
    evaluator = Evaluator(tokenizer, metric)
    recorder = RunRecorder(evaluator)
    eval_splits = ("valid", "test") if args.select_on == "valid" else ("test",)
    # Longest rows first: batches of similar length pad less, and an out-of-memory shows at the first batch.
    eval_sets = {split: sort_by_length(tokenized[split]) for split in eval_splits}
    family = family_of(model.config)
    speed_up_student(model)
    if training_args.device.type == "cpu":
        tune_cpu_allocator()
    trainer = TaskPrefixTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=eval_sets,
        data_collator=family.make_collator(tokenizer, args.model_type),
        processing_class=tokenizer,
        compute_metrics=evaluator,
        callbacks=[recorder],
        alpha=args.alpha,
        gen_max_len=args.gen_max_len,
        output_rationale=args.output_rationale,
        family=family,
    )
    if training_args.report_to:
        track_run(trainer, vars(args), lambda log_history: paper_metrics(log_history, args.select_on))
    return trainer, recorder


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "datasets", "accelerate", "sentencepiece", "numpy")
    return {"python": platform.python_version(), **{name: version(name) for name in names}}


def write_records(args, ckpt_dir: Path, log_history: list[dict], recorder: RunRecorder, test: Dataset, extra: dict,
                  loaded_step: int | None = None) -> dict:
    """results.json (and predictions.jsonl with --output_rationale); written last, so it marks a finished run.
    loaded_step: the step of the selected model where it is not the protocol's pick (whose checkpoint was
    unreadable)."""
    evaluations = evaluations_from_history(log_history)
    for entry in evaluations:
        generated = recorder.predictions.get(entry["step"], {})
        if "rationale" in generated:
            entry["rationale_samples"] = generated["rationale"][:RATIONALE_SAMPLES]
    selected = select_evaluation(evaluations, args.select_on)
    if loaded_step is not None:
        selected = next(e for e in evaluations if e["step"] == loaded_step)
    test_scores = [e["test_accuracy"] for e in evaluations if "test_accuracy" in e]
    record = {
        "config": vars(args),
        "config_dir": config_dir(args),
        "effective_batch_size": effective_batch_size(args),
        "versions": library_versions(),
        "selection": {
            "select_on": args.select_on,
            "protocol": "best test accuracy during training (the paper's protocol)"
            if args.select_on == "test"
            else "checkpoint with the best valid accuracy; test accuracy reported at that checkpoint",
            "step": selected["step"] if selected else None,
        },
        "evaluations": evaluations,
        "best_test_accuracy": max(test_scores, default=None),
        "selected_test_accuracy": selected.get("test_accuracy") if selected else None,
        "final_test_accuracy": test_scores[-1] if test_scores else None,
        **extra,
    }
    chosen = recorder.predictions.get(selected["step"]) if selected else None
    if args.output_rationale and chosen:
        rows = []
        # strict: the gathered predictions must be the test split exactly once each, in its order.
        for i, (text, gold, pred) in enumerate(zip(test["input"], test["label"], chosen["pred"], strict=True)):
            row = {"input": text, "gold": gold, "pred_label": pred}
            if "rationale" in chosen:
                row["pred_rationale"] = chosen["rationale"][i]
            rows.append(json.dumps(row))
        tmp = ckpt_dir / "predictions.jsonl.tmp"
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, ckpt_dir / "predictions.jsonl")
    write_json_atomic(ckpt_dir / "results.json", record)
    return record


def check_parallelism(args: argparse.Namespace, trainer: TaskPrefixTrainer) -> None:
    """Stop, before any folder is touched, where the trainer would not train as the run folder name says."""
    used = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
    if used != effective_batch_size(args):
        raise RunError(f"the trainer's effective batch size is {used}, the run folder says "
                       f"{effective_batch_size(args)}: launch several processes with torchrun or accelerate launch")
    # accelerate silently falls back to unsharded data parallel where it cannot run FSDP.
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise RunError("the accelerate config asks for FSDP, which accelerate runs only on GPUs and none is visible: "
                       "launch without FSDP")


def train_and_evaluate(
    args, training_args: Seq2SeqTrainingArguments, model, tokenizer, tokenized: DatasetDict, metric: str,
    record_extra: dict | None = None,
    guard: FaultGuard | None = None,
) -> dict | None:
    """Train with periodic evaluation and checkpoints; save the selected model; return the run record (with
    record_extra's entries, such as the teacher audit).

    --resume continues from the newest complete checkpoint; guard (a recovery.FaultGuard) watches training."""
    ckpt_dir, _ = run_dirs(args)
    trainer, recorder = build_trainer(args, training_args, model, tokenizer, tokenized, metric)
    student = student_record(model)  # before save_best, which merges LoRA adapters into the model
    check_parallelism(args, trainer)
    prepare_run_dirs(args, trainer.is_world_process_zero(), trainer.accelerator.wait_for_everyone)
    if trainer.is_world_process_zero():
        record_run_args(args, ckpt_dir)
    resume = resume_checkpoint(ckpt_dir, say=trainer.is_world_process_zero()) if args.resume else None
    if guard is not None:
        trainer.add_callback(guard)
    start = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall_time = time.time() - start
    if trainer.is_fsdp_enabled:
        # Sharded checkpoints resume fast; the selected model is gathered whole so from_pretrained can load it.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    save_best(trainer, ckpt_dir / "best")  # on every process: under FSDP/ZeRO-3 gathering is collective
    if not trainer.is_world_process_zero():
        return None
    extra = {
        "wall_time_s": wall_time,
        "train_examples_per_s": recorder.train_steps * effective_batch_size(args) / max(recorder.train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(),
        "best_model_dir": str(ckpt_dir / "best"),
        "resumed": bool(resume),
        "resumed_from": str(resume) if resume else None,
        "world_size": trainer.args.world_size,
        "student": student,
        **(record_extra or {}),
    }
    loaded_step = None
    if trainer.unreadable_best:
        extra["unreadable_best_checkpoints"] = trainer.unreadable_best
        loaded_step = trainer.state.best_global_step
    test = trainer.eval_dataset["test"]
    return write_records(args, ckpt_dir, trainer.state.log_history, recorder, test, extra, loaded_step)
