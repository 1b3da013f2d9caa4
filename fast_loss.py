"""Fast implementations of the trainer's one loss (model_utils.TaskPrefixTrainer.weighted_view_loss): the sum over
the views of weight * (mean token cross-entropy of the view's targets), which the paper's alpha * label_loss +
(1 - alpha) * rationale_loss is with views (predict, explain) and weights (alpha, 1 - alpha).

The plain implementation (model_utils.one_pass_per_view) runs one full forward pass per view, each padded to its
own longest row, and keeps [tokens, vocabulary] logits for backward. These compute the same value, up to float
rounding, with less work:

- grouped_loss (seq2seq students with T5's layout): one encoder pass for both views' rows, one decoder pass per
  view, each trimmed to the rows' real length;
- causal_grouped_loss (decoder-only students): one pass per view, trimmed likewise;
- lm_head_loss / LMHeadLoss (both): the lm_head and the cross-entropy fused and chunked, at target positions only,
  the gradients computed in the forward pass, so no [tokens, vocabulary] tensor is kept.

Each family's spec (students.FAMILIES) names its implementation and the function that says which models it
applies to (seq2seq_fast_loss_applies, causal_fast_loss_applies); the trainer (model_utils.TaskPrefixTrainer.
fast_loss_applies) adds what the process must allow. Switches (speedups.py, DSS_DISABLE_SPEEDUPS): grouped_loss
turns the family implementations off, fused_head the fused lm_head (unfused logits and cross-entropy instead).
tests/test_speed.py and tests/test_students.py check each against the plain implementation.
"""

import torch
import torch.nn.functional as F

from model_utils import LABEL_PAD
from speedups import enabled, onednn_applies, onednn_mm_t


def used_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past its last True position: the columns the row needs, since padding is trailing."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * positions).amax(dim=1)


def view_token_weights(keep: torch.Tensor, weight: float) -> torch.Tensor:
    """For each kept target token of one view, weight / (the view's kept tokens): summed against the tokens'
    cross-entropies, the view's mean token loss times its weight (alpha or 1 - alpha)."""
    count = int(keep.sum())
    return torch.full((count,), weight / max(count, 1), device=keep.device)


def seq2seq_fast_loss_applies(model) -> bool:
    """grouped_loss runs T5's encoder and decoder directly; other seq2seq students (BART: final_logits_bias, its
    own shifting) take the plain implementation."""
    return all(hasattr(model, name) for name in ("encoder", "decoder", "lm_head", "_shift_right"))


def seq2seq_target_states(model, views: list[dict[str, torch.Tensor]]):
    """(hidden, targets, keeps) of a T5-like model at every target token of the views, in order (view by view, row
    by row): the decoder's last hidden states as the lm_head takes them (scaled where T5 scales them), the target
    ids, and per view the mask of its kept target positions. grouped_loss's passes:

    - one encoder pass for all views' rows together (the views share their inputs but for the prefix), trimmed to
      the longest row;
    - one decoder pass per view, trimmed to its longest target and to its rows' longest input.
    Dropping trailing padding changes no real position's value (padding is masked, decoding is causal); only
    floating-point rounding differs.
    """
    width = max(view["input_ids"].shape[1] for view in views)
    input_ids = torch.cat([F.pad(v["input_ids"], (0, width - v["input_ids"].shape[1])) for v in views])
    attention_mask = torch.cat([F.pad(v["attention_mask"], (0, width - v["attention_mask"].shape[1])) for v in views])
    input_lengths = used_lengths(attention_mask.bool())
    length = int(input_lengths.max())
    encoded = model.encoder(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length]).last_hidden_state

    hidden, targets, keeps = [], [], []
    offset = 0
    for view in views:
        rows = slice(offset, offset + view["labels"].shape[0])
        labels = view["labels"][:, : int(used_lengths(view["labels"] != LABEL_PAD).max())]
        source = int(input_lengths[rows].max())
        states = model.decoder(
            input_ids=model._shift_right(labels),
            encoder_hidden_states=encoded[rows, :source],
            encoder_attention_mask=attention_mask[rows, :source],
            use_cache=False,  # as T5ForConditionalGeneration with labels: no key/value cache built in training
        ).last_hidden_state
        keep = labels != LABEL_PAD
        hidden.append(states[keep])
        targets.append(labels[keep])
        keeps.append(keep)
        offset = rows.stop

    hidden = torch.cat(hidden)
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        hidden = hidden * model.model_dim**-0.5  # as T5ForConditionalGeneration.forward does with tied embeddings
    return hidden, torch.cat(targets), keeps


def grouped_loss(model, views: list[dict[str, torch.Tensor]], weights: list[float], kd=None) -> torch.Tensor:
    """The trainer's weighted_view_loss for T5-like seq2seq students, with less work than one pass per view: the
    passes of seq2seq_target_states, then the lm_head and the cross-entropy only at target positions, not at
    padding, fused and chunked (LMHeadLoss). Dropout draws differ from the plain implementation's, so in training
    mode the two agree in distribution, not draw by draw. kd: the token-level distillation term (distill.KdTerm),
    added chunk by chunk in the same pass; None trains on the paper's loss alone.
    """
    hidden, targets, keeps = seq2seq_target_states(model, views)
    token_weights = torch.cat([view_token_weights(keep, weight) for keep, weight in zip(keeps, weights)])
    return lm_head_loss(hidden, model.lm_head.weight, targets, token_weights, kd)


# Config fields of architectures whose forward changes the logits after the head (soft-capping: Gemma 2/3; scaling:
# Granite, Cohere), with the values that leave them unchanged.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, 0.0), "logits_scaling": (None, 1.0), "logit_scale": (None, 1.0)}


def causal_fast_loss_applies(model) -> bool:
    """causal_grouped_loss computes logits as hidden @ lm_head.weight.T: not for heads with a bias or models that
    transform logits after the head, which the plain implementation handles."""
    head = model.get_output_embeddings()
    return (
        model.base_model is not model
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and all(getattr(model.config, name, None) in neutral for name, neutral in LOGIT_TRANSFORMS.items())
    )


def causal_target_states(model, views: list[dict[str, torch.Tensor]]):
    """(hidden, targets, keeps) of a decoder-only model at every position that predicts a target token of the views,
    in order (view by view, row by row): one pass per view trimmed to its longest row (views run apart, since an
    explain row, prompt and rationale, is far longer than a predict row), no logits."""
    hidden, targets, keeps = [], [], []
    for view in views:
        length = int(used_lengths(view["attention_mask"].bool()).max())
        states = model.base_model(input_ids=view["input_ids"][:, :length],
                                  attention_mask=view["attention_mask"][:, :length])
        shifted = view["labels"][:, 1:length]  # position i predicts token i + 1
        keep = shifted != LABEL_PAD
        hidden.append(states.last_hidden_state[:, :-1][keep])
        targets.append(shifted[keep])
        keeps.append(keep)
    return torch.cat(hidden), torch.cat(targets), keeps


def causal_grouped_loss(model, views: list[dict[str, torch.Tensor]], weights: list[float], kd=None) -> torch.Tensor:
    """The trainer's weighted_view_loss for decoder-only students, with less work than one full pass per view: the
    passes of causal_target_states, then the lm_head and cross-entropy only at the positions that predict a target
    token (lm_head_loss: no logits for prompts or padding, chunked). kd: as grouped_loss's."""
    hidden, targets, keeps = causal_target_states(model, views)
    token_weights = torch.cat([view_token_weights(keep, weight) for keep, weight in zip(keeps, weights)])
    return lm_head_loss(hidden, model.get_output_embeddings().weight, targets, token_weights, kd)


# Each family's target_states by whether the model is an encoder-decoder (its config's is_encoder_decoder).
TARGET_STATES = {True: seq2seq_target_states, False: causal_target_states}


# The most fp32 logits lm_head_loss holds at once: a tiny-T5 batch of rationales in one chunk, a large GPU batch in
# a few, instead of several copies of a [tokens, vocabulary] tensor.
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
    def forward(ctx, hidden, weight, targets, token_weights, kd=None):
        loss, grad_hidden, grad_weight = lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads=True,
                                                                kd=kd)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: a second backward through a retained graph fails autograd's saved-tensor version check instead
        # of scaling twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None


def lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads: bool, kd=None):
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
            if kd is not None:  # before the softmax below overwrites the logits
                kd_loss, kd_grad = kd.chunk_loss_and_grad(logits, start, token_weight, grads)
                loss += kd_loss
            target_logits = logits.gather(1, target).squeeze(1)
            top_logits, top = logits.max(1, keepdim=True)
            probabilities = torch.softmax(logits, dim=1, out=logits)
            # log p(target) = target - top + log p(top): p(top) >= 1 / vocabulary never underflows, and the fused
            # softmax kernel is much faster on a CPU than logsumexp or exp_ where most logits are far below the max.
            log_probabilities = target_logits - top_logits.squeeze(1) + probabilities.gather(1, top).squeeze(1).log()
            loss -= (log_probabilities * token_weight).sum()
            if not grads:
                continue
            probabilities.scatter_add_(1, target, torch.full_like(target, -1, dtype=probabilities.dtype))
            probabilities.mul_(token_weight[:, None])
            if kd is not None:
                probabilities.add_(kd_grad)
            grad_logits = probabilities.to(compute_dtype)
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


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor,
                 kd=None):
    """sum_i token_weights[i] * cross_entropy(hidden[i] @ weight.T, targets[i]), without [tokens, vocab] tensors;
    with kd (distill.KdTerm), plus kd.weight * sum_i token_weights[i] * (the divergence at token i)."""
    if not enabled("fused_head"):
        logits = hidden @ weight.T
        loss = (F.cross_entropy(logits, targets, reduction="none").float() * token_weights).sum()
        return loss if kd is None else loss + kd.loss(logits, 0, token_weights)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        if kd is None:
            return LMHeadLoss.apply(hidden, weight, targets, token_weights)
        return LMHeadLoss.apply(hidden, weight, targets, token_weights, kd)
    return lm_head_loss_and_grads(hidden, weight, targets, token_weights, grads=False, kd=kd)[0]
