"""Training a student as run.py asks: the run's data, its folders, the trainer's settings and construction,
evaluation callbacks, and the per-run record. train(config) is the whole run, step by step."""

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

from cli import first_line, write_json_atomic
from config import DataConfig, OutputConfig, RunConfig, TrainingConfig
from data_utils import DATA_URL, DATASETS, DataError, load_data
from download import fetch_data
from metrics import MATCHES, METRICS
from model_utils import LABEL_PAD, TaskPrefixTrainer, unwrap_peft
from rationale_eval import rationale_report
from rationales import audit, choose_rationales, describe_audit, describe_counts, kept_counts, tokenize_kept_rationales
from recovery import (
    CHECKPOINT_PREFIX,
    FaultGuard,
    Interrupted,
    RunError,
    attempt_left_nothing,
    check_same_run,
    faults_explained,
    record_run_args,
    resume_checkpoint,
    run_folder,
    stop_together,
)
from speedups import cpu_eval_batch_size, disabled_speedups, enabled, speed_up_student, tune_cpu_allocator
from students import family_of, load_student, parameter_counts, save_best, student_record
from teacher_cost import run_budget
from token_cache import cached_tokenize, default_cache_dir
from trackers import track_run
from views import MAX_TARGET_LENGTH, original_t5_pretokenization, tokenize_seq2seq

# --optimizer_name -> the Trainer's optimizer. AdamW as torch's fused kernel (CPU and CUDA), one pass over the
# weights instead of a dozen, given the original's arithmetic by the trainer (faithful_training.OriginalAdamW);
# Adafactor is transformers' (the original had none).
OPTIMIZERS = {"AdamW": "adamw_torch_fused", "Adafactor": "adafactor"}
RATIONALE_SAMPLES = 5
# The selected test evaluation's per-example predictions, beside results.json (write_test_predictions).
TEST_PREDICTIONS = "test_predictions.jsonl"
# A test evaluation's generations, saved in the checkpoint of its step, for a resumed run to find.
SAVED_GENERATIONS = "test_generations.json"
# Evaluation generates: it keeps no activations for a backward pass, no gradients and no optimizer state, so a row
# costs it a fraction of the memory a training row does. Each decoding step streams every decoder and lm_head weight
# once for the whole batch, so bigger batches share that cost: by default evaluation batches are this many times the
# training batch, and on a CPU more, as memory allows (speedups.cpu_eval_batch_size).
EVAL_BATCH_FACTOR = 4


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch / deepspeed run (they all set RANK), or the only process.

    Read from the environment so it holds before the trainer sets up the process group.
    """
    return int(os.environ.get("RANK", "0")) == 0


def data_parallel_size(parallelize: bool) -> int:
    """Model copies that each take --batch_size rows per step.

    One per process under a launcher (they set LOCAL_RANK and WORLD_SIZE). A lone process sees every visible GPU
    through the Trainer's nn.DataParallel, unless --parallelize splits one model across them.
    """
    if "LOCAL_RANK" in os.environ or parallelize:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, torch.cuda.device_count())


def check_devices(config: RunConfig) -> None:
    """Refuse what this machine or launch cannot serve, before anything is loaded."""
    import importlib.util

    deepspeed, parallelize = config.training.deepspeed, config.student.parallelize
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise RunError("--deepspeed needs the deepspeed package, which is not installed: pip install deepspeed")
    if parallelize and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunError("--parallelize splits one model over all GPUs from a single process: run it with python, "
                       "not with several processes from torchrun or accelerate launch")
    if parallelize and torch.cuda.device_count() < 2:
        raise RunError(f"--parallelize needs at least two visible GPUs; {torch.cuda.device_count()} found")


def prepare_run_dirs(output: OutputConfig, ckpt_dir: Path, log_dir: Path, is_main: bool,
                     wait_for_everyone: Callable[[], None]) -> None:
    """Refuse to touch earlier results unless --resume (continue them) or --overwrite (replace them).

    With several processes, every one looks before any writes, so all give the same answer and none is left
    waiting on a process that stopped; the main process deletes, and nobody writes until it is done.
    """
    existing = [d for d in (ckpt_dir, log_dir) if d.exists() and any(d.iterdir())]
    if existing and attempt_left_nothing(ckpt_dir):
        if is_main:
            logs = f" (its log files stay in {log_dir})" if log_dir in existing else ""
            print(f"note: the earlier attempt in {ckpt_dir} stopped before its first checkpoint, leaving nothing to "
                  f"resume: starting afresh{logs}", file=sys.stderr)
        existing = []
    wait_for_everyone()
    if existing and not (output.resume or output.overwrite):
        raise RunError(
            f"results already exist in {existing[0]}; pass --resume to continue that run, --overwrite to replace "
            "it, or change --run/--output_dir"
        )
    if existing and output.overwrite and is_main:
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


def length_order(split: Dataset) -> list[int]:
    """The split's row indices, longest input first (ties in split order)."""
    lengths = [len(ids) for ids in split["input_ids"]]
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


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

    def __init__(self, evaluator: Evaluator, test_order: list[int]):
        self.evaluator = evaluator
        # The test split's row index of each evaluated row: evaluation sees the split longest first.
        self.test_order = test_order
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

    def on_save(self, args, state, control, **kwargs):
        """Keep this step's test generations in its checkpoint, so that a run resumed past its selected evaluation
        still records that evaluation's predictions (the trainer keeps the best checkpoint to the end)."""
        generated = self.predictions.get(state.global_step)
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if generated is not None and state.is_world_process_zero and folder.is_dir():
            write_json_atomic(folder / SAVED_GENERATIONS, generated, indent=None)

    def generations(self, step: int, ckpt_dir: Path) -> dict[str, list[str]] | None:
        """The test generations of an evaluation step: this process's, or those an earlier attempt of a resumed run
        saved with that step's checkpoint; None where neither has them."""
        saved = ckpt_dir / f"{CHECKPOINT_PREFIX}{step}" / SAVED_GENERATIONS
        if step not in self.predictions and saved.is_file():
            return json.loads(saved.read_text(encoding="utf-8"))
        return self.predictions.get(step)


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


def training_arguments(training: TrainingConfig, ckpt_dir: Path, log_dir: Path) -> Seq2SeqTrainingArguments:
    """The paper's trainer settings on today's API (eval_strategy, report_to, use_cpu).

    Made before the student is loaded: in a launched run this sets up the process group, so that FSDP reads the
    weights in one process only, and registers a ZeRO-3 config, so that from_pretrained loads them partitioned.
    """
    try:
        disabled_speedups()
    except ValueError as e:
        raise RunError(str(e)) from None
    report_to = ["none"] if training.no_log else list(training.report_to)
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
    return Seq2SeqTrainingArguments(
        output_dir=str(ckpt_dir),
        remove_unused_columns=False,
        eval_strategy="steps",
        eval_steps=training.eval_steps,
        save_strategy="steps",
        save_steps=training.eval_steps,
        save_total_limit=training.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{training.select_on}_accuracy",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, min(50, training.eval_steps)),
        learning_rate=training.lr,
        optim=optimizer(training.optimizer_name),
        # TF32 matmuls on Ampere and newer GPUs only (10 mantissa bits inside fp32 matmuls); None leaves torch's default.
        tf32=True if is_torch_tf32_available() else None,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size or EVAL_BATCH_FACTOR * training.batch_size,
        gradient_accumulation_steps=training.grad_steps,
        predict_with_generate=True,
        seed=training.seed,
        bf16=training.bf16,
        report_to=report_to,
        # How W&B and MLflow name the run: by its checkpoint folder, which holds the configuration and seed.
        run_name=str(ckpt_dir),
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA a launched process would otherwise run alone (the Trainer only goes multi-CPU when told).
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        deepspeed=training.deepspeed,
        activation_checkpointing=training.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Both views use every weight; looking for unused ones costs DDP an extra graph walk per step.
        ddp_find_unused_parameters=False,
    )


def build_trainer(
    training: TrainingConfig, training_args: Seq2SeqTrainingArguments, model, tokenizer, tokenized: DatasetDict,
    metric: str, trainer_class: type[TaskPrefixTrainer] = TaskPrefixTrainer, distillation=None,
):
    """The task-prefix Seq2SeqTrainer of the paper, scoring test (and valid) by generation; trainer_class: a
    subclass of TaskPrefixTrainer for another evaluation step (the benchmark's reference); distillation: the run's
    token-level distillation (distill.Distillation), whose store, if any, adds the teacher's top-k to batches."""
    evaluator = Evaluator(tokenizer, metric)
    eval_splits = ("valid", "test") if training.select_on == "valid" else ("test",)
    # Longest rows first: batches of similar length pad less, and an out-of-memory shows at the first batch.
    orders = {split: length_order(tokenized[split]) for split in eval_splits}
    eval_sets = {split: tokenized[split].select(order) for split, order in orders.items()}
    recorder = RunRecorder(evaluator, orders["test"])
    family = family_of(model.config)
    speed_up_student(model)
    if training_args.device.type == "cpu":
        tune_cpu_allocator()
        if training.eval_batch_size is None:
            longest = max((len(rows[0]["input_ids"]) for rows in eval_sets.values() if len(rows)), default=1)
            training_args.per_device_eval_batch_size = cpu_eval_batch_size(
                training_args.per_device_eval_batch_size, model.config, longest, training.gen_max_len,
                next(model.parameters()).element_size())
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=eval_sets,
        data_collator=distillation_collator(family.make_collator(tokenizer, training.model_type), distillation),
        processing_class=tokenizer,
        compute_metrics=evaluator,
        callbacks=[recorder],
        alpha=training.alpha,
        gen_max_len=training.gen_max_len,
        output_rationale=training.output_rationale,
        family=family,
        distillation=distillation,
    )
    return trainer, recorder


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "datasets", "accelerate", "sentencepiece", "numpy")
    return {"python": platform.python_version(), **{name: version(name) for name in names}}


def write_test_predictions(path: Path, generated: dict[str, list[str]], test_order: list[int], metric: str) -> int:
    """One JSON line per test row of an evaluation, in split order: its index in the test split, the decoded
    prediction and reference as the metric compared them, and whether the metric counted it correct. They are what
    summarize.py's paired statistics are computed from. Written whole or not at all; returns the rows written."""
    match = MATCHES[metric]
    # strict: the gathered predictions must be the test split exactly once each, in evaluation order.
    rows = sorted(zip(test_order, generated["pred"], generated["gold"], strict=True))
    lines = [json.dumps({"index": index, "prediction": pred, "reference": gold, "correct": match(pred, gold)},
                        ensure_ascii=False) for index, pred, gold in rows]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines)


def write_records(config: RunConfig, data_parallel: int, ckpt_dir: Path, log_history: list[dict],
                  recorder: RunRecorder, test: Dataset, extra: dict, loaded_step: int | None = None) -> dict:
    """results.json (after test_predictions.jsonl, and predictions.jsonl with --output_rationale); written last, so
    it marks a finished run.
    loaded_step: the step of the selected model where it is not the protocol's pick (whose checkpoint was
    unreadable)."""
    select_on = config.training.select_on
    evaluations = evaluations_from_history(log_history)
    for entry in evaluations:
        generated = recorder.predictions.get(entry["step"], {})
        if "rationale" in generated:
            entry["rationale_samples"] = generated["rationale"][:RATIONALE_SAMPLES]
    selected = select_evaluation(evaluations, select_on)
    if loaded_step is not None:
        selected = next(e for e in evaluations if e["step"] == loaded_step)
    test_scores = [e["test_accuracy"] for e in evaluations if "test_accuracy" in e]
    record = {
        "config": config.flags(),
        "config_dir": config.config_dir(data_parallel),
        "effective_batch_size": config.training.effective_batch_size(data_parallel),
        "versions": library_versions(),
        "selection": {
            "select_on": select_on,
            "protocol": "best test accuracy during training (the paper's protocol)"
            if select_on == "test"
            else "checkpoint with the best valid accuracy; test accuracy reported at that checkpoint",
            "step": selected["step"] if selected else None,
        },
        "evaluations": evaluations,
        "best_test_accuracy": max(test_scores, default=None),
        "selected_test_accuracy": selected.get("test_accuracy") if selected else None,
        "final_test_accuracy": test_scores[-1] if test_scores else None,
        **extra,
    }
    chosen = recorder.generations(selected["step"], ckpt_dir) if selected else None
    if config.training.output_rationale and chosen:
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
    record["test_predictions"] = None
    if chosen:
        count = write_test_predictions(ckpt_dir / TEST_PREDICTIONS, chosen, recorder.test_order,
                                       metric_name(config.data))
        record["test_predictions"] = {"file": TEST_PREDICTIONS, "step": selected["step"], "select_on": select_on,
                                      "rows": count}
    elif selected:
        print(f"note: the selected evaluation (step {selected['step']}) ran before this run was resumed and its "
              f"checkpoint kept no generations, so {ckpt_dir / TEST_PREDICTIONS} is not written", file=sys.stderr)
    write_json_atomic(ckpt_dir / "results.json", record)
    return record


def generate_test_rationales(trainer: TaskPrefixTrainer, test: Dataset) -> tuple[list[str], list[str], float]:
    """(rationales, labels, label accuracy) the loaded model generates for the test rows, in the rows' order:
    labels as evaluation generates them, rationales up to the length they were trained at (MAX_TARGET_LENGTH).
    Every process takes part (generation is collective under FSDP/ZeRO-3)."""
    order = length_order(test)
    output_rationale = trainer.output_rationale
    trainer.output_rationale, trainer.rationale_gen_max_len = True, MAX_TARGET_LENGTH
    try:
        output = trainer.predict(test.select(order), metric_key_prefix="rationale_eval")
    finally:
        trainer.output_rationale, trainer.rationale_gen_max_len = output_rationale, None
    generated = trainer.compute_metrics.last
    position = {index: i for i, index in enumerate(order)}
    ordered = [position[index] for index in range(len(test))]
    return ([generated["rationale"][i] for i in ordered], [generated["pred"][i] for i in ordered],
            output.metrics["rationale_eval_accuracy"])


def student_rationale_report(trainer: TaskPrefixTrainer, test: Dataset, teacher_test: Dataset, rule: str | None
                             ) -> dict | None:
    """--eval_rationales: the loaded (selected) model's test rationales against the teacher's (teacher_test: the
    test rows' `rationale` and `llm_label`), by rationale_eval.rationale_report; None outside the main process."""
    rationales, labels, accuracy = generate_test_rationales(trainer, test)
    if not trainer.is_world_process_zero():
        return None
    report = rationale_report(rule, test["input"], rationales, labels, teacher_test["rationale"],
                              teacher_test["llm_label"])
    report["label_accuracy"] = accuracy
    consistency = "no consistency rule" if rule is None else (
        f"consistency {report['consistency']:.4f} (teacher's {report['teacher_consistency']:.4f})")
    print(f"student rationales on {report['rows']} test rows: ROUGE-L {report['rouge_l']:.4f}, {consistency}",
          file=sys.stderr)
    return report


def check_parallelism(effective_batch_size: int, trainer: TaskPrefixTrainer) -> None:
    """Stop, before any folder is touched, where the trainer would not train as the run folder name says."""
    used = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
    if used != effective_batch_size:
        raise RunError(f"the trainer's effective batch size is {used}, the run folder says "
                       f"{effective_batch_size}: launch several processes with torchrun or accelerate launch")
    # accelerate silently falls back to unsharded data parallel where it cannot run FSDP.
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise RunError("the accelerate config asks for FSDP, which accelerate runs only on GPUs and none is visible: "
                       "launch without FSDP")


def train_and_evaluate(
    config: RunConfig, data_parallel: int, training_args: Seq2SeqTrainingArguments, model, tokenizer,
    tokenized: DatasetDict, metric: str, record_extra: dict | None = None, guard: FaultGuard | None = None,
    teacher_test: Dataset | None = None,
    distillation=None,
) -> dict | None:
    """Train with periodic evaluation and checkpoints; save the selected model; return the run record (with
    record_extra's entries, such as the teacher audit).

    --resume continues from the newest complete checkpoint; guard (a recovery.FaultGuard) watches training;
    teacher_test (the test rows' teacher rationales and labels) is given with --eval_rationales; distillation
    (distill.py) adds the token-level term with --kd_weight above 0."""
    ckpt_dir, log_dir = config.run_dirs(data_parallel)
    effective_batch_size = config.training.effective_batch_size(data_parallel)
    trainer, recorder = build_trainer(config.training, training_args, model, tokenizer, tokenized, metric,
                                      distillation=distillation)
    if training_args.report_to:
        select_on = config.training.select_on
        track_run(trainer, config.flags(), lambda log_history: paper_metrics(log_history, select_on))
    student = student_record(model)  # before save_best, which merges LoRA adapters into the model
    check_parallelism(effective_batch_size, trainer)
    prepare_run_dirs(config.output, ckpt_dir, log_dir, trainer.is_world_process_zero(),
                     trainer.accelerator.wait_for_everyone)
    if trainer.is_world_process_zero():
        record_run_args(config.flags(), ckpt_dir)
    resume = resume_checkpoint(ckpt_dir, say=trainer.is_world_process_zero()) if config.output.resume else None
    if guard is not None:
        trainer.add_callback(guard)
    start = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall_time = time.time() - start
    if trainer.is_fsdp_enabled:
        # Sharded checkpoints resume fast; the selected model is gathered whole so from_pretrained can load it.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    save_best(trainer, ckpt_dir / "best")  # on every process: under FSDP/ZeRO-3 gathering is collective
    rationale_eval = None
    if teacher_test is not None:
        rule = DATASETS[config.data.dataset].consistency
        rationale_eval = student_rationale_report(trainer, tokenized["test"], teacher_test, rule)
    if not trainer.is_world_process_zero():
        return None
    extra = {
        "wall_time_s": wall_time,
        "train_examples_per_s": recorder.train_steps * effective_batch_size / max(recorder.train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(),
        "best_model_dir": str(ckpt_dir / "best"),
        "resumed": bool(resume),
        "resumed_from": str(resume) if resume else None,
        "world_size": trainer.args.world_size,
        "student": student,
        **(record_extra or {}),
    }
    if rationale_eval is not None:
        extra["rationale_eval"] = rationale_eval
    loaded_step = None
    if trainer.unreadable_best:
        extra["unreadable_best_checkpoints"] = trainer.unreadable_best
        loaded_step = trainer.state.best_global_step
    test = trainer.eval_dataset["test"]
    return write_records(config, data_parallel, ckpt_dir, trainer.state.log_history, recorder, test, extra,
                         loaded_step)


# ---- the run's data ----


def ensure_data(data: DataConfig) -> None:
    """A missing data folder is fetched (or offered) before any model loads, so a first run learns of it at once."""
    if not Path(data.data_dir).is_dir() and DATASETS[data.dataset].from_paper:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DataError(f"data folder {data.data_dir} not found: download {DATA_URL} and unzip it there before "
                            "launching several processes (they must not all fetch it at once)")
        fetch_data(data.data_url, Path(data.data_dir), ask=not data.download, dataset=data.dataset)


def metric_name(data: DataConfig) -> str:
    """The METRICS entry that scores this dataset (or --custom_metric), tolerant with --tolerant_equations."""
    name = data.custom_metric or DATASETS[data.dataset].metric
    return "equation_tolerant" if name == "equation" and data.tolerant_equations else name


def uses_samples(data: DataConfig) -> bool:
    """Whether every teacher sample is loaded: to choose among them, or for the teacher audit of --label_type llm."""
    return data.llm not in ("none", "dataset") and (data.rationales != "first" or data.label_type == "llm")


def teacher_audits(data: DataConfig, splits) -> dict[str, dict]:
    """The teacher audit (rationales.audit) of train, as subsampled, and of test."""
    classes = DATASETS[data.dataset].classes
    return {name: audit(splits[name]["llm_labels"], splits[name]["label"], metric_name(data), classes)
            for name in ("train", "test")}


def prepare_splits(data: DataConfig, seed: int, eos: str, keep_valid: bool = False,
                   record: dict | None = None, cache_dir: Path | None = None) -> DatasetDict:
    """The paper's data pipeline: load, subsample (seeded), carve valid, then swap in teacher labels if asked.
    With --rationales other than first, train gets the `rationales` chosen per input (rationales.py). valid is kept
    only with keep_valid (it selects the checkpoint, or is dumped). `record`, if given, receives what results.json
    keeps of this: the teacher audit, the kept counts and the teacher budget of the rows (teacher_cost.run_budget).
    With a cache_dir, the splits as read from their files are kept there for later runs (token_cache.py)."""
    record = {} if record is None else record
    splits = load_data(data.dataset, data.data_dir, llm=data.llm, eos=eos, fraction=data.subsample, seed=seed,
                       fixed_valid=data.fixed_valid, samples=uses_samples(data), cache_dir=cache_dir,
                       write_cache=is_main_process())
    budget = run_budget(data.data_dir, data.dataset, data.llm, data.subsample)
    if budget is not None:  # an annotate.py teacher that recorded its cost
        record["teacher_budget"] = budget
    if data.label_type == "llm":
        record["teacher_audit"] = teacher_audits(data, splits)
        if is_main_process():
            score = METRICS[metric_name(data)]
            print(f"LLM Train Acc: {score(list(splits['train']['llm_label']), list(splits['train']['label'])):.4f}")
            print(f"LLM Test Acc: {score(list(splits['test']['llm_label']), list(splits['test']['label'])):.4f}")
            for name, split_audit in record["teacher_audit"].items():
                print(describe_audit(name, split_audit))
    if data.rationales != "first":
        splits["train"] = choose_rationales(splits["train"], data.rationales, metric_name(data))
        record["rationale_counts"] = kept_counts(splits["train"], data.rationales)
        if is_main_process():
            print(describe_counts(record["rationale_counts"]))
    if uses_samples(data):  # what is kept of the samples is in `rationales` and `llm_label` now
        for name in splits:
            splits[name] = splits[name].remove_columns(["llm_rationales", "llm_labels"])
    if data.label_type == "llm":
        splits["train"] = splits["train"].remove_columns("label").rename_column("llm_label", "label")
    if data.llm != "none":
        for name in splits:
            splits[name] = splits[name].rename_column("llm_rationale", "rationale")
    # Only what is evaluated gets tokenised.
    if not keep_valid:
        del splits["valid"]
    if data.max_eval_samples:
        for name in splits.keys() - {"train"}:
            splits[name] = splits[name].select(range(min(data.max_eval_samples, len(splits[name]))))
    return splits


def run_splits(config: RunConfig, eos: str, record: dict | None = None) -> DatasetDict:
    """prepare_splits as this run needs them: valid kept where it selects the checkpoint or is dumped, files read
    through the run's cache."""
    keep_valid = config.training.select_on == "valid" or config.output.dump_data is not None
    return prepare_splits(config.data, config.training.seed, eos, keep_valid, record, cache_folder(config.output))


def cache_folder(output: OutputConfig) -> Path | None:
    """Where the run keeps what it read and tokenised for later runs (--cache_dir, $DSS_CACHE, ~/.cache/dss); None
    with --no_cache."""
    if output.no_cache:
        return None
    return Path(output.cache_dir) if output.cache_dir else default_cache_dir()


def dump_data(config: RunConfig) -> None:
    """--dump_data: the prepared rows and their token ids, from the tokenizer alone (no model weights are read)."""
    from transformers import AutoTokenizer

    path, name = Path(config.output.dump_data), config.student.from_pretrained
    if path.exists():
        raise RunError(f"--dump_data {path} already exists: remove it or choose another file")
    if not path.parent.is_dir():
        raise RunError(f"--dump_data {path}: folder {path.parent} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise RunError(f"could not load the tokenizer of --from_pretrained {name!r} ({first_line(e)}); "
                       "pass a local directory holding it, or a reachable hub id") from None
    splits = run_splits(config, tokenizer.eos_token)
    model_type = config.training.model_type
    tokenized = tokenize_seq2seq(splits, tokenizer, model_type, config.training.max_input_length)
    count = write_prepared_rows(path, splits, tokenized, model_type)
    print(f"wrote {count} rows ({', '.join(f'{name} {len(split)}' for name, split in splits.items())}) to {path}")


def run_distillation(training: TrainingConfig, model, tokenizer, tokenized: DatasetDict):
    """--kd_weight > 0: the run's distill.Distillation, its online teacher loaded or its store opened (the training
    rows then carry kd_row, their index in the store); None otherwise, and the paper's loss trains alone."""
    if training.kd_weight == 0:
        return None
    from distill import Distillation, load_teacher, output_rows
    from logit_store import open_store

    vocabulary = output_rows(unwrap_peft(model))
    teacher = store = None
    if training.kd_teacher:
        teacher = load_teacher(training.kd_teacher, model, tokenizer)
    else:
        store = open_store(training.kd_logits, tokenized["train"], tokenizer, vocabulary)
        tokenized["train"] = tokenized["train"].add_column("kd_row", list(range(len(tokenized["train"]))))
    return Distillation(training.kd_weight, training.kd_temperature, training.kd_loss, vocabulary, teacher, store)


def distillation_collator(collate: Callable, distillation) -> Callable:
    """The family's collator, plus the teacher's stored top-k for distillation from a store."""
    if distillation is None or distillation.store is None:
        return collate
    from logit_store import TopKCollator

    return TopKCollator(collate, distillation.store)


def warn_of_a_batch_beyond_the_split(batch_size: int, rows: int) -> None:
    """A batch larger than the training split is the whole split at every step: memory for all of its rows at once,
    which a mistyped --batch_size makes a kernel kill rather than a run."""
    if batch_size > rows:
        print(f"warning: --batch_size {batch_size} is larger than the training split ({rows} rows): every step trains "
              f"on all {rows} rows at once; choose a --batch_size of at most {rows} to train on batches",
              file=sys.stderr)


# ---- the run ----


def train(config: RunConfig) -> int:
    """The whole run, as its folder's only writer: check, load, prepare the data, train, record; the exit status,
    with a user's mistake or an interruption said in one line."""
    data_parallel = data_parallel_size(config.student.parallelize)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        with run_folder(*config.run_dirs(data_parallel), is_main_process(), share_refusal=launched) as refusal:
            return train_in_folder(config, data_parallel, refusal)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130


def train_in_folder(config: RunConfig, data_parallel: int, refusal: str | None = None) -> int:
    """train's steps inside the locked run folder; refusal: rank 0's refusal of the run folder in a launched run,
    raised in every process as soon as they have all joined (recovery.stop_together)."""
    training = config.training
    try:
        if config.output.dump_data:
            dump_data(config)
            return 0
        check_devices(config)
        ckpt_dir, log_dir = config.run_dirs(data_parallel)
        if config.output.resume and (ckpt_dir / "results.json").is_file():
            if is_main_process():
                print(f"run already finished: see {ckpt_dir / 'results.json'}")
            return 0
        if config.output.resume:
            check_same_run(config.flags(), ckpt_dir)
        ensure_data(config.data)
        # Before the student: a launched run's process group and a ZeRO-3 config must exist when weights load.
        training_args = training_arguments(training, ckpt_dir, log_dir)
        stop_together(refusal)
        family, tokenizer, model = load_student(config.student, training.seed)
        if is_main_process():
            trainable, total = parameter_counts(model)
            print(f"student {model.config.model_type} ({family.name}): {trainable:,} of {total:,} parameters trainable")
        rationales = config.data.rationales
        if rationales != "first" and family.prompt_in_output:
            raise RunError(f"--rationales {rationales} is implemented for encoder-decoder students only; "
                           "use --rationales first with a decoder-only student")
        record_extra: dict = {}
        splits = run_splits(config, family.segment_joiner(tokenizer), record_extra)
        tokenized = cached_tokenize(cache_folder(config.output), family.tokenize, splits, tokenizer, training.model_type,
                                    training.max_input_length, config.student.chat_template,
                                    write=is_main_process())
        if is_main_process():
            warn_of_a_batch_beyond_the_split(training.batch_size, len(tokenized["train"]))
        if rationales != "first" and training.model_type == "task_prefix":
            tokenized["train"] = tokenize_kept_rationales(
                tokenized["train"], splits["train"]["rationales"], original_t5_pretokenization(tokenizer),
                MAX_TARGET_LENGTH,
            )
        distillation = run_distillation(training, model, tokenizer, tokenized)
        guard = FaultGuard()
        with faults_explained(guard, ckpt_dir, model):
            teacher_test = None
            if training.eval_rationales:
                teacher_test = splits["test"].select_columns(["rationale", "llm_label"])
            record = train_and_evaluate(config, data_parallel, training_args, model, tokenizer, tokenized,
                                        metric_name(config.data), record_extra, guard, teacher_test, distillation)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if record is not None:
        print(f"best test accuracy {record['best_test_accuracy']:.4f}; "
              f"selected ({training.select_on}) test accuracy {record['selected_test_accuracy']:.4f}; "
              f"results in {ckpt_dir / 'results.json'}")
    return 0
