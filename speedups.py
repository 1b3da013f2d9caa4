"""Speed tricks for the student that swap modules and tune the process: each computes what the stock module does.

model_utils.py holds the method (collators, the alpha-weighted loss, the trainer), fast_loss.py the fast
implementations of its loss; this module holds the rest of what only makes training and evaluation faster, and the
switches of all of them. Each trick and where it applies (README's Speed section has each one's measured gain):

- grouped_loss, packed_tokens, fused_head (fast_loss.py): the loss's fast implementations, T5's stacks run on real
  tokens only (attention alone on the padded grid; the encoder at evaluation too), and the fused lm_head;
- gelu_tanh (all devices): one fused GELUTanh kernel for T5 v1.1's gelu_new (seven elementwise passes);
- onednn_linear, OneDNNLinear (CPU, fp32; training and evaluation): each of a linear layer's three products, and
  of the fused head's, on oneDNN's GEMM or torch's (MKL) sgemm, whichever this machine runs faster at that shape
  (timed once per machine, onednn_faster; the head's weight gradient on oneDNN by blocks, blocked_weight_grad):
  MKL takes AVX2 paths on some AMD CPUs where oneDNN uses AVX-512, and on others is as fast or faster;
- malloc_reuse, tune_cpu_allocator (CPU training, glibc): freed heap blocks are kept for reuse instead of being
  returned to the kernel and faulted in afresh every step;
- cpu_eval_batch, cpu_eval_batch_size (CPU evaluation): generation batches of at least 128 rows and 8x the training
  batch instead of 4x, as the available memory allows;
- cpu_dropout, CPUDropout (CPU training): dropout masks from numpy's SFC64, 16 bits an element, where torch draws a
  Bernoulli per element on AMD CPUs;
- t5_attention (CPU): SDPA attention but for the dropout of its probabilities in training, which becomes cpu_dropout
  (DroppedAttention, which keeps a byte mask for the backward pass), and in evaluation the additive mask of
  position bias and padding made once for a stack's layers (StackBias);
- reserved_cache, decoding_cache (evaluation, encoder-decoder students): the decoder's self-attention cache in
  buffers reserved for the generation's length, written in place (ReservedLayer) instead of re-concatenated;
- drop_finished, generate_dropping_finished (the same): once half of a batch's rows have ended, the rest go on
  alone, so that a batch stops paying for rows that are done;
- fused_adamw (CPU and CUDA; train_utils.training_arguments): torch's fused AdamW kernel, one pass over the weights
  instead of a dozen, given the original's eps before every step (faithful_training.OriginalAdamW);
- fused_clip (with fused_adamw; model_utils.TaskPrefixTrainer._clip_grad_norm): gradient clipping's scaling done by
  the fused AdamW step in its own pass over the gradients instead of a pass of its own, and the gradients' norm on
  a CPU by BLAS dot products (gradient_norm).

Each can be switched off on its own, for the benchmark or to rule it out when something looks wrong:
DSS_DISABLE_SPEEDUPS=cpu_dropout,fused_head python run.py ... (or =all: the loss's plain implementation, stock
modules).
"""

import ctypes
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Every switchable trick, by the name DSS_DISABLE_SPEEDUPS takes.
SPEEDUPS = ("grouped_loss", "packed_tokens", "fused_head", "gelu_tanh", "onednn_linear",
            "cpu_dropout", "t5_attention", "fused_adamw", "malloc_reuse", "cpu_eval_batch", "reserved_cache",
            "drop_finished", "fused_clip")
DISABLE_VARIABLE = "DSS_DISABLE_SPEEDUPS"


def disabled_speedups() -> frozenset[str]:
    """The tricks switched off by DSS_DISABLE_SPEEDUPS (comma-separated names, or all); ValueError on a typo."""
    return parse_disabled(os.environ.get(DISABLE_VARIABLE, ""))


@functools.lru_cache(maxsize=8)  # asked by every linear layer's call: parsed once per value of the variable
def parse_disabled(value: str) -> frozenset[str]:
    names = {name.strip() for name in value.split(",") if name.strip()}
    if "all" in names:
        return frozenset(SPEEDUPS)
    unknown = sorted(names - set(SPEEDUPS))
    if unknown:
        raise ValueError(f"{DISABLE_VARIABLE}: unknown speed-up {', '.join(unknown)}; "
                         f"choose among {', '.join(SPEEDUPS)}, or all")
    return frozenset(names)


def enabled(name: str) -> bool:
    return name not in disabled_speedups()


# oneDNN keeps each GEMM it compiles, one per operand shape, in two caches (its own and ideep's) of 1,024 entries
# of about 1.4 MB each: batch shapes change every step, so a run's memory would grow step after step. A few entries
# keep the speed (the shapes of one step repeat across its layers; the next step's differ anyway) and the memory of
# a run without oneDNN (README, Speed). Read when oneDNN first runs, so set at import; a value set by the user
# stands.
ONEDNN_CACHE_ENTRIES = 16


def limit_onednn_caches() -> None:
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(ONEDNN_CACHE_ENTRIES))


limit_onednn_caches()


@functools.cache
def onednn_built() -> bool:
    """torch's oneDNN (mkldnn) GEMM can be called directly: an x86 build that has it."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def onednn_available() -> bool:
    """onednn_built, and not switched off by torch.backends.mkldnn.enabled."""
    return onednn_built() and torch.backends.mkldnn.enabled


def onednn_applies(*tensors: torch.Tensor) -> bool:
    """onednn_linear takes these operands: fp32 on a CPU, outside autocast, with the trick on."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and enabled("onednn_linear")
        and onednn_available()
    )


def onednn_mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) by oneDNN's fp32 GEMM; a and b 2-D, each contiguous or the transpose of a contiguous tensor."""
    a = a if a.stride(-1) == 1 or a.stride(0) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 or b.stride(0) == 1 else b.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


# Output rows per oneDNN product of blocked_weight_grad (a few MB of a chunk of the fused head's logit gradient).
VOCABULARY_BLOCK = 2048


def blocked_weight_grad(grad: torch.Tensor, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """grad.T @ x (grad [rows, n], x [rows, k]) by oneDNN, VOCABULARY_BLOCK output rows at a time, each block of
    grad transposed into a contiguous copy that stays in cache; added into `into` where given. For the fused head's
    weight gradient (n the vocabulary): on some CPUs half the time of one whole transposed copy, or of oneDNN
    reading grad strided."""
    result = torch.empty(grad.shape[1], x.shape[1], dtype=x.dtype, device=x.device) if into is None else into
    for column in range(0, grad.shape[1], VOCABULARY_BLOCK):
        product = onednn_mm_t(grad[:, column : column + VOCABULARY_BLOCK].T.contiguous(), x.T)
        rows = result[column : column + VOCABULARY_BLOCK]
        if into is None:
            rows.copy_(product)
        else:
            rows.add_(product)
    return result


# Each product, as (product, rows, k, n) -> (oneDNN's call, torch's call) on random operands: a linear layer's three,
# x [rows, k] by weight [n, k] forward, grad [rows, n] by weight for the input's gradient, grad.T by x for the weight's;
# and the fused head's weight gradient, whose oneDNN call is blocked_weight_grad.
PRODUCTS = {
    "forward": lambda x, weight, grad: (lambda: onednn_mm_t(x, weight), lambda: x @ weight.T),
    "input_grad": lambda x, weight, grad: (lambda: onednn_mm_t(grad, weight.T), lambda: grad @ weight),
    "weight_grad": lambda x, weight, grad: (lambda: onednn_mm_t(grad.T, x.T), lambda: grad.T @ x),
    "head_weight_grad": lambda x, weight, grad: (lambda: blocked_weight_grad(grad, x), lambda: grad.T @ x),
}
KERNELS_FOLDER = "kernels"


@functools.cache
def machine_name() -> str:
    """This CPU and torch build, as the file name of its kernel choices: model name, family/model, a hash of the
    instruction-set flags, torch's version."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        fields["model name"] = platform.processor()
    cpu = "-".join(fields.get(key, "") for key in ("model name", "cpu family", "model"))
    flags = hashlib.sha1(fields.get("flags", "").encode()).hexdigest()[:8]
    return "".join(c if c.isalnum() or c in "-." else "_" for c in f"{cpu}-{flags}-torch{torch.__version__}")


def kernels_file() -> Path:
    from token_cache import default_cache_dir

    return default_cache_dir() / KERNELS_FOLDER / f"{machine_name()}.json"


KERNEL_CHOICES: dict[str, bool] = {}  # this process's choices, by onednn_faster's key


def read_kernel_choices() -> dict[str, bool]:
    try:
        return json.loads(kernels_file().read_text())
    except (OSError, ValueError):
        return {}


def write_kernel_choices(choices: dict[str, bool]) -> None:
    """Merged into the machine's file, written whole under a temporary name; a cache that cannot be written only
    means a later run times the product again."""
    path = kernels_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read_kernel_choices(), **choices}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass


def best_time(call, repeats: int = 3, warmups: int = 1) -> float:
    """The shortest of `repeats` timed calls, after `warmups` untimed ones (oneDNN compiles a kernel for each new
    shape on its first call)."""
    for _ in range(warmups):
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def onednn_faster(product: str, rows: int, k: int, n: int) -> bool:
    """Whether oneDNN's GEMM runs this product faster than torch's on this machine, with this many threads.

    Rows are rounded up to a power of two (a batch's token count changes every step). The first time a shape is
    asked for, both are timed on random operands of it (the best of three calls each, after one; drawn from a
    generator of their own, so that timing leaves the run's random numbers as they were), and the choice is
    kept in the machine's file in the cache folder ($DSS_CACHE, else ~/.cache/dss: kernels/<cpu>.json), which
    later runs read: a rerun or a resume makes the same choices, so its float rounding is the same too.
    """
    rows = 1 << max(0, rows - 1).bit_length()
    key = f"{product} {rows}x{k}x{n} threads={torch.get_num_threads()}"
    if key not in KERNEL_CHOICES:
        KERNEL_CHOICES.update({**read_kernel_choices(), **KERNEL_CHOICES})
    if key not in KERNEL_CHOICES:
        generator = torch.Generator().manual_seed(0)  # not torch's global one: dropout masks stay as without timing
        with torch.no_grad():
            x, weight, grad = (torch.randn(*shape, generator=generator) for shape in ((rows, k), (n, k), (rows, n)))
            onednn, stock = PRODUCTS[product](x, weight, grad)
            KERNEL_CHOICES[key] = best_time(onednn) < best_time(stock)
        write_kernel_choices(KERNEL_CHOICES)
    return KERNEL_CHOICES[key]


def linear_forward(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight.T + bias by the GEMM onednn_faster picks for this shape."""
    if onednn_faster("forward", rows.shape[0], weight.shape[1], weight.shape[0]):
        return onednn_mm_t(rows, weight, bias)
    return torch.nn.functional.linear(rows, weight, bias)


def gradient_product(product: str, a: torch.Tensor, b: torch.Tensor, rows: int, k: int, n: int) -> torch.Tensor:
    """a @ b.T by the GEMM onednn_faster picks for this gradient product of a layer of [rows, k] -> [rows, n]."""
    return onednn_mm_t(a, b) if onednn_faster(product, rows, k, n) else a @ b.T


class OneDNNLinearFunction(torch.autograd.Function):
    """x @ weight.T + bias, each of its three products (forward, input and weight gradients) by the faster GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return linear_forward(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        (n, k), count = weight.shape, rows.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = gradient_product("input_grad", grad_rows, weight.T, count, k, n).view(*grad.shape[:-1], k)
        if ctx.needs_input_grad[1]:
            grad_weight = gradient_product("weight_grad", grad_rows.T, rows.T, count, k, n)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear whose fp32 CPU products each run on oneDNN's GEMM or MKL's, whichever is faster here.

    torch's MKL sgemm takes its AVX2 paths on some AMD CPUs, where oneDNN's brgemm kernels use AVX-512, for T5's
    shapes and the tall-skinny lm_head product of a decoding step alike; on others MKL is as fast, or faster for
    some products (onednn_faster times each). Same values up to float rounding either way. Training and evaluation;
    GPUs, autocast and other dtypes take nn.Linear's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(x, self.weight) or x.numel() == 0:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return OneDNNLinearFunction.apply(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        return linear_forward(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


class StackBias:
    """create_position_bias_mask's additive mask for a padding mask, made once for all the layers of a stack's
    forward instead of once a layer: T5Stack (and fast_loss.packed_stack) give every layer the same position_bias
    and attention_mask tensors, and the mask, rows x heads x queries x keys floats, costs a pass over memory each
    time it is made. The last mask is reused while it is asked for from the very same tensors, which this refers to
    weakly: once the stack's forward drops either, the mask goes too (it is not held into training after an
    evaluation), and a new tensor never passes for a freed one."""

    def __init__(self):
        self.made_from: tuple | None = None
        self.bias: torch.Tensor | None = None

    def __call__(self, position_bias: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor,
                 key: torch.Tensor) -> torch.Tensor:
        last = self.made_from
        if (last is None or last[0]() is not position_bias or last[1]() is not attention_mask
                or last[2:] != (query.shape[2], key.shape[2])):
            self.forget()  # the old mask goes before the new one is made
            self.bias = create_position_bias_mask(position_bias, attention_mask, False, query, key)
            self.made_from = (weakref.ref(position_bias, self.forget), weakref.ref(attention_mask, self.forget),
                              query.shape[2], key.shape[2])
        return self.bias

    def forget(self, freed: weakref.ref | None = None) -> None:
        """Drop the mask: asked for, or as one of the tensors it was made from is freed (not an older one's)."""
        if freed is None or (self.made_from is not None and any(freed is ref for ref in self.made_from[:2])):
            self.made_from = self.bias = None


stack_bias = StackBias()


def t5_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs):
    """T5's SDPA attention, on a CPU with two changes: in evaluation the additive mask of position bias and padding
    is made once for a stack's layers (StackBias; in training each layer makes its own, as gradient checkpointing
    recomputes them, and sharing it gained nothing measurable), and in training, where SDPA would drop attention
    probabilities with torch's per-element Bernoulli, the same product runs as three ops with cpu_dropout, on the
    very additive mask (position bias, padding, causality) that SDPA would be given."""
    if query.device.type != "cpu" or position_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    if dropout == 0.0:
        if attention_mask is not None and not torch.is_grad_enabled():  # evaluation: one mask for the stack's layers
            bias = stack_bias(position_bias, attention_mask, query, key)
            return sdpa_attention_forward(module, query, key, value, bias, scaling=scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    bias = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    scaling = 1.0 if scaling is None else scaling
    return DroppedAttention.apply(query, key, value, bias, scaling, dropout).transpose(1, 2).contiguous(), None


class DroppedAttention(torch.autograd.Function):
    """cpu_dropout(softmax(query @ key.T * scaling + bias)) @ value, keeping for the backward pass only the
    probabilities and the one-byte mask of kept values (autograd of the three ops would also keep the dropped
    probabilities and a float mask: three score-sized tensors in all, where this keeps one and a quarter). The
    dropped probabilities are recomputed in the backward pass, one product with the mask; the values and gradients
    are those of the three ops with the same mask."""

    @staticmethod
    def forward(ctx, query, key, value, bias, scaling, p):
        scores = torch.matmul(query, key.transpose(2, 3))
        if scaling != 1.0:
            scores.mul_(scaling)
        probabilities = torch.softmax(scores.add_(bias), dim=-1)
        del scores
        keep, scale = dropout_keep(probabilities.shape, p)
        output = torch.matmul(probabilities.mul(keep).mul_(scale), value)
        ctx.save_for_backward(query, key, value, probabilities, keep)
        ctx.scaling, ctx.scale, ctx.bias_shape = scaling, scale, bias.shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probabilities, keep = ctx.saved_tensors
        needs_query, needs_key, needs_value, needs_bias = ctx.needs_input_grad[:4]
        grad_query = grad_key = grad_value = grad_bias = None
        if needs_value:
            dropped = probabilities.mul(keep).mul_(ctx.scale)
            grad_value = torch.matmul(dropped.transpose(2, 3), grad_output)
            del dropped
        grad_probabilities = torch.matmul(grad_output, value.transpose(2, 3)).mul_(keep).mul_(ctx.scale)
        grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, probabilities.dtype)
        del grad_probabilities
        if needs_bias:
            grad_bias = grad_scores.sum_to_size(ctx.bias_shape)
        if ctx.scaling != 1.0:
            grad_scores = grad_scores * ctx.scaling
        if needs_query:
            grad_query = torch.matmul(grad_scores, key)
        if needs_key:
            grad_key = torch.matmul(grad_scores.transpose(2, 3), query)
        return grad_query, grad_key, grad_value, grad_bias, None, None


T5_ATTENTION = "dss_t5_sdpa"
AttentionInterface.register(T5_ATTENTION, t5_attention)
AttentionMaskInterface.register(T5_ATTENTION, sdpa_mask)


class ReservedLayer(DynamicLayer):
    """A decoder layer's key/value cache whose keys and values are views of buffers reserved for `capacity`
    positions (twice the length when a call needs more): each decoding step writes its token's states in place,
    where DynamicLayer concatenates, copying the whole cache every step (quadratic in the generated length: a tenth
    of a tiny T5's decoding step at 256 tokens on a CPU). Keys and values replaced from outside (crop, beam
    reordering) are copied into new buffers at the next update."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffer_views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys and values last handed out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cached = self.get_seq_length()
        length = cached + key_states.shape[-2]
        if self.buffers is None or length > self.buffers[0].shape[-2] or self.keys is not self.buffer_views[0]:
            positions = self.capacity if length <= self.capacity else 2 * length
            self.buffers = tuple(states.new_empty(*states.shape[:-2], positions, states.shape[-1])
                                 for states in (key_states, value_states))
            if cached:
                self.buffers[0][..., :cached, :].copy_(self.keys)
                self.buffers[1][..., :cached, :].copy_(self.values)
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., cached:length, :].copy_(states)
        self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)
        self.buffer_views = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        self.buffers = None
        super().reset()


def decoding_cache(model, capacity: int) -> EncoderDecoderCache | None:
    """reserved_cache: the cache for generating up to `capacity` decoder positions with an encoder-decoder student,
    its self-attention layers ReservedLayers (its cross-attention cache, written once, generate's own). None, for
    generate's default, when switched off and for decoder-only students (whose layers may be sliding-window or
    linear-attention caches)."""
    if not enabled("reserved_cache") or not model.config.is_encoder_decoder:
        return None
    self_attention = DynamicCache()  # a DynamicCache, for generate and batch_select_indices; its layers reserved
    self_attention.layer_class_to_replicate = functools.partial(ReservedLayer, capacity)
    return EncoderDecoderCache(self_attention, DynamicCache())


def ended_rows(tokens: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Which rows of generated decoder tokens have ended: an end token after the start token."""
    return torch.isin(tokens[:, 1:], ends).any(dim=1)


class EndedShare(StoppingCriteria):
    """Stops generate for every row once at least `share` of the rows have ended, so that the rows still going can
    go on in a smaller batch."""

    def __init__(self, ends: torch.Tensor, share: float):
        self.ends, self.share = ends, share

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        ended = ended_rows(input_ids, self.ends)
        return torch.full_like(ended, bool(ended.sum() >= self.share * len(ended)))


# A batch stops for all its rows once this share of them have ended; the others then go on alone.
ENDED_SHARE = 0.5


def drop_finished_applies(model, sharded: bool) -> bool:
    """Whether generate_dropping_finished gives this student's greedy tokens: switched on, an encoder-decoder
    student, weights not sharded, an end token to end rows, and no generation setting counted from a call's start."""
    config = model.generation_config
    return (enabled("drop_finished") and model.config.is_encoder_decoder and not sharded
            and config.eos_token_id is not None and not config.min_new_tokens and not config.begin_suppress_tokens)


def generate_dropping_finished(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                               cache: EncoderDecoderCache | None, **settings) -> torch.Tensor:
    """drop_finished: greedy generation by an encoder-decoder student in rounds: each round stops once half of its
    rows have ended, and the next continues the others from their tokens, their encoder states and their part of the
    cache, until every row has ended or reached max_new_tokens. generate pays for every row of a batch until its
    longest row ends; this pays for the rows still going. Each row takes the tokens generate would give it (each
    round continues a row's own decoding, one token a step); the result is padded to 1 + max_new_tokens. The encoder
    runs once, before the first round (fast_loss.encoder_states: on real tokens only, with packed_tokens). cache:
    decoding_cache's, or None (reserved_cache off) for generate's own kind. Where drop_finished_applies."""
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    config = model.generation_config
    ends = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    from fast_loss import encoder_states  # fast_loss imports this module

    encoded = encoder_states(model, input_ids, attention_mask)
    tokens = input_ids.new_full((len(input_ids), 1 + max_new_tokens), config.pad_token_id)
    rows, decoded = torch.arange(len(input_ids)), None
    while True:
        start = 1 if decoded is None else decoded.shape[1]
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded[rows]), attention_mask=attention_mask[rows],
            decoder_input_ids=decoded, cache=cache, max_new_tokens=1 + max_new_tokens - start,
            # A decoder mask as long as the tokens tells generate that the cache holds all but the last one.
            **({} if decoded is None else {"decoder_attention_mask": torch.ones_like(decoded)}),
            stopping_criteria=StoppingCriteriaList([EndedShare(ends, ENDED_SHARE)]), **settings,
        )
        tokens[rows, : out.shape[1]] = out
        going = ~ended_rows(out, ends)
        if out.shape[1] > max_new_tokens or not going.any():
            return tokens
        keep = going.nonzero().squeeze(1)
        rows, decoded = rows[keep], out[keep]
        cache.batch_select_indices(keep)


# CPU evaluation batches hold at least this many rows: a decoding step's products (the vocabulary-sized lm_head's
# most) run faster per row up to about this batch on a CPU, and its Python work is shared by more rows.
CPU_EVAL_ROWS = 128
# The share of the memory available when the trainer is built that one CPU evaluation batch's generation may take.
CPU_EVAL_MEMORY_SHARE = 0.25


def cpu_eval_batch_size(default: int, config, input_length: int, gen_max_len: int, element_bytes: int = 4,
                        available_bytes: int | None = None) -> int:
    """cpu_eval_batch (CPU): the evaluation batch for default rows a batch (4 x the training batch) on a CPU.

    Each greedy decoding step multiplies the whole batch by every decoder weight and the lm_head; on a CPU those
    products run faster per row for more rows, and the per-step Python overhead is shared by more rows. So CPU
    batches take at least CPU_EVAL_ROWS rows and twice the default, as many as CPU_EVAL_MEMORY_SHARE of the
    available memory holds at generation_row_bytes a row, and never fewer than the default (GPUs keep it: there
    memory for the caches of longer inputs and bigger students is the limit). A configuration whose shape cannot
    be read keeps the default.
    """
    if not enabled("cpu_eval_batch"):
        return default
    try:
        row = generation_row_bytes(config.get_text_config(decoder=True), input_length, gen_max_len, element_bytes)
    except (AttributeError, TypeError):
        return default
    if available_bytes is None:
        available_bytes = available_memory_bytes()
    fits = int(CPU_EVAL_MEMORY_SHARE * available_bytes) // row
    return max(default, min(max(CPU_EVAL_ROWS, 2 * default), fits))


def generation_row_bytes(config, input_length: int, gen_max_len: int, element_bytes: int = 4) -> int:
    """An upper estimate of the memory one row of a generation batch takes: keys and values of every decoder layer
    for the input and the generated tokens (the cross-attention's and the decoder's cache of an encoder-decoder
    student, the prompt's and the answer's of a decoder-only one), one layer's attention scores over the input, a
    few activations of the input's width, and the step's logits.

    Widths are the model's hidden size (T5's attention is narrower, grouped-query caches are smaller: an upper
    estimate).
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) \
        or config.num_hidden_layers
    cache = layers * 2 * (input_length + gen_max_len) * hidden
    transient = heads * input_length ** 2 + 8 * input_length * hidden + 2 * config.vocab_size
    return element_bytes * (cache + transient)


def available_memory_bytes() -> int:
    """The memory this process may still take: the kernel's MemAvailable, within the cgroup's limit (Slurm jobs,
    containers), shared among the launch's processes on this machine; the physical memory where neither is known."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def tune_cpu_allocator() -> bool:
    """malloc_reuse: keep freed heap memory for reuse instead of returning it to the kernel (glibc, Linux).

    By default glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mappings and trims the heap's
    top once more than twice that is free. A training step frees its activations and its vocabulary-sized gradients
    (32 MiB each for the T5 vocabulary) every step, so the next step takes thousands of page faults, each zeroing a
    fresh 4 KiB page. With the threshold raised and trimming off, freed blocks are reused and the steady-state step
    takes almost none, for somewhat more working memory (the heap keeps what it freed). Process-wide, so only
    called for CPU training (train_utils.build_trainer); returns whether it took effect.
    """
    libc = glibc()
    if not enabled("malloc_reuse") or libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def return_freed_memory() -> bool:
    """Give the heap's free memory back to the system now (glibc's malloc_trim), which malloc_reuse otherwise keeps
    for the next step; for memory freed for good, such as the optimizer's state after training. Returns whether
    anything was returned."""
    libc = glibc()
    return libc is not None and bool(libc.malloc_trim(0))


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc on Linux (mallopt, malloc_trim); None elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of grads together, the norm clip_grad_norm_ clips by. fp32 on a CPU: from each gradient's
    dot product with itself, BLAS's one read of it, which runs there in about two thirds of the time of torch's
    per-tensor norm; elsewhere torch's own (get_total_norm)."""
    if grads and all(g.device.type == "cpu" and g.dtype == torch.float32 for g in grads):
        return torch.stack([torch.dot(flat, flat) for flat in (g.reshape(-1) for g in grads)]).sum().sqrt()
    return torch.nn.utils.get_total_norm(grads)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout (training) with its mask drawn by numpy's SFC64 generator, seeded from torch's.

    On CPUs where torch has no vectorised Bernoulli (MKL's runs on Intel only; AMD takes a per-element loop) drawing
    the mask is a large share of a tiny-T5 training step; SFC64 draws random bits much faster. Each value
    takes a 16-bit draw and is dropped iff the draw is below round(p * 2^16): the drop probability is p rounded to a
    multiple of 2^-16 (0.1 becomes 0.1000061), and survivors are scaled by 1 / (1 - that), so the output's expectation
    is x exactly, as nn.Dropout's. The mask is applied as one product with a [x]-shaped tensor of 0 and the scale:
    one pass forward and one backward, faster than 32-bit draws, a boolean mask and a separate scaling. The seed
    comes from torch's default generator, so torch.manual_seed and the Trainer's saved RNG states make runs repeat
    and resume exactly.
    """
    keep, scale = dropout_keep(x.shape, p)
    return x * keep.to(x.dtype).mul_(scale)  # faster here than torch.where


def dropout_keep(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """cpu_dropout's mask (True: kept) for a tensor of this shape, and the survivors' scale."""
    seed = int(torch.randint(0, 2**62, ()))
    n = shape.numel()
    draws = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 3) // 4).view(np.int16)[:n]
    dropped = min(round(p * 2**16), 2**16 - 1)  # draws below this (counted from the least) are dropped
    keep = torch.from_numpy(draws >= dropped - 2**15).view(shape)  # the draws are signed: uniform on [-2^15, 2^15)
    return keep, 2**16 / (2**16 - dropped)


class CPUDropout(torch.nn.Dropout):
    """nn.Dropout whose CPU training path is cpu_dropout; evaluation, GPUs and in-place dropout keep nn.Dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        return cpu_dropout(x, self.p)


def speed_up_student(model, enable: bool = True):
    """Swap in faster modules that compute the same functions; no weight changes, nothing saved changes.

    - T5 v1.1's gated-GELU activation (gelu_new: seven elementwise passes, each kept for backward) becomes one
      fused F.gelu(approximate="tanh") (GELUTanh), the same function up to float rounding;
    - every nn.Linear becomes a OneDNNLinear, and every nn.Dropout a CPUDropout (by changing their class, so tied
      weights and device hooks stay);
    Tricks named in DSS_DISABLE_SPEEDUPS are left out; enable=False puts the stock modules back (the benchmark's
    reference formulation).
    """
    swap = {name: enable and enabled(name) for name in ("gelu_tanh", "onednn_linear", "cpu_dropout", "t5_attention")}
    old, new = (NewGELUActivation, GELUTanh) if swap["gelu_tanh"] else (GELUTanh, NewGELUActivation)
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is old:
                setattr(module, name, new())
        if type(module) in (torch.nn.Dropout, CPUDropout):
            module.__class__ = CPUDropout if swap["cpu_dropout"] else torch.nn.Dropout
        if type(module) in (torch.nn.Linear, OneDNNLinear):
            module.__class__ = OneDNNLinear if swap["onednn_linear"] else torch.nn.Linear
    attention = getattr(model.config, "_attn_implementation", None)
    if getattr(model.config, "model_type", None) in ("t5", "mt5") and attention in ("sdpa", T5_ATTENTION):
        model.set_attn_implementation(T5_ATTENTION if swap["t5_attention"] else "sdpa")
    return model
