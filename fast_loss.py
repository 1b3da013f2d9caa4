"""Fast implementations of the trainer's one loss (model_utils.TaskPrefixTrainer.weighted_view_loss): the sum over
the views of weight * (mean token cross-entropy of the view's targets), which the paper's alpha * label_loss +
(1 - alpha) * rationale_loss is with views (predict, explain) and weights (alpha, 1 - alpha).

The plain implementation (model_utils.one_pass_per_view) runs one full forward pass per view, each padded to its
own longest row, and keeps [tokens, vocabulary] logits for backward. These compute the same value, up to float
rounding, with less work:

- grouped_loss (seq2seq students with T5's layout): one encoder pass for both views' rows, one decoder pass per
  view, each trimmed to the rows' real length; for T5 and mT5 (packed_tokens), on the rows' real tokens only,
  packed, with attention alone on the padded grid, the views' decoder passes in one (each view attending on a grid
  of its own), and the passes' tokens embedded in one lookup;
- causal_grouped_loss (decoder-only students): one pass per view, trimmed likewise;
- lm_head_loss / LMHeadLoss (both): the lm_head and the cross-entropy fused and chunked, at target positions only,
  the gradients computed in the forward pass, so no [tokens, vocabulary] tensor is kept.

Each family's spec (students.FAMILIES) names its implementation and the function that says which models it
applies to (seq2seq_fast_loss_applies, causal_fast_loss_applies); the trainer (model_utils.TaskPrefixTrainer.
fast_loss_applies) adds what the process must allow. Switches (speedups.py, DSS_DISABLE_SPEEDUPS): grouped_loss
turns the family implementations off, packed_tokens the packing (passes on padded rows), fused_head the fused
lm_head (unfused logits and cross-entropy instead).
tests/test_speed.py and tests/test_students.py check each against the plain implementation.
"""

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from model_utils import LABEL_PAD
from speedups import (T5_ATTENTION, blocked_weight_grad, enabled, gradient_product, onednn_applies, onednn_faster,
                      onednn_mm_t)


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


def grouped_inputs(views: list[dict[str, torch.Tensor]]):
    """(input_ids, attention_mask, input_lengths) of all views' rows in one batch, view after view, padded to the
    widest view: what one encoder pass takes."""
    width = max(view["input_ids"].shape[1] for view in views)
    input_ids = torch.cat([F.pad(v["input_ids"], (0, width - v["input_ids"].shape[1])) for v in views])
    attention_mask = torch.cat([F.pad(v["attention_mask"], (0, width - v["attention_mask"].shape[1])) for v in views])
    return input_ids, attention_mask, used_lengths(attention_mask.bool())


class Packing:
    """Where the real tokens of a [rows, length] batch are (mask True), in row-major order: the packed layout keeps
    only them, [tokens, width], and the padded grid is [rows, length, width]."""

    def __init__(self, mask: torch.Tensor):
        self.rows, self.length = mask.shape
        self.index = mask.flatten().nonzero().squeeze(1)
        self.tokens = len(self.index)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(self.rows * self.length, -1).index_select(0, self.index)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """Zeros at padding: finite, so attention's zero weights on them stay zero."""
        grid = packed.new_zeros(self.rows * self.length, packed.shape[-1])
        return grid.index_copy(0, self.index, packed).view(self.rows, self.length, -1)


def packed_tokens_apply(model) -> bool:
    """packed_tokens: T5 and mT5 (relative position bias in the first layer of each stack) with SDPA-style attention
    (boolean masks), no gradient checkpointing, and weights that are not fp16 (T5's fp16 overflow clamping is not
    repeated here). Other seq2seq students run their own stacks' forward."""
    config = model.config
    return (
        enabled("packed_tokens")
        and config.model_type in ("t5", "mt5")
        and getattr(config, "_attn_implementation", None) in ("sdpa", T5_ATTENTION)
        and not model.is_activation_checkpointing
        and model.encoder.embed_tokens.weight.dtype != torch.float16
    )


def packed_attention(attention, hidden, groups: list[Packing], masks: list, position_biases: list, source=None,
                     source_groups: list[Packing] | None = None):
    """A T5Attention module's output for packed tokens: its four projections on all real tokens at once, the scores
    on each group's padded grid, by the attention function the model is configured with (as T5Attention.forward
    calls it). hidden's tokens are groups' tokens one group after another; each group attends within itself, with
    its mask and position bias (None: none, as cross-attention, whose zeros T5Attention makes). source (packed,
    grouped alike by source_groups): the encoder states a cross-attention attends to, group by group."""
    heads, width = attention.n_heads, attention.key_value_proj_dim
    if source is None:
        source, source_groups = hidden, groups

    def grid(states, layout):  # [tokens, heads * width] -> [rows, heads, length, width]
        return layout.pad(states).view(layout.rows, layout.length, heads, width).transpose(1, 2)

    source_tokens = [group.tokens for group in source_groups]
    queries = attention.q(hidden).split([group.tokens for group in groups])
    keys, values = attention.k(source).split(source_tokens), attention.v(source).split(source_tokens)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, None)
    outputs = []
    for query, key, value, packing, source_packing, mask, position_bias in zip(
            queries, keys, values, groups, source_groups, masks, position_biases):
        query, key, value = grid(query, packing), grid(key, source_packing), grid(value, source_packing)
        if position_bias is None:
            position_bias = torch.zeros((1, heads, packing.length, source_packing.length), device=query.device,
                                        dtype=query.dtype)
        output, _ = interface(attention, query, key, value, mask,
                              dropout=attention.dropout if attention.training else 0.0, scaling=attention.scaling,
                              position_bias=position_bias)
        outputs.append(packing.pack(output))  # output: [rows, length, heads, width]
    return attention.o(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


def packed_stack(stack, embedded, groups: list[Packing], masks: list, source=None,
                 source_groups: list[Packing] | None = None, source_masks: list | None = None):
    """T5Stack.forward in training, without cache, on packed tokens: the last hidden states [tokens, d_model] of the
    rows' real tokens, from their embeddings (embedded: [tokens, d_model], groups' tokens one group after another).
    Embeddings, layer norms, feed-forward layers, dropout, residual sums and the attention projections are per
    token, so they run on real tokens only, all groups at once; attention runs on each group's padded grid, where
    padding is masked (encoder and cross-attention: mask [rows, 1, 1, length] True at real tokens) or comes after
    every real query (decoder: causal, mask None). Groups let rows of different shapes share one pass: the
    decoder's views, each with its own target length and its own encoder rows (source_groups). Each real token's
    value is the padded forward's up to float rounding (padding never reaches a real token)."""
    hidden = stack.dropout(embedded)
    first = stack.block[0].layer[0].SelfAttention
    position_biases = [first.compute_bias(group.length, group.length, device=embedded.device) for group in groups]
    for block in stack.block:
        attention = block.layer[0]
        hidden = hidden + attention.dropout(packed_attention(
            attention.SelfAttention, attention.layer_norm(hidden), groups, masks, position_biases))
        if source is not None:
            cross = block.layer[1]
            hidden = hidden + cross.dropout(packed_attention(
                cross.EncDecAttention, cross.layer_norm(hidden), groups, source_masks, [None] * len(groups), source,
                source_groups))
        hidden = block.layer[-1](hidden)  # T5LayerFF: layer norm, feed-forward, dropout, residual
    return stack.dropout(stack.final_layer_norm(hidden))


def encoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states [rows, length, d_model] for generation: with packed_tokens (packed_stack),
    computed on the rows' real tokens only and zeros at padding, which cross-attention masks; otherwise the
    encoder's own forward. Length-sorted evaluation batches still pad their shorter rows to the longest."""
    if not packed_tokens_apply(model):
        return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    packing = Packing(real)
    embedded = model.encoder.embed_tokens(input_ids.flatten()[packing.index])
    return packing.pad(packed_stack(model.encoder, embedded, [packing], [real[:, None, None, :]]))


def embedded_tokens(model, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's embeddings of encoder_ids and the decoder's of decoder_ids: where the two stacks' embeddings are
    alike and share their weight (T5's `shared`), in one lookup, whose backward is one vocabulary-sized gradient
    instead of two, each zero-filled and then summed into the weight's."""
    encoder, decoder = model.encoder.embed_tokens, model.decoder.embed_tokens
    alike = (type(encoder) is type(decoder) and encoder.weight is decoder.weight
             and encoder.extra_repr() == decoder.extra_repr() and not decoder._forward_hooks
             and not decoder._forward_pre_hooks)
    if not alike:
        return encoder(encoder_ids), decoder(decoder_ids)
    return encoder(torch.cat([encoder_ids, decoder_ids])).split([len(encoder_ids), len(decoder_ids)])


def packed_target_states(model, views: list[dict[str, torch.Tensor]]):
    """seq2seq_target_states's passes on packed tokens (packed_stack): no projection, feed-forward layer or
    elementwise op runs on padding, and the views' decoder passes are one, each view a group of its own (its target
    length, its rows' encoder states): one product a layer for all views' target tokens, whose weight gradient sums
    over them, instead of a product a view and a sum of the views' weight gradients."""
    input_ids, attention_mask, input_lengths = grouped_inputs(views)
    real = attention_mask[:, : int(input_lengths.max())].bool()
    packing = Packing(real)
    labels = [view["labels"][:, : int(used_lengths(view["labels"] != LABEL_PAD).max())] for view in views]
    keeps = [view_labels != LABEL_PAD for view_labels in labels]
    decoded = [Packing(keep) for keep in keeps]
    shifted = torch.cat([model._shift_right(view_labels).flatten()[view_packing.index]
                         for view_labels, view_packing in zip(labels, decoded)])
    embedded, decoder_embedded = embedded_tokens(model, input_ids[:, : packing.length].flatten()[packing.index],
                                                 shifted)
    encoded = packed_stack(model.encoder, embedded, [packing], [real[:, None, None, :]])
    source_masks, row = [], 0
    for view_labels in labels:  # each view's rows, trimmed to their longest input
        rows = slice(row, row + view_labels.shape[0])
        source_masks.append(real[rows, : int(input_lengths[rows].max())])
        row = rows.stop
    hidden = packed_stack(model.decoder, decoder_embedded, decoded, [None] * len(views), encoded,
                          [Packing(mask) for mask in source_masks], [mask[:, None, None, :] for mask in source_masks])
    return hidden, torch.cat([view_labels[keep] for view_labels, keep in zip(labels, keeps)]), keeps


def seq2seq_target_states(model, views: list[dict[str, torch.Tensor]]):
    """(hidden, targets, keeps) of a T5-like model at every target token of the views, in order (view by view, row
    by row): the decoder's last hidden states as the lm_head takes them (scaled where T5 scales them), the target
    ids, and per view the mask of its kept target positions. grouped_loss's passes:

    - one encoder pass for all views' rows together (the views share their inputs but for the prefix), trimmed to
      the longest row;
    - one decoder pass per view, trimmed to its longest target and to its rows' longest input.
    Dropping trailing padding changes no real position's value (padding is masked, decoding is causal); only
    floating-point rounding differs. With packed_tokens (packed_tokens_apply), the passes skip the rest of the
    padding too (packed_target_states).
    """
    if packed_tokens_apply(model):
        hidden, targets, keeps = packed_target_states(model, views)
        return scaled_for_head(model, hidden), targets, keeps
    input_ids, attention_mask, input_lengths = grouped_inputs(views)
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

    return scaled_for_head(model, torch.cat(hidden)), torch.cat(targets), keeps


def scaled_for_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states as T5's lm_head takes them: scaled by d_model^-0.5 with tied embeddings."""
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        return hidden * model.model_dim**-0.5  # as T5ForConditionalGeneration.forward does
    return hidden


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
    vocabulary, width = weight.shape
    rows = max(16, LOGIT_CHUNK_BYTES // (4 * vocabulary))
    # fp32 on a CPU: each of the three products on oneDNN's GEMM or torch's, whichever this machine runs faster at
    # the chunk's shape (speedups.onednn_faster), as OneDNNLinear does for the other layers.
    onednn = onednn_applies(hidden_c, weight_c)
    # Every [rows, vocabulary] product torch runs writes into this one buffer: fresh tensors this size cost a page
    # fault per 4 KiB on a CPU (a third of the product's time) and add to the peak.
    buffer = None  # made at the first chunk that needs it, the largest
    with torch.autocast(device, enabled=False):  # dtypes are set explicitly here
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden_c[start : start + rows]
            target, token_weight = targets[start : start + rows, None], token_weights[start : start + rows]
            if onednn and onednn_faster("forward", len(chunk), width, vocabulary):
                logits = onednn_mm_t(chunk, weight_c)
            else:
                if buffer is None:
                    buffer = torch.empty(len(chunk), vocabulary, device=hidden.device, dtype=torch.float32)
                if compute_dtype == torch.float32:
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
                grad_hidden[start : start + rows] = gradient_product("input_grad", grad_logits, weight_c.T, len(chunk),
                                                                     width, vocabulary)
            else:
                grad_hidden[start : start + rows] = grad_logits @ weight_c
            if onednn and onednn_faster("head_weight_grad", len(chunk), width, vocabulary):
                grad_weight = blocked_weight_grad(grad_logits, chunk, grad_weight)
            elif grad_weight is None:
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
