"""Speed tricks for the student: each computes what the stock modules / the paper's two-pass loss compute.

model_utils.py holds the method (collators, the alpha-weighted loss, the trainer); this module holds what only makes
it faster. Each trick, where it applies, and its gain as measured: the step time with it over the step time without
it, task_prefix / standard (tiny T5, cqa, batch 8, 2 CPU threads, bench_original.py --sides project
project-without=NAME, 10 rounds; the README's Speed section has the commands, spreads and pooled runs):

- grouped_loss (all devices; single-process seq2seq students): one encoder pass for both views, trimmed to the
  longest input, one decoder pass per view trimmed to its longest target: 0.91x / 1.02x, and 0.82x the working
  memory in task_prefix;
  - fused_head, lm_head_loss / LMHeadLoss (all devices): lm_head and cross-entropy fused and chunked, only at target
    positions, no [tokens, vocabulary] tensors kept for backward: 0.93x / 0.99x;
- gelu_tanh (all devices): one fused GELUTanh kernel for T5 v1.1's gelu_new (seven elementwise passes): 0.98x /
  0.96x pooled over 39 rounds, and 5% less working memory;
- onednn_linear, OneDNNLinear (CPU, fp32; training and evaluation): every linear layer's three products, and the fused
  head's, on oneDNN's GEMM instead of torch's MKL sgemm, which takes AVX2 paths on AMD CPUs where oneDNN uses
  AVX-512 (1.5-2.5x the FLOP/s for T5's shapes): 0.78x / 0.86x. (It replaced SkinnyLinear, the decoding step's
  lm_head as weight @ x.T: oneDNN's product is as fast for 8 rows and 1.5x for 32.)
- malloc_reuse, tune_cpu_allocator (CPU training, glibc): freed heap blocks are kept for reuse instead of being
  returned to the kernel and faulted in afresh (about 8,000 page faults per tiny-T5 step without it): 0.965x /
  0.986x pooled over 20 rounds, 5% and 11% side by side with the original, for about 10% more working memory;
- cpu_eval_batch, eval_batch_factor (CPU evaluation): generation batches of 8x the training batch instead of 4x:
  256 cqa test rows in 5.2 s instead of 6.9 s;
- cpu_dropout, CPUDropout (CPU training): dropout masks from numpy's SFC64, 16 bits an element; torch's per-element
  Bernoulli on AMD CPUs was 15% of a task_prefix step: 0.91x / 0.92x;
- t5_attention (CPU training): SDPA attention but for the dropout of its probabilities, which becomes cpu_dropout:
  0.96x / 0.98x pooled over 49 rounds (rationales make the decoder's attention long in task_prefix);
- fused_adamw (CPU and CUDA; train_utils.training_arguments): torch's fused AdamW kernel, one pass over the weights
  instead of a dozen, given the original's eps before every step (faithful_training.OriginalAdamW): 0.94x / 0.77x.

Each can be switched off on its own, for the benchmark or to rule it out when something looks wrong:
DSS_DISABLE_SPEEDUPS=cpu_dropout,fused_head python run.py ... (or =all: the paper's formulation, stock modules).
"""

import ctypes
import functools
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The labels' padding (model_utils.LABEL_PAD): Hugging Face's losses ignore it.
IGNORE_INDEX = -100

# Every switchable trick, by the name DSS_DISABLE_SPEEDUPS takes.
SPEEDUPS = ("grouped_loss", "fused_head", "gelu_tanh", "onednn_linear",
            "cpu_dropout", "t5_attention", "fused_adamw", "malloc_reuse", "cpu_eval_batch")
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


# oneDNN keeps each GEMM it compiles, one per operand shape, in two caches (its own and ideep's) of 1,024 entries and
# about 1.4 MB each: batch shapes change every step, and a tiny-T5 run grew by 0.4 GB in 40 steps. 16 entries kept
# the speed (the shapes of one step repeat across its layers; the next step's differ anyway) and the peak RSS of a
# run without oneDNN (64 entries: the same speed, 0.15 GB more). Read when oneDNN first runs, so set at import; a
# value set by the user stands.
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


class OneDNNLinearFunction(torch.autograd.Function):
    """x @ weight.T + bias with all three products (forward, input and weight gradients) by oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return onednn_mm_t(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm_t(grad_rows, weight.T).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_mm_t(grad_rows.T, rows.T)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear whose fp32 CPU products run on oneDNN's GEMM instead of MKL's.

    torch's MKL sgemm takes its AVX2 paths on AMD CPUs; oneDNN's brgemm kernels use AVX-512 there, 1.5-2.5x the
    FLOP/s for T5's shapes (and for the lm_head of a decoding step, 1.5x the tall-skinny product). Same values up to
    float rounding (about 3e-7 relative, as MKL's). Training and evaluation; GPUs, autocast and other dtypes take
    nn.Linear's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(x, self.weight) or x.numel() == 0:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return OneDNNLinearFunction.apply(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        return onednn_mm_t(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


def t5_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs):
    """T5's SDPA attention, except in CPU training, where SDPA would drop attention probabilities with torch's
    per-element Bernoulli; there the same product runs as three ops with cpu_dropout, on the very additive mask
    (position bias, padding, causality) that SDPA would be given."""
    if dropout == 0.0 or query.device.type != "cpu" or position_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    bias = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        scores = scores * scaling
    probabilities = cpu_dropout(torch.softmax(scores + bias, dim=-1), dropout)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


T5_ATTENTION = "dss_t5_sdpa"
AttentionInterface.register(T5_ATTENTION, t5_attention)
AttentionMaskInterface.register(T5_ATTENTION, sdpa_mask)


def eval_batch_factor(factor: int, on_gpu: bool) -> int:
    """cpu_eval_batch (CPU): evaluation batches twice the default factor of the training batch.

    Each greedy decoding step multiplies the whole batch by the 32,128-row lm_head; on a CPU that product runs at 180
    GFLOP/s for 32 rows and 260 for 64, and the per-step Python overhead is shared by twice the rows: 256 cqa test rows
    evaluate in 5.2 s instead of 6.9 s (the tiny T5, 2 cores), for about 0.1 GB more peak memory. GPUs keep the
    factor, where memory for the caches of longer inputs and bigger students is the limit.
    """
    return factor if on_gpu or not enabled("cpu_eval_batch") else 2 * factor


def tune_cpu_allocator() -> bool:
    """malloc_reuse: keep freed heap memory for reuse instead of returning it to the kernel (glibc, Linux).

    By default glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mappings and trims the heap's
    top once more than twice that is free. A training step frees its activations and its vocabulary-sized gradients
    (32 MiB each for the T5 vocabulary) every step, so the next step takes 8,000-26,000 page faults, each zeroing a
    fresh 4 KiB page: about 15% of a tiny-T5 standard step. With the threshold raised and trimming off, freed blocks
    are reused and the steady-state step takes almost none, for about 10% more working memory (the heap keeps what
    it freed). Process-wide, so only called for CPU training (train_utils.build_trainer); returns whether it took
    effect.
    """
    if not enabled("malloc_reuse") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl: no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout (training) with its mask drawn by numpy's SFC64 generator, seeded from torch's.

    On CPUs where torch has no vectorised Bernoulli (MKL's runs on Intel only; AMD takes a per-element loop) drawing
    the mask is ~15% of a tiny-T5 training step; SFC64 draws random bits in about a quarter of the time. Each value
    takes a 16-bit draw and is dropped iff the draw is below round(p * 2^16): the drop probability is p rounded to a
    multiple of 2^-16 (0.1 becomes 0.1000061), and survivors are scaled by 1 / (1 - that), so the output's expectation
    is x exactly, as nn.Dropout's. The mask is applied as one product with a [x]-shaped tensor of 0 and the scale:
    one pass forward and one backward; with the 16-bit draws, about half the time of 32-bit draws, a boolean mask
    and a separate scaling. The seed comes from torch's default generator, so torch.manual_seed and the Trainer's
    saved RNG states make runs repeat and resume exactly.
    """
    seed = int(torch.randint(0, 2**62, ()))
    n = x.numel()
    draws = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 3) // 4).view(np.int16)[:n]
    dropped = min(round(p * 2**16), 2**16 - 1)  # draws below this (counted from the least) are dropped
    keep = torch.from_numpy(draws >= dropped - 2**15).view(x.shape)  # the draws are signed: uniform on [-2^15, 2^15)
    return x * keep.to(x.dtype).mul_(2**16 / (2**16 - dropped))  # torch.where would take 2.5x as long here


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


def used_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past its last True position: the columns the row needs, since padding is trailing."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * positions).amax(dim=1)


def view_token_weights(keep: torch.Tensor, weight: float) -> torch.Tensor:
    """For each kept target token of one view, weight / (the view's kept tokens): summed against the tokens'
    cross-entropies, the view's mean token loss times its weight (alpha or 1 - alpha)."""
    count = int(keep.sum())
    return torch.full((count,), weight / max(count, 1), device=keep.device)


def grouped_loss(model, views: list[dict[str, torch.Tensor]], weights: list[float]) -> torch.Tensor:
    """sum_v weights[v] * (mean token cross-entropy of view v): the value two_pass_loss computes, with less work.

    - One encoder pass for all views' rows together (the views share their inputs but for the prefix), trimmed to
      the longest row;
    - one decoder pass per view, trimmed to its longest target and to its rows' longest input;
    - the lm_head and the cross-entropy only at target positions, not at padding, fused and chunked (LMHeadLoss).
    Dropping trailing padding changes no real position's value (padding is masked, decoding is causal); only
    floating-point rounding differs (about 1e-7 relative in fp32). Dropout draws differ, so in training mode the
    two formulations agree in distribution, not draw by draw. (Rows sorted into length groups, each padded to its
    own longest, gained 8% of a task_prefix step while the products ran on MKL; with them on oneDNN, which compiles
    a kernel for each new shape, the groups' extra calls cost what their padding saved: 0.99x task_prefix, 1.04x
    standard. They were removed.)
    """
    width = max(view["input_ids"].shape[1] for view in views)
    input_ids = torch.cat([F.pad(v["input_ids"], (0, width - v["input_ids"].shape[1])) for v in views])
    attention_mask = torch.cat([F.pad(v["attention_mask"], (0, width - v["attention_mask"].shape[1])) for v in views])
    input_lengths = used_lengths(attention_mask.bool())
    length = int(input_lengths.max())
    encoded = model.encoder(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length]).last_hidden_state

    hidden, targets, token_weights = [], [], []
    offset = 0
    for view, weight in zip(views, weights):
        rows = slice(offset, offset + view["labels"].shape[0])
        labels = view["labels"][:, : int(used_lengths(view["labels"] != IGNORE_INDEX).max())]
        source = int(input_lengths[rows].max())
        states = model.decoder(
            input_ids=model._shift_right(labels),
            encoder_hidden_states=encoded[rows, :source],
            encoder_attention_mask=attention_mask[rows, :source],
            use_cache=False,  # as T5ForConditionalGeneration with labels: no key/value cache built in training
        ).last_hidden_state
        keep = labels != IGNORE_INDEX
        hidden.append(states[keep])
        targets.append(labels[keep])
        token_weights.append(view_token_weights(keep, weight))
        offset = rows.stop

    hidden = torch.cat(hidden)
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        hidden = hidden * model.model_dim**-0.5  # as T5ForConditionalGeneration.forward does with tied embeddings
    return lm_head_loss(hidden, model.lm_head.weight, torch.cat(targets), torch.cat(token_weights))


# The most fp32 logits lm_head_loss holds at once: a tiny-T5 batch of 8 rationales in one chunk; batch 64 on a GPU in
# a few, instead of several copies of a [tokens, vocabulary] tensor (smaller chunks were slower on a CPU).
LOGIT_CHUNK_BYTES = 64 << 20
# Vocabulary rows per oneDNN product of the fused head's weight gradient (a few MB of a chunk's logit gradient).
VOCABULARY_BLOCK = 2048


class LMHeadLoss(torch.autograd.Function):
    """The lm_head and the weighted cross-entropy in one step, a chunk of rows at a time.

    Unfused, autograd keeps [tokens, vocabulary] logits, their log-softmax and its gradient: for a batch of
    rationales, several copies of a tensor as large as the tiny T5. Here each chunk's logits become their gradient
    (softmax - one-hot, times the token's weight) in place, in one buffer, and the gradients of hidden and weight are
    accumulated in the forward pass; backward only scales them, in place. Same values up to float rounding; under
    autocast the products run in the autocast dtype and the softmax in fp32, as unfused.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights):
        loss, grad_hidden, grad_weight = lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: a second backward through a retained graph fails autograd's saved-tensor version check instead
        # of scaling twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None


def lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads: bool):
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    weight_c, hidden_c = weight.to(compute_dtype), hidden.to(compute_dtype)
    targets, token_weights = targets.to(hidden.device), token_weights.to(hidden.device, torch.float32)
    loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = None  # the first chunk's product allocates it: no separate zero-filling pass over the weight's size
    rows = max(16, LOGIT_CHUNK_BYTES // (4 * weight.shape[0]))
    onednn = onednn_applies(hidden_c, weight_c)
    # Without oneDNN, every [rows, vocabulary] step writes into this one buffer: fresh tensors this size cost a page
    # fault per 4 KiB on a CPU (a third of the product's time) and add to the peak.
    buffer = None if onednn else torch.empty(min(rows, hidden.shape[0]), weight.shape[0], device=hidden.device,
                                             dtype=torch.float32)
    with torch.autocast(device, enabled=False):  # dtypes are set explicitly here
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden_c[start : start + rows]
            target, token_weight = targets[start : start + rows, None], token_weights[start : start + rows]
            if onednn:
                logits = onednn_mm_t(chunk, weight_c)
            elif compute_dtype == torch.float32:
                logits = torch.mm(chunk, weight_c.T, out=buffer[: len(chunk)])
            else:
                logits = buffer[: len(chunk)].copy_(chunk @ weight_c.T)
            target_logits = logits.gather(1, target).squeeze(1)
            top_logits, top = logits.max(1, keepdim=True)
            probabilities = torch.softmax(logits, dim=1, out=logits)
            # log p(target) = target - top + log p(top): p(top) >= 1 / vocabulary never underflows, and the fused
            # softmax kernel is 4x faster on a CPU than logsumexp or exp_ where most logits are far below the max.
            log_probabilities = target_logits - top_logits.squeeze(1) + probabilities.gather(1, top).squeeze(1).log()
            loss -= (log_probabilities * token_weight).sum()
            if not grads:
                continue
            probabilities.scatter_add_(1, target, torch.full_like(target, -1, dtype=probabilities.dtype))
            grad_logits = probabilities.mul_(token_weight[:, None]).to(compute_dtype)
            if onednn:
                grad_hidden[start : start + rows] = onednn_mm_t(grad_logits, weight_c.T)
                first = grad_weight is None
                if first:
                    grad_weight = torch.empty_like(weight)
                # grad_logits.T @ chunk, a block of vocabulary rows at a time, each transposed into a contiguous copy
                # that stays in cache: half the time of one whole transposed copy, or of oneDNN reading it strided.
                for column in range(0, weight.shape[0], VOCABULARY_BLOCK):
                    block = grad_logits[:, column : column + VOCABULARY_BLOCK].T.contiguous()
                    rows_of_weight = grad_weight[column : column + VOCABULARY_BLOCK]
                    if first:
                        rows_of_weight.copy_(onednn_mm_t(block, chunk.T))
                    else:
                        rows_of_weight.add_(onednn_mm_t(block, chunk.T))
                continue
            grad_hidden[start : start + rows] = grad_logits @ weight_c
            if grad_weight is None:
                grad_weight = (grad_logits.T @ chunk).to(weight.dtype)
            elif grad_logits.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.T, chunk)
            else:
                grad_weight += grad_logits.T @ chunk
    if grads and grad_weight is None:  # no target rows at all
        grad_weight = torch.zeros_like(weight)
    return loss, grad_hidden, grad_weight


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor):
    """sum_i token_weights[i] * cross_entropy(hidden[i] @ weight.T, targets[i]), without [tokens, vocab] tensors."""
    if not enabled("fused_head"):
        return (F.cross_entropy(hidden @ weight.T, targets, reduction="none").float() * token_weights).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LMHeadLoss.apply(hidden, weight, targets, token_weights)
    return lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads=False)[0]
