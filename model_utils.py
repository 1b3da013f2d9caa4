"""The method of distilling step-by-step: both views of each example batched, the paper's loss, and the trainer.

Each training example gives two views (views.py): `predict: <input>` -> label and `explain: <input>` -> rationale.
Per batch the student is trained on the paper's loss

    alpha * label_loss + (1 - alpha) * rationale_loss

where label_loss is the mean token cross-entropy of the predict view's targets and rationale_loss that of the
explain view's (standard mode has the predict view alone, without prefix, and trains on label_loss). That is one
operation, a weighted sum over views of each view's mean token cross-entropy: TaskPrefixTrainer.weighted_view_loss
(model, views, weights). Its plain implementation, one_pass_per_view, is the definition itself (one full forward
pass per view); fast_loss.py holds faster implementations of the same value, which the trainer takes where
TaskPrefixTrainer.fast_loss_applies says they apply (by default, on one device).

With token-level distillation (--kd_weight beta > 0, distill.py) the loss gains beta * kd_loss, taken on the same
target tokens and weighted like the views; both implementations compute it.
"""

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from faithful_training import EpochOfStream, OriginalAdamW, OriginalBatchOrder
from recovery import ReadableBest, fall_back_to_readable_best
from speedups import (decoding_cache, drop_finished_applies, enabled, generate_dropping_finished, gradient_norm,
                      return_freed_memory)
from views import VIEWS

if TYPE_CHECKING:
    from students import StudentFamily

# The labels' padding, which the loss leaves out (Hugging Face's losses ignore -100).
LABEL_PAD = -100


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Rows of ids as one [rows, longest row] tensor, filled with value after each row (before it, with left)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            start = width - len(row) if left else 0
            out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def length_mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    """1 at real tokens. From lengths, not ids: a decoder-only student's pad token is often its EOS, a real target."""
    return pad([[1] * len(row) for row in rows], 0, left)


def collate_view(features: list[dict], pad_token_id: int, input_key: str, label_key: str) -> dict[str, torch.Tensor]:
    """One seq2seq view's batch, padded to its own longest row: labels with LABEL_PAD, so padding never counts in
    the loss."""
    input_ids = pad([f[input_key] for f in features], pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).long()}
    if label_key in features[0]:
        batch["labels"] = pad([f[label_key] for f in features], LABEL_PAD)
    return batch


class TaskPrefixDataCollator:
    """Batches both views of each example for a seq2seq student: `pred` (predict: input -> label), `expl`
    (explain: input -> rationale).

    Each view is padded on its own, since labels are a few tokens and rationales up to 256. Rows are
    pre-tokenised lists of ids (views.py), so collation is plain tensor filling.

    Rows with `kept_rationale_labels` (run.py --rationales all/correct/vote) have any number of rationales: the
    explain view then holds one row per kept rationale of the batch's inputs, and is None where none of them kept one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {"pred": collate_view(features, self.pad_token_id, "input_ids", "labels")}
        if "kept_rationale_labels" in features[0]:
            rows = [
                {"expl_input_ids": f["expl_input_ids"], "rationale_labels": ids}
                for f in features
                for ids in f["kept_rationale_labels"]
            ]
            batch["expl"] = (
                collate_view(rows, self.pad_token_id, "expl_input_ids", "rationale_labels") if rows else None
            )
        elif "expl_input_ids" in features[0]:
            batch["expl"] = collate_view(features, self.pad_token_id, "expl_input_ids", "rationale_labels")
        return batch


class StandardDataCollator(TaskPrefixDataCollator):
    """Input -> label only (standard finetuning and standard distillation); same batch shape as task_prefix."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {"pred": collate_view(features, self.pad_token_id, "input_ids", "labels")}


class CausalViewsCollator:
    """Each view as decoder-only sequences. Per view v:

    - batch[v]: prompt + target, right-padded; labels are LABEL_PAD at the prompt and padding (the training loss);
    - batch[v + "_prompt"]: the prompts alone, left-padded, and the targets as labels (generation and scoring).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {}
        for view, prompt_key, target_key in VIEWS:
            if prompt_key not in features[0]:
                continue
            prompts, targets = [f[prompt_key] for f in features], [f[target_key] for f in features]
            sequences = [p + t for p, t in zip(prompts, targets)]
            batch[view] = {
                "input_ids": pad(sequences, self.pad_token_id),
                "attention_mask": length_mask(sequences),
                "labels": pad([[LABEL_PAD] * len(p) + t for p, t in zip(prompts, targets)], LABEL_PAD),
            }
            batch[view + "_prompt"] = {
                "input_ids": pad(prompts, self.pad_token_id, left=True),
                "attention_mask": length_mask(prompts, left=True),
                "labels": pad(targets, LABEL_PAD),
            }
        return batch


def seq2seq_collator(tokenizer: PreTrainedTokenizerBase, model_type: str):
    return (TaskPrefixDataCollator if model_type == "task_prefix" else StandardDataCollator)(tokenizer)


def causal_collator(tokenizer: PreTrainedTokenizerBase, model_type: str) -> CausalViewsCollator:
    return CausalViewsCollator(tokenizer)


def one_pass_per_view(model, views: list[dict[str, torch.Tensor]], weights: list[float], kd=None):
    """weighted_view_loss's plain implementation, the definition itself: one full forward pass per view, each padded
    to its own longest row, whose .loss is the view's mean token cross-entropy (LABEL_PAD left out); the loss is
    sum_v weights[v] * that, plus, with kd (distill.KdTerm), beta * kd_loss from the same logits. Returns (loss, the
    passes' outputs)."""
    outputs = [model(**view) for view in views]
    loss = weights[0] * outputs[0].loss
    for weight, output in zip(weights[1:], outputs[1:]):
        loss = loss + weight * output.loss
    if kd is not None:
        loss = loss + kd.plain_loss(model, outputs, views, weights)
    return loss, outputs


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (its LoRA layers stay injected there), else the model itself."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


class TaskPrefixTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose loss is alpha * label loss + (1 - alpha) * rationale loss, and whose evaluation
    only generates (greedy), skipping the loss forward pass that accuracy does not need.

    It trains as the original's Trainer (transformers 4.30) did, step for step: the same batches in the same order
    (faithful_training.OriginalBatchOrder), each micro-batch's mean loss divided by --grad_steps, and AdamW with
    4.30's arithmetic (faithful_training.OriginalAdamW).

    family: the student's students.StudentFamily (its fast loss, generation settings).
    distillation: the run's token-level distillation (distill.Distillation, --kd_weight > 0), else None: the paper's
    loss alone.
    """

    def __init__(
        self,
        *args,
        family: "StudentFamily",
        alpha: float = 0.5,
        gen_max_len: int = 64,
        output_rationale: bool = False,
        distillation=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.family = family
        self.gen_max_len = gen_max_len
        self.output_rationale = output_rationale
        self.distillation = distillation
        self.generation_overrides = family.generation
        # Tokens a generated rationale may take, the start token counted; None: gen_max_len, as labels.
        self.rationale_gen_max_len: int | None = None
        # Best checkpoints passed over as gone or unreadable (recovery.ReadableBest, _load_best_model), for the record.
        self.unreadable_best: list[dict] = []
        self.add_callback(ReadableBest(self.unreadable_best))
        # compute_loss returns each micro-batch's mean loss and ignores num_items_in_batch, so the Trainer must divide
        # it by the accumulation steps, as 4.30 did; this says so whatever the model's forward accepts.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The paper's loss on one batch: alpha * label_loss + (1 - alpha) * rationale_loss, plus beta * kd_loss with
        token-level distillation (distill.py: kd_loss weighted like the views, alpha and 1 - alpha).

        return_outputs: also each view's model outputs, {"pred": ..., "expl": ... or None}, from the plain
        implementation (the only one that has them).
        """
        label_view, rationale_view = inputs["pred"], inputs.get("expl")
        if rationale_view is not None:
            # alpha * label_loss + (1 - alpha) * rationale_loss
            views, weights = [label_view, rationale_view], [self.alpha, 1.0 - self.alpha]
        else:
            # Standard mode: label_loss alone. With --rationales all/correct/vote, a batch where no input kept a
            # rationale: alpha * label_loss, below.
            views, weights = [label_view], [1.0]
        # + beta * kd_loss, kd_loss = sum_v weights[v] * mean over view v's target tokens of T^2 * D(teacher, student)
        # (distill.py); without --kd_weight no term is built and the loss is the paper's alone.
        kd = None if self.distillation is None else self.distillation.term(inputs, views)
        if return_outputs:
            loss, outputs = one_pass_per_view(model, views, weights, kd)
        else:
            loss, outputs = self.weighted_view_loss(model, views, weights, kd), None
        if "expl" in inputs and rationale_view is None:
            loss = self.alpha * loss
        if not return_outputs:
            return loss
        return loss, {"pred": outputs[0], "expl": outputs[1] if rationale_view is not None else None}

    def weighted_view_loss(self, model, views: list[dict[str, torch.Tensor]], weights: list[float],
                           kd=None) -> torch.Tensor:
        """sum_v weights[v] * (mean token cross-entropy of view v's targets), plus kd's term where given: by the
        family's fast implementation (fast_loss.py: the same value with less work) where fast_loss_applies, else by
        one_pass_per_view."""
        if self.fast_loss_applies(model):
            if kd is None:
                return self.family.fast_loss(unwrap_peft(model), views, weights)
            return self.family.fast_loss(unwrap_peft(model), views, weights, kd)
        return one_pass_per_view(model, views, weights, kd)[0]

    def fast_loss_applies(self, model) -> bool:
        """The family's fast implementation calls the model's modules directly (T5's encoder and decoder, a
        decoder-only base model, the lm_head): for a model it applies to (family.fast_loss_applies), unless a
        DDP/FSDP/DeepSpeed wrapper stands between (their gradient sync and parameter gathering hang on the wrapper's
        forward) or the model is split over GPUs, and unless switched off (DSS_DISABLE_SPEEDUPS=
        grouped_loss)."""
        model = unwrap_peft(model)
        return (
            isinstance(model, PreTrainedModel)
            and self.family.fast_loss_applies(model)
            and self.accelerator.num_processes == 1
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            # --parallelize spreads layers over GPUs; the regrouped tensors would cross devices.
            and len(set(getattr(model, "hf_device_map", {}).values())) <= 1
            and enabled("grouped_loss")
        )

    def _clip_grad_norm(self, model) -> torch.Tensor:
        """The Trainer's clipping, each gradient times min(1, max_grad_norm / (norm + 1e-6)) as clip_grad_norm_
        computes it, with the scaling left to the fused AdamW step that follows (fused_clip): it divides the gradients
        by the inverse in the pass over them it makes anyway, instead of a pass of their own. Callbacks between the
        two (on_pre_optimizer_step) see the gradients unclipped; the step writes them back clipped. Where the step
        cannot do it (another optimizer, a GradScaler, DeepSpeed, FSDP, gradients on several device meshes) or
        fused_clip is off, the Trainer's own. Returns the norm before clipping."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's AcceleratedOptimizer
        if not (enabled("fused_clip") and isinstance(optimizer, OriginalAdamW) and optimizer.divides_in_step
                and self.accelerator.scaler is None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
                and not self._has_mixed_mesh_grads(model)):
            return super()._clip_grad_norm(model)
        norm = gradient_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.divide_next_step_gradients(((norm.float() + 1e-6) / self.args.max_grad_norm).clamp(min=1.0))
        return norm

    def _load_best_model(self) -> None:
        """The selected model, from the best checkpoint or, where its weights cannot be read (damaged after it was
        written), from the best evaluation whose checkpoint can be (recovery.fall_back_to_readable_best).

        Training is over here (every checkpoint is written), so the optimizer's moments, two copies of the
        weights' size, are freed first and the heap returned to the system: the checkpoint's weights, read in
        beside the model, then stay under the training peak instead of adding to it. DeepSpeed and FSDP load
        through their engines, which keep theirs."""
        self.unreadable_best += fall_back_to_readable_best(self.state, self.args, say=self.is_world_process_zero())
        if self.optimizer is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self.optimizer.state.clear()
            return_freed_memory()
        super()._load_best_model()

    def train_batch_order(self) -> OriginalBatchOrder:
        """The run's micro-batches, max_steps x grad_steps of them, in the original's order for this process."""
        if self.args.max_steps <= 0:
            raise ValueError("TaskPrefixTrainer trains for max_steps: set max_steps in the training arguments")
        return OriginalBatchOrder(
            len(self.train_dataset), self._train_batch_size, self.args.seed,
            self.args.max_steps * self.args.gradient_accumulation_steps,
            world_size=self.args.world_size, rank=self.args.process_index,
        )

    def get_train_dataloader(self) -> DataLoader:
        """The original's batches as a plain DataLoader: accelerate would swap in its own sampler and, across
        processes, hand out whole batches where 4.30 gave each process its own rows (_prepare_inputs moves them)."""
        order = self.train_batch_order()
        if not any(isinstance(callback, EpochOfStream) for callback in self.callback_handler.callbacks):
            self.add_callback(EpochOfStream(order.batches_per_epoch()))
        return DataLoader(self.train_dataset, batch_sampler=order, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """The Trainer's optimizer for args.optim, with torch's AdamW doing 4.30's AdamW arithmetic."""
        optimizer_cls, kwargs = Seq2SeqTrainer.get_optimizer_cls_and_kwargs(args, model)
        return (OriginalAdamW if optimizer_cls is torch.optim.AdamW else optimizer_cls), kwargs

    def _generate(self, view: dict[str, torch.Tensor], max_len: int | None = None) -> torch.Tensor:
        """Greedy continuations of a view's prompts, up to max_len tokens with the start token (default
        gen_max_len), padded to that width."""
        width = max_len or self.gen_max_len
        # With sharded weights (ZeRO-3, FSDP) every process must keep stepping until all have finished
        # (synced_gpus), or one waits forever for another's shards; FSDP1 gathers the whole model, as
        # Seq2SeqTrainer does.
        full_weights = (
            FullyShardedDataParallel.summon_full_params(self.model)
            if isinstance(self.model, FullyShardedDataParallel)
            else nullcontext()
        )
        cache = decoding_cache(self.model, width)
        sharded = self.is_fsdp_enabled or is_deepspeed_zero3_enabled()
        # gen_max_len counts the decoder's start token, as the original's generation_max_length did.
        settings = dict(max_new_tokens=width - 1, num_beams=1, do_sample=False, **self.generation_overrides)
        with full_weights:
            if drop_finished_applies(self.model, sharded):
                tokens = generate_dropping_finished(self.model, view["input_ids"], view["attention_mask"],
                                                    cache=cache, **settings)
            else:
                tokens = self.model.generate(
                    input_ids=view["input_ids"], attention_mask=view["attention_mask"], synced_gpus=sharded,
                    **settings, **({} if cache is None else {"cache": cache}),
                )
        if self.family.prompt_in_output:
            tokens = tokens[:, view["input_ids"].shape[1] :]  # decoder-only: score the continuation only
        # Pad to a fixed width so batches can be concatenated and gathered across processes.
        pad = self.processing_class.pad_token_id
        return torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=pad)

    def evaluation_loop(self, *args, **kwargs):
        # Seq2SeqTrainer.evaluate/predict switch to plain `gather` (transformers PR #27025, for several sequences
        # per input), which keeps the copies of rows that even out the last batch across processes. We return one
        # row per input, so gather_for_metrics, which drops those copies, counts each test row exactly once.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = self._prepare_inputs(inputs)
        # Decoder-only students generate from their views' prompts alone ("<view>_prompt", see students.py).
        pred, expl = inputs.get("pred_prompt", inputs["pred"]), inputs.get("expl_prompt", inputs.get("expl"))
        with torch.no_grad():
            predictions = self._generate(pred)
            if self.output_rationale and expl is not None:
                predictions = (predictions, self._generate(expl, self.rationale_gen_max_len))
        labels = pred["labels"]
        # Padded to the generation width as Seq2SeqTrainer does, never cut: gold labels are scored whole.
        if labels.shape[1] < self.gen_max_len:
            labels = torch.nn.functional.pad(labels, (0, self.gen_max_len - labels.shape[1]), value=LABEL_PAD)
        return None, predictions, labels
