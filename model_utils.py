"""The multi-task data collator and the task-prefix trainer of distilling step-by-step."""

from contextlib import nullcontext
from typing import Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Seq2SeqTrainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from faithful_training import EpochOfStream, OriginalAdamW, OriginalBatchOrder
from recovery import ReadableBest, fall_back_to_readable_best
from speedups import enabled, grouped_loss

LABEL_PAD = -100


def _pad(sequences: list[list[int]], value: int, pad_to_multiple_of: int | None) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def collate_view(
    features: list[dict], pad_token_id: int, input_key: str, label_key: str | None, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    """One view's batch, padded to its own longest row: labels with -100 so padding never counts in the loss."""
    input_ids = _pad([f[input_key] for f in features], pad_token_id, pad_to_multiple_of)
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).long()}
    if label_key is not None and label_key in features[0]:
        batch["labels"] = _pad([f[label_key] for f in features], LABEL_PAD, pad_to_multiple_of)
    return batch


class TaskPrefixDataCollator:
    """Batches both views of each example: `pred` (predict: input -> label), `expl` (explain: input -> rationale).

    Each view is padded on its own, since labels are a few tokens and rationales up to 256. Rows are
    pre-tokenised lists of ids, so collation is plain tensor filling.

    Rows with `kept_rationale_labels` (run.py --rationales all/correct/vote) have any number of rationales: the
    explain view then holds one row per kept rationale of the batch's inputs, and is None where none of them kept one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {"pred": collate_view(features, self.pad_token_id, "input_ids", "labels", self.pad_to_multiple_of)}
        if "kept_rationale_labels" in features[0]:
            rows = [
                {"expl_input_ids": f["expl_input_ids"], "rationale_labels": ids}
                for f in features
                for ids in f["kept_rationale_labels"]
            ]
            batch["expl"] = (
                collate_view(rows, self.pad_token_id, "expl_input_ids", "rationale_labels", self.pad_to_multiple_of)
                if rows
                else None
            )
        elif "expl_input_ids" in features[0]:
            batch["expl"] = collate_view(
                features, self.pad_token_id, "expl_input_ids", "rationale_labels", self.pad_to_multiple_of
            )
        return batch


class StandardDataCollator(TaskPrefixDataCollator):
    """Input -> label only (standard finetuning and standard distillation); same batch shape as task_prefix."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {"pred": collate_view(features, self.pad_token_id, "input_ids", "labels", self.pad_to_multiple_of)}


def two_pass_loss(model, inputs: dict[str, dict[str, torch.Tensor]], alpha: float):
    """The paper's formulation: one full forward pass per view, each padded to its own longest row.

    Returns (loss, {"pred": outputs, "expl": outputs or None}); kept as the reference that grouped_loss must equal.
    """
    pred_outputs = model(**inputs["pred"])
    loss = pred_outputs.loss
    expl_outputs = None
    if "expl" in inputs:
        expl_outputs = model(**inputs["expl"])
        loss = alpha * loss + (1.0 - alpha) * expl_outputs.loss
    return loss, {"pred": pred_outputs, "expl": expl_outputs}


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (its LoRA layers stay injected there), else the model itself."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


class TaskPrefixTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose loss is alpha * label loss + (1 - alpha) * rationale loss, and whose evaluation
    only generates (greedy), skipping the loss forward pass that accuracy does not need.

    It trains as the original's Trainer (transformers 4.30) did, step for step: the same batches in the same order
    (faithful_training.OriginalBatchOrder), each micro-batch's mean loss divided by --grad_steps, and AdamW with
    4.30's arithmetic (faithful_training.OriginalAdamW).
    """

    def __init__(
        self,
        *args,
        alpha: float = 0.5,
        gen_max_len: int = 64,
        output_rationale: bool = False,
        family=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        # The student's students.StudentFamily (fast loss, generation settings); None: a T5-like seq2seq student.
        self.family = family
        self.gen_max_len = gen_max_len
        self.output_rationale = output_rationale
        self.generation_overrides = family.generation if family else {}
        # Best checkpoints passed over as gone or unreadable (recovery.ReadableBest, _load_best_model), for the record.
        self.unreadable_best: list[dict] = []
        self.add_callback(ReadableBest(self.unreadable_best))
        # compute_loss returns each micro-batch's mean loss and ignores num_items_in_batch, so the Trainer must divide
        # it by the accumulation steps, as 4.30 did; this says so whatever the model's forward accepts.
        self.model_accepts_loss_kwargs = False

    def _load_best_model(self) -> None:
        """The selected model, from the best checkpoint or, where its weights cannot be read (damaged after it was
        written), from the best evaluation whose checkpoint can be (recovery.fall_back_to_readable_best)."""
        self.unreadable_best += fall_back_to_readable_best(self.state, self.args, say=self.is_world_process_zero())
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

    def grouped_loss_applies(self, model) -> bool:
        """grouped_loss calls the encoder and decoder directly, which a DDP/FSDP/DeepSpeed wrapper does not allow
        (their gradient sync and parameter gathering hang on the wrapper's forward), nor a model split over GPUs."""
        model = unwrap_peft(model)
        applies = self.family.fast_loss_applies if self.family else lambda m: all(
            hasattr(m, name) for name in ("encoder", "decoder", "lm_head", "_shift_right"))
        return (
            isinstance(model, PreTrainedModel)
            and applies(model)
            and self.accelerator.num_processes == 1
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            # --parallelize spreads layers over GPUs; the regrouped tensors would cross devices.
            and len(set(getattr(model, "hf_device_map", {}).values())) <= 1
            and enabled("grouped_loss")
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha * label loss + (1 - alpha) * rationale loss: by grouped_loss (the same value, with one encoder pass
        and less padding) where it applies; by the two-pass formulation where outputs are wanted or it does not."""
        if "expl" in inputs and inputs["expl"] is None:
            # No input of this batch kept a rationale (--rationales all/correct/vote): the label loss keeps weight alpha.
            result = self.compute_loss(model, {"pred": inputs["pred"]}, return_outputs, num_items_in_batch)
            return (self.alpha * result[0], result[1]) if return_outputs else self.alpha * result
        if return_outputs or not self.grouped_loss_applies(model):
            loss, outputs = two_pass_loss(model, inputs, self.alpha)
            return (loss, outputs) if return_outputs else loss
        views, weights = [inputs["pred"]], [1.0]
        if "expl" in inputs:
            views, weights = [inputs["pred"], inputs["expl"]], [self.alpha, 1.0 - self.alpha]
        fast_loss = self.family.fast_loss if self.family else grouped_loss
        return fast_loss(unwrap_peft(model), views, weights)

    def _generate(self, view: dict[str, torch.Tensor]) -> torch.Tensor:
        # With sharded weights (ZeRO-3, FSDP) every process must keep stepping until all have finished
        # (synced_gpus), or one waits forever for another's shards; FSDP1 gathers the whole model, as
        # Seq2SeqTrainer does.
        full_weights = (
            FullyShardedDataParallel.summon_full_params(self.model)
            if isinstance(self.model, FullyShardedDataParallel)
            else nullcontext()
        )
        with full_weights:
            tokens = self.model.generate(
                input_ids=view["input_ids"],
                attention_mask=view["attention_mask"],
                # gen_max_len counts the decoder's start token, as the original's generation_max_length did.
                max_new_tokens=self.gen_max_len - 1,
                num_beams=1,
                do_sample=False,
                synced_gpus=self.is_fsdp_enabled or is_deepspeed_zero3_enabled(),
                **self.generation_overrides,
            )
        if self.family and self.family.prompt_in_output:
            tokens = tokens[:, view["input_ids"].shape[1] :]  # decoder-only: score the continuation only
        # Pad to a fixed width so batches can be concatenated and gathered across processes.
        width = self.gen_max_len
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
                predictions = (predictions, self._generate(expl))
        labels = pred["labels"]
        # Padded to the generation width as Seq2SeqTrainer does, never cut: gold labels are scored whole.
        if labels.shape[1] < self.gen_max_len:
            labels = torch.nn.functional.pad(labels, (0, self.gen_max_len - labels.shape[1]), value=LABEL_PAD)
        return None, predictions, labels
