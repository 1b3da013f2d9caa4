"""Training as the original's Trainer (transformers 4.30.2, accelerate 0.20.3) trained: batch order per seed and
epoch, resumed runs, AdamW's arithmetic, gradient accumulation across epoch ends, and the same run twice."""

import math

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from transformers import Adafactor, AutoTokenizer, T5ForConditionalGeneration, TrainerCallback

import speedups
from faithful_training import OriginalAdamW, OriginalBatchOrder
from config import TrainingConfig
from model_utils import TaskPrefixDataCollator, one_pass_per_view
from train_utils import build_trainer, training_arguments
from views import tokenize_seq2seq

# The rows of the original's first batch on cqa (8,766 prepared train rows, --run 0, batch 8):
# ../shared/parity/trajectory/cqa_tp_llm_s1.0_r0.jsonl, step 1.
ORIGINAL_FIRST_CQA_BATCH = [2262, 8531, 1654, 6870, 2765, 2875, 4563, 5084]


def random_sampler_batches(num_rows: int, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """What 4.30's Trainer fed a one-process run: after set_seed(seed), a RandomSampler whose generator is seeded
    with the global generator's next int64, iterated by a DataLoader once per epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    loader = DataLoader(range(num_rows), batch_size=batch_size,
                        sampler=RandomSampler(range(num_rows), generator=generator))
    return [batch.tolist() for _ in range(epochs) for batch in loader]


def distributed_sampler_batches(num_rows: int, batch_size: int, seed: int, epochs: int, world_size: int,
                                rank: int) -> list[list[int]]:
    """What 4.30's Trainer fed process `rank` under torchrun: a DistributedSampler seeded with the run, set_epoch
    before every epoch."""
    sampler = DistributedSampler(range(num_rows), num_replicas=world_size, rank=rank, seed=seed)
    loader = DataLoader(range(num_rows), batch_size=batch_size, sampler=sampler)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += [batch.tolist() for batch in loader]
    return batches


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_one_process_order_is_the_originals_every_epoch(seed):
    expected = random_sampler_batches(num_rows=10, batch_size=4, seed=seed, epochs=4)
    assert len(expected) == 12 and [len(batch) for batch in expected[:3]] == [4, 4, 2]
    assert list(OriginalBatchOrder(10, 4, seed, num_batches=12)) == expected
    assert list(OriginalBatchOrder(10, 4, seed, num_batches=7)) == expected[:7]
    assert list(OriginalBatchOrder(10, 4, seed + 1, num_batches=12)) != expected


def test_first_cqa_batch_is_the_originals():
    assert next(iter(OriginalBatchOrder(8766, 8, seed=0, num_batches=1))) == ORIGINAL_FIRST_CQA_BATCH


@pytest.mark.parametrize("num_rows, world_size", [(11, 3), (12, 2), (2, 3)])
def test_each_process_gets_the_originals_rows_every_epoch(num_rows, world_size):
    for rank in range(world_size):
        expected = distributed_sampler_batches(num_rows, 2, seed=5, epochs=3, world_size=world_size, rank=rank)
        order = OriginalBatchOrder(num_rows, 2, 5, num_batches=len(expected), world_size=world_size, rank=rank)
        assert list(order) == expected
        assert order.batches_per_epoch() * 3 == len(expected)


def hf_adamw_reference(weights, gradients, lr, betas, eps):
    """transformers 4.30's AdamW (correct_bias, no weight decay), written out: eps joins sqrt(v) before the bias
    correction, which scales the step size."""
    weights = [w.clone() for w in weights]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t, step_gradients in enumerate(gradients, start=1):
        for w, g, m_i, v_i in zip(weights, step_gradients, m, v):
            m_i.mul_(betas[0]).add_(g, alpha=1.0 - betas[0])
            v_i.mul_(betas[1]).addcmul_(g, g, value=1.0 - betas[1])
            step_size = lr * math.sqrt(1.0 - betas[1] ** t) / (1.0 - betas[0] ** t)
            w.addcdiv_(m_i, v_i.sqrt().add_(eps), value=-step_size)
    return weights


def run_optimizer(optimizer_cls, weights, gradients, resume_after=None, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_cls(params, **kwargs)
    for t, step_gradients in enumerate(gradients, start=1):
        for p, g in zip(params, step_gradients):
            p.grad = g.clone()
        optimizer.step()
        if t == resume_after:  # as a resumed run: a fresh optimizer given the saved state
            state = optimizer.state_dict()
            optimizer = optimizer_cls(params, **kwargs)
            optimizer.load_state_dict(state)
    return [p.detach() for p in params]


@pytest.mark.parametrize("kernel", [{"fused": True}, {"foreach": True}])
def test_adamw_does_the_originals_arithmetic(kernel):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, generator=generator), torch.randn(300, generator=generator)]
    # Gradients near eps, where eps is added matters, and ordinary ones; steps of about lr = 0.05.
    gradients = [[torch.randn(w.shape, generator=generator) * scale for w, scale in zip(weights, (3e-7, 1e-2))]
                 for _ in range(6)]
    settings = dict(lr=5e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    expected = hf_adamw_reference(weights, gradients, settings["lr"], settings["betas"], settings["eps"])
    for resume_after in (None, 3):
        ours = run_optimizer(OriginalAdamW, weights, gradients, resume_after, **settings, **kernel)
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1.2e-7)  # a float32 rounding of |w| < 1
    torch_adamw = run_optimizer(torch.optim.AdamW, weights, gradients, **settings, **kernel)
    moved = [(a - w).abs().max() for a, w in zip(expected, weights)]
    assert (torch_adamw[0] - expected[0]).abs().max() > 0.05 * moved[0], "the test must tell the two eps apart"


def test_adamw_divides_the_next_steps_gradients_in_its_own_pass():
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 32, generator=generator), torch.randn(300, generator=generator)]
    gradients = [[torch.randn(w.shape, generator=generator) for w in weights] for _ in range(3)]
    settings = dict(lr=5e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    divisor = torch.tensor(7.0)
    divided = [[g / divisor if t == 1 else g for g in step] for t, step in enumerate(gradients)]
    expected = run_optimizer(OriginalAdamW, weights, divided, **settings)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = OriginalAdamW(params, **settings)
    for t, step_gradients in enumerate(gradients):
        for p, g in zip(params, step_gradients):
            p.grad = g.clone()
        if t == 1:  # the second step only: the divisor is not kept for the third
            optimizer.divide_next_step_gradients(divisor)
        optimizer.step()
        if t == 1:
            assert all(torch.allclose(p.grad, g / divisor) for p, g in zip(params, step_gradients)), \
                "the step writes the divided gradients back, as clipping leaves them"
            assert not hasattr(optimizer, "grad_scale")
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    plain = run_optimizer(OriginalAdamW, weights, gradients, **settings)[0]
    assert (plain - expected[0]).abs().max() > 1e-4, "the test must tell a divided step from a plain one"
    with pytest.raises(ValueError, match="fused"):
        OriginalAdamW(params, foreach=True).divide_next_step_gradients(divisor)


def tiny_args(**overrides) -> TrainingConfig:
    defaults = dict(no_log=True, report_to=["none"], eval_steps=1000, save_total_limit=2, select_on="test", lr=1e-3,
                    optimizer_name="AdamW", max_steps=2, batch_size=4, eval_batch_size=None, grad_steps=1, seed=0,
                    bf16=False, model_type="task_prefix", alpha=0.5, gen_max_len=4, output_rationale=False,
                    deepspeed=None)
    return TrainingConfig(**{**defaults, **overrides})


@pytest.fixture
def tiny_rows(tiny_t5):
    """Ten rows of both views, each carrying its position as `row` (which the collator ignores)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    texts = [f"the {word} tree is in the park with {i} apples" for i, word in enumerate(
        ["apple", "big", "small", "old", "new", "tall", "green", "red", "blue", "dark"])]
    split = Dataset.from_dict({"input": texts, "label": [f"{i} apples" for i in range(10)],
                               "rationale": [f"because there are {i} apples in the park" for i in range(10)]})
    splits = DatasetDict({"train": split, "test": split.select(range(2))})
    tokenized = tokenize_seq2seq(splits, tokenizer, "task_prefix", 64)
    tokenized["train"] = tokenized["train"].add_column("row", list(range(10)))
    return tokenizer, tokenized


def tiny_trainer(tiny_t5, tiny_rows, folder, dropout: float = 0.0, **overrides):
    """A trainer as run.py builds it, on the ten rows; `fed` receives each training batch's rows as it is built."""
    tokenizer, tokenized = tiny_rows
    args = tiny_args(**overrides)
    training_args = training_arguments(args, folder / "ckpt", folder / "logs")
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5, dropout_rate=dropout)
    trainer, _ = build_trainer(args, training_args, model, tokenizer, tokenized, "text")
    fed: list[list[int]] = []
    collate = trainer.data_collator

    def recording_collate(features):
        if "row" in features[0]:
            fed.append([feature["row"] for feature in features])
        return collate(features)

    trainer.data_collator = recording_collate
    return trainer, fed


def test_a_resumed_run_trains_on_the_same_batches(tiny_t5, tiny_rows, tmp_path):
    settings = dict(max_steps=6, grad_steps=2, batch_size=3, eval_steps=4, seed=3)  # 4 batches an epoch: 3 epochs
    trainer, fed = tiny_trainer(tiny_t5, tiny_rows, tmp_path, **settings)
    trainer.train()
    assert fed == random_sampler_batches(10, 3, seed=3, epochs=3)
    resumed, fed_after = tiny_trainer(tiny_t5, tiny_rows, tmp_path, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-4"))
    assert fed_after == fed[8:], "steps 5 and 6 take micro-batches 9 to 12 of the uninterrupted run"
    assert resumed.state.epoch == pytest.approx(3.0)


class KeepGradients(TrainerCallback):
    """Each optimizer step's gradient as the optimizer gets it."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.grad.clone() for p in model.parameters()])


def test_accumulation_averages_micro_batch_gradients_across_an_epoch_end(tiny_t5, tiny_rows, tmp_path):
    # 10 rows in batches of 4: every epoch ends with a batch of 2, and the second step takes that batch and the next
    # epoch's first, as 4.30 counted micro-batches over the whole run. lr 1e-12 leaves the weights as they were.
    trainer, fed = tiny_trainer(tiny_t5, tiny_rows, tmp_path, max_steps=2, grad_steps=2, batch_size=4, lr=1e-12)
    trainer.args.max_grad_norm = 0.0  # the gradient as accumulated, not clipped
    kept = KeepGradients()
    trainer.add_callback(kept)
    trainer.train()
    assert [len(batch) for batch in fed] == [4, 4, 2, 4]
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5)
    collate, rows = TaskPrefixDataCollator(tiny_rows[0]), trainer.train_dataset
    for step, window in enumerate((fed[:2], fed[2:])):
        model.zero_grad()
        for batch in window:
            views = collate([rows[i] for i in batch])
            loss, _ = one_pass_per_view(model, [views["pred"], views["expl"]], [0.5, 0.5])
            loss.backward()
        for accumulated, summed in zip(kept.steps[step], (p.grad for p in model.parameters())):
            # The trainer's fused loss rounds otherwise than one_pass_per_view: a few 1e-7 of the largest entries.
            scale = summed.abs().max().item() / 2
            torch.testing.assert_close(accumulated, summed / 2, rtol=1e-4, atol=1e-5 * scale)


class KeepStepNorms(TrainerCallback):
    """The gradients' norm as each optimizer step leaves them."""

    def __init__(self):
        self.norms: list[float] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())


def count_stock_clipping(trainer) -> list:
    """A list that grows by one at every call of accelerate's clip_grad_norm_, the Trainer's own clipping."""
    calls = []
    stock = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: calls.append(1) or stock(*a, **k)
    return calls


def clipped_run(tiny_t5, tiny_rows, folder, monkeypatch, max_grad_norm: float, disabled: str = ""):
    """Three steps of the tiny trainer at max_grad_norm: the norms the trainer clipped by, the gradients' norms after
    each step, the weights after the run, and how often accelerate's clip_grad_norm_ (the Trainer's own) ran."""
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, disabled)
    trainer, _ = tiny_trainer(tiny_t5, tiny_rows, folder, max_steps=3, lr=1e-2)
    trainer.args.max_grad_norm = max_grad_norm
    clipped_by, stock_calls, after = [], count_stock_clipping(trainer), KeepStepNorms()
    clip = trainer._clip_grad_norm
    trainer._clip_grad_norm = lambda model: clipped_by.append(clip(model)) or clipped_by[-1]
    trainer.add_callback(after)
    trainer.train()
    return ([float(n) for n in clipped_by], after.norms, [p.detach().clone() for p in trainer.model.parameters()],
            len(stock_calls))


@pytest.mark.parametrize("max_grad_norm", [1e-2, 1e4])  # clipping at every step, and never
def test_clipping_in_the_adamw_step_trains_as_the_trainers_own_clipping(max_grad_norm, tiny_t5, tiny_rows, tmp_path,
                                                                      monkeypatch):
    norms, after, weights, stock_calls = clipped_run(tiny_t5, tiny_rows, tmp_path / "a", monkeypatch, max_grad_norm)
    assert stock_calls == 0, "fused_clip: the Trainer's clip_grad_norm_ does not run"
    want_norms, want_after, want_weights, want_calls = clipped_run(tiny_t5, tiny_rows, tmp_path / "b", monkeypatch,
                                                                   max_grad_norm, disabled="fused_clip")
    assert want_calls == 3
    assert norms == pytest.approx(want_norms, rel=1e-5)
    assert after == pytest.approx(want_after, rel=1e-5)
    assert after == pytest.approx([min(n, max_grad_norm) for n in norms], rel=1e-5)
    for got, want in zip(weights, want_weights):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if max_grad_norm < 1:
        assert all(n > 10 * max_grad_norm for n in norms), "every step clipped"
        _, _, unclipped, _ = clipped_run(tiny_t5, tiny_rows, tmp_path / "c", monkeypatch, 0.0)
        assert max((a - b).abs().max() for a, b in zip(unclipped, weights)) > 1e-4, \
            "the test must tell clipped training from unclipped"


@pytest.mark.parametrize("optimizer_name, disabled", [("AdamW", "fused_adamw"), ("Adafactor", "")])
def test_clipping_stays_the_trainers_where_the_step_cannot_scale(optimizer_name, disabled, tiny_t5, tiny_rows,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, disabled)
    trainer, _ = tiny_trainer(tiny_t5, tiny_rows, tmp_path, max_steps=1, optimizer_name=optimizer_name)
    stock_calls = count_stock_clipping(trainer)
    trainer.train()
    assert stock_calls == [1]


def losses_and_weights(tiny_t5, tiny_rows, folder, run: int):
    trainer, _ = tiny_trainer(tiny_t5, tiny_rows, folder, dropout=0.1, max_steps=3, seed=run)
    losses = []
    training_step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        loss = training_step(model, inputs, num_items_in_batch)
        losses.append(loss.item())
        return loss

    trainer.training_step = recording_step
    trainer.train()
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


def test_the_same_seed_trains_the_same_run_twice_with_dropout(tiny_t5, tiny_rows, tmp_path):
    losses, weights = losses_and_weights(tiny_t5, tiny_rows, tmp_path / "a", run=0)
    again, weights_again = losses_and_weights(tiny_t5, tiny_rows, tmp_path / "b", run=0)
    assert again == losses
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_again))
    other, _ = losses_and_weights(tiny_t5, tiny_rows, tmp_path / "c", run=1)
    assert other != losses


@pytest.mark.parametrize("optimizer_name, disabled, kind, fused", [
    ("AdamW", "", OriginalAdamW, True),
    ("AdamW", "fused_adamw", OriginalAdamW, None),
    ("Adafactor", "", Adafactor, None),
])
def test_the_trainer_builds_the_originals_adamw_on_the_fused_kernel(optimizer_name, disabled, kind, fused, tiny_t5,
                                                                     tiny_rows, tmp_path, monkeypatch):
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, disabled)
    trainer, _ = tiny_trainer(tiny_t5, tiny_rows, tmp_path, optimizer_name=optimizer_name)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is kind
    assert optimizer.defaults.get("fused") is fused
