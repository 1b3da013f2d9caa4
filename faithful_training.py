"""Training step for step as the original's: its batches in its order, and its AdamW arithmetic.

The original code trained with transformers 4.30.2's Trainer (accelerate 0.20.3). Today's Trainer feeds other
batches (accelerate's seedable sampler), normalises gradient accumulation at epoch ends otherwise, and its default
AdamW adds eps elsewhere. This module holds what makes the project's training follow the original's instead; the
trainer (model_utils.TaskPrefixTrainer) uses it by default.
"""

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback


def sampler_generator(seed: int) -> torch.Generator:
    """The generator of 4.30's RandomSampler for a one-process run seeded `seed`.

    4.30 seeded that generator with the first int64 drawn from the global torch generator right after the Trainer's
    set_seed(seed); a fresh generator seeded `seed` draws the same value, so the order depends on the seed alone.
    """
    seeded = torch.Generator().manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_(generator=seeded).item()))
    return generator


def one_process_epochs(num_rows: int, seed: int) -> Iterator[list[int]]:
    """Each epoch's row order in a one-process run (nn.DataParallel included), as 4.30's RandomSampler gave it.

    Every epoch the sampler yields one permutation of that generator, then, once exhausted, draws a second one of
    which it yields nothing (its `[:num_samples % n]` tail): epoch e is the generator's permutation 2e (from 0).
    """
    generator = sampler_generator(seed)
    while True:
        order = torch.randperm(num_rows, generator=generator).tolist()
        torch.randperm(num_rows, generator=generator)
        yield order


def distributed_epochs(num_rows: int, seed: int, world_size: int, rank: int) -> Iterator[list[int]]:
    """Each epoch's rows for process `rank` of `world_size`, as 4.30's DistributedSampler gave them (shuffle on,
    nothing dropped): a permutation seeded seed + epoch, its first rows repeated until every process gets as many,
    then every world_size-th row from position rank."""
    per_process = math.ceil(num_rows / world_size)
    total = per_process * world_size
    for epoch in itertools.count():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        padded = (order * math.ceil(total / num_rows))[:total]
        yield padded[rank:total:world_size]


class OriginalBatchOrder(Sampler[list[int]]):
    """The micro-batches of a whole run, in the order 4.30's Trainer fed them, as one batch sampler.

    Each epoch's rows (one_process_epochs, or distributed_epochs under several processes) are cut into batches of
    batch_size, the last one smaller, and the epochs follow one another. 4.30 counted micro-batches over the whole
    run and stepped the optimizer after every grad_steps of them, so with gradient accumulation a step could take
    the end of one epoch and the start of the next; today's Trainer starts every epoch with a fresh accumulation
    window and normalises a short last one by its own length. Given the run as one stream of num_batches
    (max_steps x grad_steps) micro-batches, the Trainer cuts the same windows as 4.30. The order follows from the
    seed alone, so a resumed run, which skips the batches it trained, sees the rest of the same stream.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, num_batches: int, world_size: int = 1,
                 rank: int = 0):
        if num_rows < 1:
            raise ValueError("the training split has no rows")
        self.num_rows, self.batch_size, self.seed, self.num_batches = num_rows, batch_size, seed, num_batches
        self.world_size, self.rank = world_size, rank

    def epochs(self) -> Iterator[list[int]]:
        if self.world_size > 1:
            return distributed_epochs(self.num_rows, self.seed, self.world_size, self.rank)
        return one_process_epochs(self.num_rows, self.seed)

    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.num_rows / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = (rows[start : start + self.batch_size]
                   for rows in self.epochs() for start in range(0, len(rows), self.batch_size))
        return itertools.islice(batches, self.num_batches)


class EpochOfStream(TrainerCallback):
    """Keeps the Trainer's `epoch` (logs, trainer_state.json) in epochs of the data: it sees the run's one stream of
    batches (OriginalBatchOrder) as a single epoch."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step * args.gradient_accumulation_steps / self.batches_per_epoch


# The optimizer state key that keeps the eps the user gave, the one 4.30's AdamW added to the raw second moment's
# square root; the group's own "eps" is rewritten before every step.
EPS_ON_RAW_MOMENT = "eps_on_raw_moment"
# The optimizer state key that counts the group's steps, as each weight's state counts its own.
STEPS_TAKEN = "steps_taken"


class OriginalAdamW(torch.optim.AdamW):
    """torch's AdamW, fused or foreach kernel alike, doing the arithmetic of transformers 4.30's own AdamW, the
    Trainer's default then (`adamw_hf`), which the original trained with whatever --optimizer_name said.

    4.30's update at step t is lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps): eps joins the square
    root of the second moment before its bias correction. torch's joins it after, lr / (1 - beta1^t) * m /
    (sqrt(v / (1 - beta2^t)) + eps'), which is the same update for eps' = eps / sqrt(1 - beta2^t). So before each
    step every group's eps is set to that, and the kernel runs unchanged. Exact where every weight of a group has
    taken every step, as every trained weight of a T5 does (4.30 counted steps per weight, skipping a weight without
    a gradient). Weight decay (0 in the original and here) would still differ: 4.30 decays the updated weights.
    """

    @property
    def divides_in_step(self) -> bool:
        """Whether divide_next_step_gradients applies: the fused kernel, which takes a grad_scale."""
        return bool(self.defaults.get("fused"))

    def divide_next_step_gradients(self, divisor: torch.Tensor) -> None:
        """Have the next step divide every gradient by divisor (a one-element tensor) before its update, in the fused
        kernel's own pass over them: its grad_scale, which the kernel divides by and writes back, as it does for
        GradScaler's unscaling. The trainer's clipping (model_utils.TaskPrefixTrainer._clip_grad_norm) uses it
        instead of a pass of its own. Fused kernel only, and not beside a GradScaler, which sets grad_scale itself."""
        if not self.divides_in_step:
            raise ValueError("only the fused AdamW kernel divides the gradients in its step")
        self._next_divisor = divisor

    def step(self, closure=None):
        for group in self.param_groups:
            eps = group.setdefault(EPS_ON_RAW_MOMENT, group["eps"])
            if STEPS_TAKEN not in group:  # a fresh optimizer, or one saved by torch's AdamW
                group[STEPS_TAKEN] = next((int(self.state[p]["step"]) for p in group["params"] if self.state[p]), 0)
            group[STEPS_TAKEN] += 1
            group["eps"] = eps / math.sqrt(1.0 - group["betas"][1] ** group[STEPS_TAKEN])
        divisor = self.__dict__.pop("_next_divisor", None)
        if divisor is None:
            return super().step(closure)
        self.grad_scale = divisor  # torch's Adam.step hands the attribute to the fused kernel
        try:
            return super().step(closure)
        finally:
            del self.grad_scale
