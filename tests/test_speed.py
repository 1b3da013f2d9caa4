"""The optimised training and decoding paths compute what the paper's formulation computes."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, T5ForConditionalGeneration
from transformers.activations import GELUTanh, NewGELUActivation

import fast_loss
import speedups
from fast_loss import grouped_loss, lm_head_loss
from model_utils import StandardDataCollator, TaskPrefixDataCollator, one_pass_per_view
from speedups import OneDNNLinear, speed_up_student
from views import tokenize_seq2seq

TEXTS = [
    "the apple tree",
    "where does he live in the park with many trees and a bus station",
    "kids played tag",
    "how many apples are in the garden if each tree has more apples than the last",
    "a dog",
    "she sings songs in the church choir every round of the game",
]
LABELS = ["park", "bus station", "tree", "( 12.0 + 3.0 )", "dogs", "church"]
RATIONALES = [
    "apples grow on trees",
    "a bum lives near the bus and the train station so the answer must be the bus station",
    "tag is played by kids",
    "each tree has more so we add them",
    "a dog is an animal",
    "a choir sings in a church so the answer is church because songs are sung there by the choir",
]


@pytest.fixture
def tokenizer(tiny_t5):
    return AutoTokenizer.from_pretrained(tiny_t5)


@pytest.fixture
def model(tiny_t5):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5)
    # Larger weights than the fixture's, so that rounding-level differences would show in the comparisons.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def batch(tokenizer, model_type):
    split = Dataset.from_dict({"input": TEXTS, "label": LABELS, "rationale": RATIONALES})
    rows = list(tokenize_seq2seq(DatasetDict({"train": split}), tokenizer, model_type, 64)["train"])
    collator = TaskPrefixDataCollator(tokenizer) if model_type == "task_prefix" else StandardDataCollator(tokenizer)
    return collator(rows)


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_grouped_loss_equals_two_passes(tokenizer, model, alpha):
    inputs = batch(tokenizer, "task_prefix")
    views, weights = [inputs["pred"], inputs["expl"]], [alpha, 1 - alpha]
    expected, expected_grads = loss_and_grads(model, lambda: one_pass_per_view(model, views, weights)[0])
    got, grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():  # rounding differs with the trimming: compare each gradient as a whole
        difference = (grad - expected_grads[name]).norm() / expected_grads[name].norm()
        assert difference < 1e-3, (name, difference)


def test_grouped_loss_equals_one_pass_in_standard_mode(tokenizer, model):
    inputs = batch(tokenizer, "standard")
    expected = model(**inputs["pred"]).loss
    got = grouped_loss(model, [inputs["pred"]], [1.0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_grouped_loss_with_untied_head_and_scaled_outputs(tokenizer, model):
    """t5-v1_1 (own lm_head, no rescaling) and original T5 (tied, decoder outputs scaled by d_model ** -0.5)."""
    inputs = batch(tokenizer, "task_prefix")
    for scale in (False, True):
        variant = copy.deepcopy(model)
        variant.config.scale_decoder_outputs = scale
        variant.lm_head.weight = torch.nn.Parameter(torch.randn_like(variant.lm_head.weight))
        views, weights = [inputs["pred"], inputs["expl"]], [0.5, 0.5]
        expected = one_pass_per_view(variant, views, weights)[0]
        got = grouped_loss(variant, views, weights)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_packed_tokens_skip_padding_and_keep_the_padded_values(tokenizer, model, monkeypatch, feed_forward):
    """packed_target_states (no projection, feed-forward layer or elementwise op on padding) against the padded
    passes, for T5 v1.1's gated feed-forward and the original T5's (relu, tied head, scaled outputs): every target
    state, the loss and every gradient agree to float rounding."""
    if feed_forward == "relu":
        config = copy.deepcopy(model.config)
        config.feed_forward_proj, config.tie_word_embeddings = "relu", True
        torch.manual_seed(1)
        model = T5ForConditionalGeneration(config).eval()
    inputs = batch(tokenizer, "task_prefix")
    views, weights = [inputs["pred"], inputs["expl"]], [0.3, 0.7]
    assert (inputs["expl"]["attention_mask"] == 0).any() and (inputs["expl"]["labels"] == -100).any()
    assert fast_loss.packed_tokens_apply(model)
    packed = fast_loss.packed_target_states(model, views)
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "packed_tokens")
    assert not fast_loss.packed_tokens_apply(model)
    hidden, targets, keeps = fast_loss.seq2seq_target_states(model, views)
    torch.testing.assert_close(fast_loss.scaled_for_head(model, packed[0]), hidden, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed[1], targets) and all(torch.equal(a, b) for a, b in zip(packed[2], keeps))
    expected, expected_grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    got, grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).norm() / expected_grads[name].norm() < 1e-5, name


def test_packed_decoder_runs_both_views_in_one_pass(tokenizer, model):
    """The views' decoder passes are one: each decoder layer runs once on both views' target tokens, though the
    views differ in target length and attend to different encoder rows (their values: the test above)."""
    views = [batch(tokenizer, "task_prefix")[view] for view in ("pred", "expl")]
    calls = []
    model.decoder.block[0].layer[-1].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    hidden, targets, keeps = fast_loss.packed_target_states(model, views)
    assert keeps[0].shape[1] != keeps[1].shape[1]
    assert calls == [(len(targets), model.config.d_model)] == [tuple(hidden.shape)]
    assert len(targets) == sum(int(keep.sum()) for keep in keeps)


@pytest.mark.parametrize("shared", [True, False])
def test_packed_passes_look_up_a_shared_embedding_once(tokenizer, model, monkeypatch, shared):
    """Encoder and decoder sharing T5's embedding: one lookup for both passes' tokens (the decoder's pass takes both
    views), so its backward makes one vocabulary-sized gradient; with separate embeddings, one lookup a stack. The
    loss and every gradient equal the padded passes' either way."""
    if not shared:
        model.decoder.embed_tokens = copy.deepcopy(model.shared)
    lookups, stock_embedding = [], F.embedding
    monkeypatch.setattr(F, "embedding", lambda ids, weight, *args: lookups.append(weight) or stock_embedding(ids, weight, *args))
    inputs = batch(tokenizer, "task_prefix")
    views, weights = [inputs["pred"], inputs["expl"]], [0.3, 0.7]
    got, grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    encoder, decoder = model.encoder.embed_tokens.weight, model.decoder.embed_tokens.weight
    token_lookups = [id(weight) for weight in lookups if id(weight) in (id(encoder), id(decoder))]  # not the biases'
    assert token_lookups == ([id(encoder)] if shared else [id(encoder), id(decoder)])
    monkeypatch.setattr(F, "embedding", stock_embedding)
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "packed_tokens")
    expected, expected_grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and ("decoder.embed_tokens.weight" in grads) == (not shared)
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).norm() / expected_grads[name].norm() < 1e-5, name


def test_packed_tokens_repeat_with_dropout_and_step_aside_where_they_do_not_apply(tokenizer, model):
    """In training (dropout on) the same seed gives the same loss; eager attention (float masks), gradient
    checkpointing and fp16 weights take the padded passes."""
    inputs = batch(tokenizer, "task_prefix")
    views, weights = [inputs["pred"], inputs["expl"]], [0.5, 0.5]
    trained = speed_up_student(copy.deepcopy(model))
    for module in trained.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    trained.config.dropout_rate = 0.3
    for module in trained.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.3
    trained.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(grouped_loss(trained, views, weights).item())
    torch.manual_seed(8)
    assert losses[0] == losses[1] != grouped_loss(trained, views, weights).item()
    assert fast_loss.packed_tokens_apply(trained)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert not any(fast_loss.packed_tokens_apply(m) for m in (eager, checkpointed, copy.deepcopy(model).half()))


def test_speed_up_student_keeps_outputs_and_generations(tokenizer, model):
    inputs = batch(tokenizer, "task_prefix")["pred"]
    stock = copy.deepcopy(model)
    fast = speed_up_student(model)
    assert type(fast.lm_head) is OneDNNLinear
    assert all(type(m) is not torch.nn.Linear for m in fast.modules()), "every nn.Linear is swapped"
    assert not any(isinstance(m, NewGELUActivation) for m in fast.modules())
    assert any(isinstance(m, GELUTanh) for m in fast.modules())
    tolerance = 1e-4  # of the largest logit: float rounding, which BLAS kernels vary with memory alignment
    with torch.no_grad():
        logits, expected_logits = fast(**inputs).logits, stock(**inputs).logits
        assert (logits - expected_logits).abs().max() <= tolerance * expected_logits.abs().max()
        settings = dict(max_new_tokens=12, num_beams=1, do_sample=False)
        generated = fast.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **settings)
        # A greedy path of the stock model: at every step the token taken is the stock model's best, up to rounding
        # (an exact comparison would fail on near-ties).
        stock_logits = stock(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             decoder_input_ids=generated[:, :-1]).logits
    taken = stock_logits.gather(2, generated[:, 1:, None]).squeeze(2)
    best = stock_logits.max(dim=2).values
    ended = torch.cumsum(generated[:, :-1] == fast.config.eos_token_id, dim=1) > 0  # pad after </s>: not chosen
    assert ((best - taken)[~ended] <= tolerance * stock_logits.abs().max()).all()
    x = torch.randn(3, 2, fast.config.d_model)
    with torch.no_grad():
        torch.testing.assert_close(fast.lm_head(x), torch.nn.functional.linear(x, fast.lm_head.weight))
    speed_up_student(fast, enable=False)
    assert type(fast.lm_head) is torch.nn.Linear
    assert not any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert not any(isinstance(m, GELUTanh) for m in fast.modules())


def test_reserved_layer_holds_what_dynamic_layer_holds_and_writes_in_place():
    """ReservedLayer against DynamicLayer through a prefill, steps past its capacity, a crop and a batch
    selection: the same keys and values after every call, and within the capacity no new buffer."""
    from transformers.cache_utils import DynamicLayer

    generator = torch.Generator().manual_seed(0)
    reserved, dynamic = speedups.ReservedLayer(capacity=6), DynamicLayer()
    buffers = []
    for length in (3, 1, 1, 1, 1, 1, 1):  # 3 + 3 fill the capacity, the 7th position needs more
        k, v = torch.randn(2, 4, length, 8, generator=generator), torch.randn(2, 4, length, 5, generator=generator)
        for layer in (reserved, dynamic):
            keys, values = layer.update(k, v)
        assert torch.equal(keys, dynamic.keys) and torch.equal(values, dynamic.values)
        assert reserved.get_seq_length() == dynamic.get_seq_length()
        buffers.append(reserved.buffers[0].data_ptr())
    assert len(set(buffers[:4])) == 1 and buffers[4] != buffers[3], "written in place until the capacity is passed"
    assert reserved.buffers[0].shape[-2] == 14, "then twice the length"
    for layer in (reserved, dynamic):
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([1]))
        keys, values = layer.update(torch.ones(1, 4, 1, 8), torch.ones(1, 4, 1, 5))
    assert torch.equal(keys, dynamic.keys) and torch.equal(values, dynamic.values) and keys.shape[-2] == 8


def test_generation_with_the_reserved_cache_equals_generate_and_the_trainer_uses_it(tiny_t5, tokenizer, model,
                                                                                   tmp_path, monkeypatch):
    """Greedy decoding with decoding_cache gives generate's own tokens, within the reserved length and past it
    (padded rows among them); the trainer's evaluation passes the cache, none where it is switched off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from train_utils import build_trainer, training_arguments

    inputs = batch(tokenizer, "task_prefix")["pred"]
    settings = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12,
                    num_beams=1, do_sample=False)
    model.eval()
    with torch.no_grad():
        expected = model.generate(**settings)
        for capacity in (13, 5):
            assert torch.equal(model.generate(**settings, cache=speedups.decoding_cache(model, capacity)), expected)
    decoder_only = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50))
    assert speedups.decoding_cache(decoder_only, 8) is None, "decoder-only students keep generate's cache"
    tokenized, args = small_training(tokenizer, max_steps=1)
    trainer, _ = build_trainer(args, training_arguments(args, tmp_path / "ckpt", tmp_path / "log"), model,
                               tokenizer, tokenized, "text")
    caches = []
    stock_generate = trainer.model.generate
    monkeypatch.setattr(trainer.model, "generate", lambda **kw: caches.append(kw.get("cache")) or stock_generate(**kw))
    trainer._generate(inputs)
    assert isinstance(caches[0].self_attention_cache.layers[0], speedups.ReservedLayer)
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "reserved_cache")  # drop_finished on: generate's kind of cache
    trainer._generate(inputs)
    assert not any(isinstance(layer, speedups.ReservedLayer) for layer in caches[-1].self_attention_cache.layers)
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "reserved_cache,drop_finished")
    trainer._generate(inputs)
    assert caches[-1] is None


def test_generation_dropping_finished_rows_gives_generates_tokens(tokenizer, model, monkeypatch):
    """Rows that end at different lengths (the end token made likelier): generate_dropping_finished goes on in
    smaller batches and gives every row generate's own tokens; it applies unless switched off, sharded, or asked
    for settings counted from a call's start."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model.eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] *= 40
    inputs = batch(tokenizer, "task_prefix")["expl"]
    rows = torch.cat([inputs["input_ids"]] * 3), torch.cat([inputs["attention_mask"]] * 3)
    rows = rows[0].roll(1, dims=1) * rows[1].roll(1, dims=1), rows[1].roll(1, dims=1)  # distinct rows
    rows = torch.cat([rows[0], inputs["input_ids"]]), torch.cat([rows[1], inputs["attention_mask"]])
    settings = dict(max_new_tokens=30, num_beams=1, do_sample=False)
    with torch.no_grad():
        expected = model.generate(input_ids=rows[0], attention_mask=rows[1], **settings)
        calls = []
        stock_generate = model.generate
        monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["attention_mask"].shape[0])
                            or stock_generate(**kw))
        got = speedups.generate_dropping_finished(model, rows[0], rows[1], cache=speedups.decoding_cache(model, 31),
                                                  **settings)
    lengths = (expected == model.config.eos_token_id).int().argmax(dim=1)
    assert len(set(lengths.tolist())) > 2 and len(calls) > 1 and calls == sorted(calls, reverse=True), calls
    assert torch.equal(got, torch.nn.functional.pad(expected, (0, got.shape[1] - expected.shape[1])))
    assert got.shape[1] == 31
    with torch.no_grad():  # reserved_cache switched off: generate's own kind of cache, the same tokens
        assert torch.equal(speedups.generate_dropping_finished(model, rows[0], rows[1], cache=None, **settings), got)
    assert speedups.drop_finished_applies(model, sharded=False) and not speedups.drop_finished_applies(model, True)
    decoder_only = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, eos_token_id=1))
    assert not speedups.drop_finished_applies(decoder_only, sharded=False), "encoder-decoder students only"
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "reserved_cache")
    assert speedups.drop_finished_applies(model, sharded=False), "each trick switched off on its own"
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    model.generation_config.min_new_tokens = 2
    assert not speedups.drop_finished_applies(model, sharded=False)
    model.generation_config.min_new_tokens = None
    ends, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    assert not speedups.drop_finished_applies(model, sharded=False), "no end token: nothing ends early"
    model.generation_config.eos_token_id = ends
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "drop_finished")
    assert not speedups.drop_finished_applies(model, sharded=False)


def small_training(tokenizer, max_steps: int):
    """The tokenised rows above as train and test splits, and a configuration that evaluates after every step."""
    from config import TrainingConfig

    split = Dataset.from_dict({"input": TEXTS, "label": LABELS, "rationale": RATIONALES})
    tokenized = tokenize_seq2seq(DatasetDict({"train": split, "test": split}), tokenizer, "task_prefix", 64)
    args = TrainingConfig(
        no_log=True, eval_steps=1, save_total_limit=1, select_on="test", lr=1e-4, optimizer_name="AdamW",
        max_steps=max_steps, batch_size=3, eval_batch_size=None, grad_steps=1, seed=0, bf16=False,
        model_type="task_prefix", alpha=0.4, gen_max_len=4, output_rationale=False, deepspeed=None,
    )
    return tokenized, args


def test_trainer_takes_the_grouped_path_and_keeps_two_passes_for_outputs(tiny_t5, tokenizer, model, tmp_path,
                                                                         monkeypatch):
    from dataclasses import replace

    from train_utils import build_trainer, training_arguments

    tokenized, args = small_training(tokenizer, max_steps=1)
    training_args = training_arguments(args, tmp_path / "ckpt", tmp_path / "log")
    assert training_args.optim == "adamw_torch_fused"
    assert training_args.per_device_eval_batch_size == 4 * args.batch_size, "generation batches default to 4x"
    explicit = replace(args, eval_batch_size=5)
    explicit_args = training_arguments(explicit, tmp_path / "ckpt", tmp_path / "log")
    build_trainer(explicit, explicit_args, model, tokenizer, tokenized, "text")
    assert explicit_args.per_device_eval_batch_size == 5, "an asked batch is kept on a CPU too"
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "cpu_eval_batch")
    off_args = training_arguments(args, tmp_path / "c", tmp_path / "l")
    build_trainer(args, off_args, model, tokenizer, tokenized, "text")
    assert off_args.per_device_eval_batch_size == 4 * args.batch_size
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    trainer, _ = build_trainer(args, training_args, model, tokenizer, tokenized, "text")
    assert trainer.args.per_device_eval_batch_size == speedups.CPU_EVAL_ROWS, "CPU generation batches take more rows"
    assert trainer.fast_loss_applies(trainer.model) and type(trainer.model.lm_head) is OneDNNLinear
    inputs = batch(tokenizer, "task_prefix")
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
        reference, outputs = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    assert set(outputs) == {"pred", "expl"} and outputs["expl"].logits.shape[1] == inputs["expl"]["labels"].shape[1]
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


def test_optimizer_state_is_freed_before_the_best_checkpoint_is_read(tiny_t5, tokenizer, model, tmp_path,
                                                                     monkeypatch):
    """At the end of training the best checkpoint's weights are read in beside the model; the optimizer's moments
    (two copies of the weights' size) are gone by then, and the heap handed back, so that reading stays under the
    training peak."""
    from transformers import Seq2SeqTrainer

    from train_utils import build_trainer, training_arguments

    tokenized, args = small_training(tokenizer, max_steps=2)
    trainer, _ = build_trainer(args, training_arguments(args, tmp_path / "ckpt", tmp_path / "log"), model,
                               tokenizer, tokenized, "text")
    seen, trims = [], []
    stock_load = Seq2SeqTrainer._load_best_model
    monkeypatch.setattr(Seq2SeqTrainer, "_load_best_model",
                        lambda self: seen.append(len(self.optimizer.state)) or stock_load(self))
    monkeypatch.setattr("model_utils.return_freed_memory", lambda: trims.append(True))
    trainer.train()
    assert seen == [0] and trims == [True], "moments freed, heap returned, then the best checkpoint read"
    assert trainer.state.best_model_checkpoint is not None


# The fused head's products: all on oneDNN, all on torch's GEMM (each as onednn_faster would pick on some machine), or
# oneDNN switched off.
@pytest.mark.parametrize("kernels", ["onednn", "torch", "onednn_linear off"])
@pytest.mark.parametrize("vocabulary_block", [2048, 16])  # oneDNN's weight gradient: one block; 4 (the last short)
@pytest.mark.parametrize("chunk_bytes", [16 << 20, 4 * 50 * 7])  # one chunk; chunks of 7 rows (the last one short)
def test_lm_head_loss_equals_unfused_cross_entropy(monkeypatch, chunk_bytes, vocabulary_block, kernels):
    if kernels == "onednn" and not speedups.onednn_available():
        pytest.skip("this torch build has no oneDNN GEMM")
    monkeypatch.setattr(fast_loss, "LOGIT_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(speedups, "VOCABULARY_BLOCK", vocabulary_block)
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "onednn_linear" if kernels == "onednn_linear off" else "")
    for module in (speedups, fast_loss):
        monkeypatch.setattr(module, "onednn_faster", lambda product, rows, k, n: kernels == "onednn")
    blocked = []
    monkeypatch.setattr(fast_loss, "blocked_weight_grad", lambda *args: blocked.append(1) or speedups.blocked_weight_grad(*args))
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    token_weights = torch.rand(30)

    def unfused():
        return (F.cross_entropy(hidden @ weight.T, targets, reduction="none") * token_weights).sum()

    expected = unfused()
    expected_grads = torch.autograd.grad(3 * expected, [hidden, weight])
    got = lm_head_loss(hidden, weight, targets, token_weights)
    grads = torch.autograd.grad(3 * got, [hidden, weight])  # the upstream gradient scales the saved ones
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        assert (grad - expected_grad).norm() / expected_grad.norm() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(lm_head_loss(hidden, weight, targets, token_weights), expected.detach(), rtol=1e-6,
                                   atol=0)
    assert bool(blocked) == (kernels == "onednn"), "the weight gradient by blocks exactly where oneDNN is picked"


def test_lm_head_loss_where_targets_are_far_below_the_top_logit():
    """Targets 1,000s of nats below the best logit: their softmax probability underflows to 0 in fp32, yet the loss
    and its gradient stay finite and equal the unfused cross-entropy's."""
    torch.manual_seed(0)
    hidden = (100 * torch.randn(12, 16)).requires_grad_()
    weight = torch.randn(40, 16, requires_grad=True)
    logits = (hidden @ weight.T).detach()
    targets = logits.argmin(1)
    token_weights = torch.full((12,), 1 / 12)
    expected = (F.cross_entropy(hidden @ weight.T, targets, reduction="none") * token_weights).sum()
    got = lm_head_loss(hidden, weight, targets, token_weights)
    assert (logits.max(1).values - logits.min(1).values).min() > 200
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(torch.autograd.grad(got, [hidden, weight]),
                                   torch.autograd.grad(expected, [hidden, weight])):
        assert torch.isfinite(grad).all() and (grad - expected_grad).norm() / expected_grad.norm() < 1e-6


def test_lm_head_loss_backward_twice_through_a_retained_graph_fails_loudly():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = lm_head_loss(hidden, weight, torch.tensor([1, 2, 3, 4]), torch.full((4,), 0.25))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_lm_head_loss_under_bf16_autocast_matches_unfused():
    torch.manual_seed(0)
    hidden = torch.randn(20, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets, token_weights = torch.randint(0, 64, (20,)), torch.full((20,), 1 / 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = (F.cross_entropy(hidden @ weight.T, targets, reduction="none") * token_weights).sum()
        got = lm_head_loss(hidden, weight, targets, token_weights)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-2, atol=0)
    grads = torch.autograd.grad(got, [hidden, weight])
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert (grad - expected_grad).norm() / expected_grad.norm() < 2e-2


def test_cpu_dropout_drops_with_probability_p_and_scales_survivors():
    torch.manual_seed(0)
    x = (torch.rand(1001, 999) + 0.5).requires_grad_()  # an element count that the 64-bit draws' quarters overrun
    p = 0.1
    torch.manual_seed(1)
    out = speedups.cpu_dropout(x, p)
    kept = out != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    p_drawn = round(p * 2**16) / 2**16  # p to the draws' 16 bits; survivors scaled so the expectation is x exactly
    assert abs(p_drawn - p) < 2**-17
    torch.testing.assert_close(out[kept], x[kept] / (1 - p_drawn))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, kept.float() / (1 - p_drawn))
    half = speedups.cpu_dropout(x.detach().bfloat16(), p)
    assert half.dtype == torch.bfloat16 and 0 < (half == 0).float().mean().item() < 2 * p, "the input's dtype stays"
    rows_kept = kept.float().mean(1)  # no structure: every row keeps about 1 - p
    assert (rows_kept - (1 - p)).abs().max() < 6 * (p * (1 - p) / x.shape[1]) ** 0.5
    torch.manual_seed(1)
    again = speedups.cpu_dropout(x, p)
    assert torch.equal(again != 0, kept), "torch.manual_seed repeats the masks"
    assert not torch.equal(speedups.cpu_dropout(x, p) != 0, kept), "each call draws a new mask"


def test_cpu_dropout_module_is_nn_dropout_outside_cpu_training():
    x = torch.rand(4, 8) + 1
    module = speedups.CPUDropout(0.5).eval()
    assert torch.equal(module(x), x)
    module.train()
    assert (module(x) == 0).any()
    assert torch.equal(speedups.CPUDropout(0.0).train()(x), x)
    assert torch.equal(speedups.CPUDropout(1.0).train()(x), torch.zeros_like(x))


def with_dropout(model, p):
    variant = copy.deepcopy(model)
    for module in variant.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif hasattr(module, "has_relative_attention_bias"):  # T5Attention: its probabilities' dropout rate
            module.dropout = p
    return variant


def saved_bytes(function) -> tuple[torch.Tensor, int]:
    """function()'s result, and the bytes of the tensors its autograd graph keeps for the backward pass."""
    kept = []

    def keep(tensor):
        kept.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        result = function()
    return result, sum(kept)


@pytest.mark.parametrize("bias_batch, scaling", [(1, 1.0), (3, 0.125)])
def test_dropped_attention_equals_the_three_ops_and_keeps_less(bias_batch, scaling):
    """DroppedAttention: the values and every gradient of matmul, softmax, cpu_dropout and matmul with the same
    mask, a bias broadcast over the batch or not, T5's unscaled scores or scaled ones; for the backward pass it
    keeps q, k, v, the probabilities and a byte mask: 1.75 score-sized float tensors fewer than autograd keeps for
    the three ops (their dropped probabilities and the float mask, less the byte mask)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 40, 16, generator=generator, requires_grad=True) for _ in range(3))
    bias = torch.randn(bias_batch, 4, 40, 40, generator=generator, requires_grad=True)
    grad_output = torch.randn(3, 4, 40, 16, generator=generator)

    def three_ops():
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        return torch.matmul(speedups.cpu_dropout(torch.softmax(scores + bias, dim=-1), 0.2), v)

    torch.manual_seed(5)
    expected, expected_bytes = saved_bytes(three_ops)
    expected_grads = torch.autograd.grad(expected, (q, k, v, bias), grad_output)
    torch.manual_seed(5)
    fused, fused_bytes = saved_bytes(lambda: speedups.DroppedAttention.apply(q, k, v, bias, scaling, 0.2))
    fused_grads = torch.autograd.grad(fused, (q, k, v, bias), grad_output)
    assert torch.allclose(fused, expected, atol=1e-6)
    for name, got, want in zip("qkvb", fused_grads, expected_grads):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), name
    assert expected_bytes - fused_bytes >= 1.75 * fused.new_empty(3, 4, 40, 40).untyped_storage().nbytes()


def test_t5_attention_computes_sdpa_attention_and_drops_in_training(tokenizer, model, monkeypatch, tmp_path):
    """In CPU training, t5_attention's own product (padding, causal and position-bias masks) equals SDPA's; with
    dropout drawn, training differs from evaluation and repeats under the same seed."""
    inputs = batch(tokenizer, "task_prefix")["expl"]
    stock = with_dropout(model, 0.3)
    fast = speed_up_student(with_dropout(model, 0.3))
    assert fast.config._attn_implementation == speedups.T5_ATTENTION
    assert fast.encoder.block[0].layer[0].SelfAttention.config._attn_implementation == speedups.T5_ATTENTION
    assert all(type(m) is speedups.CPUDropout for m in fast.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():
        expected = stock.eval()(**inputs).logits
        tolerance = 1e-4 * expected.abs().max()  # float rounding (see above)
        assert (fast.eval()(**inputs).logits - expected).abs().max() <= tolerance
        fast.train()
        torch.manual_seed(1)
        dropped = fast(**inputs).logits
        torch.manual_seed(1)
        assert (fast(**inputs).logits - dropped).abs().max() <= tolerance, "the same seed draws the same masks"
        assert (dropped - expected).abs().max() > 100 * tolerance
        calls = []
        keep_all = lambda shape, p: calls.append(p) or (torch.ones(shape, dtype=torch.bool), 1.0)  # noqa: E731
        monkeypatch.setattr(speedups, "dropout_keep", keep_all)
        # Its own softmax and products round differently from SDPA's kernel, in every layer: 10x the tolerance.
        assert (fast(**inputs).logits - expected).abs().max() <= 10 * tolerance
    layers = fast.config.num_layers + 2 * fast.config.num_decoder_layers
    assert calls.count(0.3) >= 2 * layers, "hidden states and attention probabilities both draw cpu_dropout's masks"
    fast.save_pretrained(tmp_path)
    assert speedups.T5_ATTENTION not in (tmp_path / "config.json").read_text(), "nothing saved changes"
    speed_up_student(fast, enable=False)
    assert fast.config._attn_implementation == "sdpa"
    assert all(type(m) is torch.nn.Dropout for m in fast.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("switched_off", ["fused_head", "packed_tokens", "all"])
def test_grouped_loss_with_a_speedup_switched_off_still_equals_two_passes(tokenizer, model, monkeypatch, switched_off):
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, switched_off)
    inputs = batch(tokenizer, "task_prefix")
    views, weights = [inputs["pred"], inputs["expl"]], [0.3, 0.7]
    expected, expected_grads = loss_and_grads(model, lambda: one_pass_per_view(model, views, weights)[0])
    got, grads = loss_and_grads(model, lambda: grouped_loss(model, views, weights))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).norm() / expected_grads[name].norm() < 1e-3, name


def test_each_module_swap_has_its_own_switch(model, monkeypatch):
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "gelu_tanh, cpu_dropout")
    fast = speed_up_student(copy.deepcopy(model))
    assert any(isinstance(m, NewGELUActivation) for m in fast.modules()), "gelu_tanh off keeps gelu_new"
    assert all(type(m) is torch.nn.Dropout for m in fast.modules() if isinstance(m, torch.nn.Dropout))
    assert type(fast.lm_head) is OneDNNLinear and fast.config._attn_implementation == speedups.T5_ATTENTION
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "onednn_linear,t5_attention")
    fast = speed_up_student(copy.deepcopy(model))
    assert type(fast.lm_head) is torch.nn.Linear and fast.config._attn_implementation == "sdpa"
    assert any(isinstance(m, GELUTanh) for m in fast.modules())


def test_switches_reach_the_trainer_and_a_typo_is_one_clear_error(monkeypatch, tmp_path):
    from config import TrainingConfig
    from train_utils import RunError, training_arguments

    args = TrainingConfig(
        no_log=True, eval_steps=1, save_total_limit=1, select_on="test", lr=1e-4, optimizer_name="AdamW",
        max_steps=1, batch_size=3, eval_batch_size=None, grad_steps=1, seed=0, bf16=False, deepspeed=None,
    )
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "fused_adamw")
    assert training_arguments(args, tmp_path / "ckpt", tmp_path / "log").optim == "adamw_torch"
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "fused_adam")
    with pytest.raises(RunError, match="unknown speed-up fused_adam; choose among .*fused_adamw"):
        training_arguments(args, tmp_path / "ckpt", tmp_path / "log")


needs_onednn = pytest.mark.skipif(not speedups.onednn_built(), reason="this torch build has no oneDNN GEMM (x86 only)")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", ["both", "input", "weight"])
def test_onednn_linear_equals_nn_linear_in_values_and_gradients(bias, trainable):
    torch.manual_seed(0)
    stock = torch.nn.Linear(48, 40, bias=bias)
    fast = copy.deepcopy(stock)
    fast.__class__ = OneDNNLinear
    stock.requires_grad_(trainable != "input")
    fast.requires_grad_(trainable != "input")
    # A non-contiguous input (a transposed batch), as attention outputs are before T5's o projection.
    x = torch.randn(5, 7, 48).transpose(0, 1).requires_grad_(trainable != "weight")
    x_fast = x.detach().clone().requires_grad_(x.requires_grad)
    grad = torch.randn(7, 5, 40)
    expected, got = stock(x), fast(x_fast)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    (expected * grad).sum().backward()
    (got * grad).sum().backward()
    pairs = [(x_fast.grad, x.grad)] if x.requires_grad else []
    pairs += [(p_fast.grad, p.grad) for p_fast, p in zip(fast.parameters(), stock.parameters()) if p.requires_grad]
    assert pairs and all(got_grad is not None for got_grad, _ in pairs)
    for got_grad, expected_grad in pairs:
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
    if not x.requires_grad:
        assert x_fast.grad is None


@needs_onednn
def test_onednn_linear_steps_aside_where_it_does_not_apply(monkeypatch):
    layer = torch.nn.Linear(16, 8, bias=False)
    layer.__class__ = OneDNNLinear
    calls = []
    monkeypatch.setattr(speedups.OneDNNLinearFunction, "apply", lambda *a: calls.append(a) or None)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16, "autocast keeps nn.Linear's bf16 product"
    assert layer.double()(x.double()).dtype == torch.float64
    layer.float()
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "onednn_linear")
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    assert calls == [], "none of these took the oneDNN path"
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    layer(x)
    assert len(calls) == 1, "fp32 on a CPU with autograd does"


@needs_onednn
@pytest.mark.parametrize("on_onednn", [("forward", "input_grad", "weight_grad"), (), ("input_grad",)])
def test_each_product_takes_the_gemm_chosen_for_its_shape(monkeypatch, on_onednn):
    monkeypatch.setattr(speedups, "onednn_faster", lambda product, rows, k, n: product in on_onednn)
    real, used = speedups.onednn_mm_t, []
    monkeypatch.setattr(speedups, "onednn_mm_t", lambda *operands: used.append(operands) or real(*operands))
    torch.manual_seed(0)
    stock = torch.nn.Linear(24, 40)
    fast = copy.deepcopy(stock)
    fast.__class__ = OneDNNLinear
    x = torch.randn(6, 24, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    grad = torch.randn(6, 40)
    (stock(x) * grad).sum().backward()
    (fast(x_fast) * grad).sum().backward()
    assert len(used) == len(on_onednn), "one oneDNN call per product chosen for it, none for the others"
    torch.testing.assert_close(x_fast.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, stock.weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-6)


@needs_onednn
def test_kernel_choices_are_timed_once_per_machine_and_read_by_later_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("DSS_CACHE", str(tmp_path))
    monkeypatch.setattr(speedups, "KERNEL_CHOICES", {})
    timed = []
    # Each choice times oneDNN's call, then torch's: here oneDNN takes 1 s and torch 2 s.
    monkeypatch.setattr(speedups, "best_time", lambda call, repeats=3: timed.append(call) or (2.0 if len(timed) % 2 == 0 else 1.0))
    assert speedups.onednn_faster("forward", 100, 16, 8) is True
    assert len(timed) == 2
    assert speedups.onednn_faster("forward", 120, 16, 8) is True and len(timed) == 2, "rows 100 and 120: one shape"
    saved = json.loads((tmp_path / "kernels" / f"{speedups.machine_name()}.json").read_text())
    assert saved == {f"forward 128x16x8 threads={torch.get_num_threads()}": True}

    def no_timing(call, repeats=3):
        raise AssertionError("a later run reads the choice instead of timing it")

    monkeypatch.setattr(speedups, "KERNEL_CHOICES", {})  # as a new process starts
    monkeypatch.setattr(speedups, "best_time", no_timing)
    assert speedups.onednn_faster("forward", 128, 16, 8) is True


@needs_onednn
def test_timing_a_new_shape_leaves_the_runs_random_numbers_as_they_were(monkeypatch, tmp_path):
    """Dropout masks come from torch's global generator: a first run on a machine (which times shapes) and a rerun
    (which reads the choices) must draw the same ones."""
    monkeypatch.setenv("DSS_CACHE", str(tmp_path))
    monkeypatch.setattr(speedups, "KERNEL_CHOICES", {})
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    for product in speedups.PRODUCTS:
        speedups.onednn_faster(product, 24, 16, 8)
    assert len(speedups.KERNEL_CHOICES) == len(speedups.PRODUCTS), "each product timed"
    assert torch.equal(torch.random.get_rng_state(), state)


@needs_onednn
def test_an_unwritable_cache_only_means_timing_again(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DSS_CACHE", str(blocked))
    monkeypatch.setattr(speedups, "KERNEL_CHOICES", {})
    assert speedups.onednn_faster("weight_grad", 8, 16, 8) in (True, False)
    assert blocked.read_text() == "not a folder"


def test_onednn_cache_limits_leave_a_users_own_setting(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    speedups.limit_onednn_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(speedups.ONEDNN_CACHE_ENTRIES)


ALLOCATION_LOOP = """
import resource, sys, torch, speedups
tuned = speedups.tune_cpu_allocator() if sys.argv[1] == "tuned" else False
faults = []
for _ in range(32):  # 48 MiB blocks: over glibc's largest default mmap threshold, so each is a fresh mapping by default
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# Tuned, the heap grows for the first blocks (up to 8 of them in 60 runs here) and then serves every block from
# memory it already holds; count the blocks faulted in afresh after that.
returned = speedups.return_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(12 << 20).fill_(1.0)
print(tuned, sum(count > 1000 for count in faults[16:]), returned,
      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > 1000)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_in_fresh_pages(monkeypatch):
    import subprocess

    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "malloc_reuse")
    assert speedups.tune_cpu_allocator() is False, "switched off, it changes nothing"
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    runs = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", ALLOCATION_LOOP, mode], capture_output=True, text=True,
                             cwd=Path(speedups.__file__).parent, check=True).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]), out[2:] == ["True", "True"])
    if not runs["tuned"][0]:
        pytest.skip("not glibc")
    assert runs["default"][1] == 16, "by default every 48 MiB block is faulted in afresh"
    assert runs["tuned"][1] == 0, f"{runs['tuned'][1]} of the last 16 blocks faulted in afresh with the allocator tuned"
    assert runs["tuned"][2], "return_freed_memory hands the kept blocks back: the next one is faulted in afresh"


def cache_bytes(cache) -> int:
    """The bytes of every key and value a generation's cache holds (both caches of an encoder-decoder model)."""
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    return sum(t.numel() * t.element_size() for c in caches for layer in c.layers
               for t in (layer.keys, layer.values) if t is not None)


@pytest.mark.parametrize("kind", ["t5", "bart", "gpt2", "llama"])
def test_generation_row_bytes_bounds_what_a_generation_caches(tiny_students, kind):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(tiny_students[kind])
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(tiny_students[kind]).eval()
    rows, length, new_tokens = 3, 40, 12
    input_ids = torch.randint(5, config.vocab_size, (rows, length))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True,
                             pad_token_id=config.pad_token_id or config.eos_token_id)
    held = cache_bytes(out.past_key_values) / rows
    estimate = speedups.generation_row_bytes(config, length, new_tokens + 1)
    assert held > 0 and held <= estimate, f"{kind}: {held:.0f} bytes a row cached, estimated {estimate}"
    transient = 4 * (config.num_attention_heads * length ** 2 + 8 * length * config.hidden_size + 2 * config.vocab_size)
    assert estimate - transient < 2.5 * held, "the caches' estimate is an upper one, not a wild one"


def test_cpu_eval_batches_grow_as_far_as_memory_allows(monkeypatch):
    from transformers import T5Config

    base = T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
    row = speedups.generation_row_bytes(base, 1024, 256)
    assert 100e6 < row < 250e6, "T5 v1.1 Base at input 1024 keeps over 100 MB a row while it generates"
    plenty = 1 << 50
    assert speedups.cpu_eval_batch_size(32, base, 1024, 256, available_bytes=plenty) == speedups.CPU_EVAL_ROWS
    assert speedups.cpu_eval_batch_size(256, base, 1024, 256, available_bytes=plenty) == 512, "twice a large default"
    fifty_rows = int(50 * row / speedups.CPU_EVAL_MEMORY_SHARE) + 1
    assert speedups.cpu_eval_batch_size(32, base, 1024, 256, available_bytes=fifty_rows) == 50, "as memory holds"
    assert speedups.cpu_eval_batch_size(32, base, 1024, 256, available_bytes=row) == 32, "never below the default"
    from transformers import PretrainedConfig

    assert speedups.cpu_eval_batch_size(32, PretrainedConfig(), 1024, 256, available_bytes=plenty) == 32, \
        "a shape it cannot read: the default"
    monkeypatch.setenv(speedups.DISABLE_VARIABLE, "cpu_eval_batch")
    assert speedups.cpu_eval_batch_size(32, base, 1024, 256, available_bytes=plenty) == 32
    monkeypatch.delenv(speedups.DISABLE_VARIABLE)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = speedups.available_memory_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert 0 < speedups.available_memory_bytes() <= alone // 4 + (64 << 20), "processes on one machine share it"


def test_encoder_states_for_generation_run_on_real_tokens_only(tokenizer, model, monkeypatch):
    """fast_loss.encoder_states: the encoder's own states at every real token (up to float rounding), zeros at
    padding, and the encoder's forward itself where packed_tokens is off."""
    inputs = batch(tokenizer, "task_prefix")["expl"]
    real = inputs["attention_mask"].bool()
    assert not real.all(), "rows of different lengths: padding to skip"
    model.eval()
    with torch.no_grad():
        expected = model.get_encoder()(**inputs).last_hidden_state
        packed = fast_loss.encoder_states(model, inputs["input_ids"], inputs["attention_mask"])
        assert fast_loss.packed_tokens_apply(model)
        torch.testing.assert_close(packed[real], expected[real], rtol=1e-5, atol=1e-5)
        assert not packed[~real].any()
        monkeypatch.setenv(speedups.DISABLE_VARIABLE, "packed_tokens")
        assert torch.equal(fast_loss.encoder_states(model, inputs["input_ids"], inputs["attention_mask"]), expected)


def test_t5_attention_makes_a_stacks_mask_once_in_evaluation(tokenizer, model, monkeypatch):
    """In evaluation the additive mask of position bias and padding is made once for the encoder's layers (also on
    packed tokens), with SDPA's outputs; in training each layer makes its own (gradient checkpointing recomputes
    layers one by one)."""
    from transformers.integrations import sdpa_attention

    inputs = batch(tokenizer, "task_prefix")["expl"]
    with torch.no_grad():
        expected = model.eval().get_encoder()(**inputs).last_hidden_state  # stock SDPA attention
    made = []
    stock = speedups.create_position_bias_mask
    for module in (speedups, sdpa_attention):  # made by t5_attention, or by SDPA's forward that it calls
        monkeypatch.setattr(module, "create_position_bias_mask", lambda *a: made.append(a[1]) or stock(*a))
    layers = model.config.num_layers
    assert layers > 1
    speed_up_student(model)
    with torch.no_grad():
        got = model.get_encoder()(**inputs).last_hidden_state
        assert len(made) == 1, f"one mask for {layers} layers, {len(made)} made"
        real = inputs["attention_mask"].bool()
        assert speedups.stack_bias.bias is None, "nothing held once the stack's forward has returned"
        packed = fast_loss.encoder_states(model, inputs["input_ids"], inputs["attention_mask"])
        assert len(made) == 2 and speedups.stack_bias.bias is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[real], expected[real], rtol=1e-5, atol=1e-5)
    made.clear()
    torch.testing.assert_close(model.get_encoder()(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert len(made) == layers, "in training, each layer its own"
