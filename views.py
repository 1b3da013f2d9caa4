"""The two views of every example as token ids: `predict: <input>` -> label and `explain: <input>` -> rationale.

Standard mode (finetuning, standard distillation) has the first view only, and no prefix, as in the paper. Each
family of students reads a view its own way; students.FAMILIES points each at its function here:

- seq2seq (T5, BART, ...): the prompt is the encoder's input, the target the decoder's labels (tokenize_seq2seq);
- decoder-only (GPT-2, Llama, ...): one sequence, `<prompt><SEPARATOR><target><EOS>`, with the loss on the target
  and EOS only; at evaluation the model continues the left-padded `<prompt><SEPARATOR>` greedily until EOS
  (tokenize_causal; model_utils.CausalViewsCollator joins prompts and targets into sequences).

Both give the same columns: prompts in input_ids / expl_input_ids, targets in labels / rationale_labels (VIEWS).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded where used: predict.py reads the prefixes before any library loads
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

PREDICT_PREFIX = "predict: "
EXPLAIN_PREFIX = "explain: "
# Labels and rationales are cut at 256 tokens, EOS included, as in the paper's code.
MAX_TARGET_LENGTH = 256
# The two views: (batch key, prompt column, target column); standard mode has the first only.
VIEWS = (("pred", "input_ids", "labels"), ("expl", "expl_input_ids", "rationale_labels"))
# Between a decoder-only student's prompt and its target (label or rationale): `predict: <input>\n<label><eos>`.
SEPARATOR = "\n"
PROMPT_MARK = "\x00dss-input\x00"  # stands for the input text while a chat template is rendered

Encode = Callable[[list[str]], list[list[int]]]


def original_t5_pretokenization(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of a T5 tokenizer that gives the token ids the paper's T5 tokenizer gave; any other tokenizer as is.

    transformers 5 builds T5's tokenizer with a whitespace split before SentencePiece's Metaspace, which drops a
    whitespace-only piece ('▁', id 3) that the tokenizer of the paper's day (transformers 4.x, tokenizers 0.13) kept
    where a text, or the text before a literal </s>, ends in whitespace: anli inputs whose hypothesis ends in a space,
    blank targets (' '). That tokenizer collapsed runs of spaces and split at '▁' alone; the copy does the same.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import T5Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(tokenizer, T5Tokenizer) or backend is None or backend.pre_tokenizer is None:
        return tokenizer
    steps = [step["type"] for step in json.loads(backend.pre_tokenizer.__getstate__()).get("pretokenizers", [])]
    if steps != ["WhitespaceSplit", "Metaspace"]:
        return tokenizer
    original = copy.deepcopy(tokenizer)
    backend = original.backend_tokenizer
    collapse_spaces = normalizers.Replace(Regex(" {2,}"), " ")
    backend.normalizer = normalizers.Sequence([n for n in (backend.normalizer, collapse_spaces) if n is not None])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return original


def tokenize_views(
    splits: DatasetDict, model_type: str, prompts: Encode, targets: Encode,
    explain_prompts: Callable[[list[str], list[list[int]]], list[list[int]]] | None = None,
) -> DatasetDict:
    """Token ids for the views of model_type, computed once: prompts(prefixed inputs) and targets(labels or
    rationales) give each row's ids; the text columns input/label stay for the prediction records.
    explain_prompts(inputs, predict prompts' ids), where given, makes the explain prompts' ids from the predict
    prompts' (see explain_from_predict)."""
    from datasets import DatasetDict

    label_prefix = PREDICT_PREFIX if model_type == "task_prefix" else ""

    def encode(batch: dict) -> dict:
        encoded = {
            "input_ids": prompts([label_prefix + text for text in batch["input"]]),
            "labels": targets(batch["label"]),
        }
        if model_type == "task_prefix":
            encoded["expl_input_ids"] = (
                prompts([EXPLAIN_PREFIX + text for text in batch["input"]]) if explain_prompts is None
                else explain_prompts(batch["input"], encoded["input_ids"])
            )
            encoded["rationale_labels"] = targets(batch["rationale"])
        return encoded

    tokenized = DatasetDict()
    for name, split in splits.items():
        drop = [c for c in split.column_names if c not in ("input", "label")]
        tokenized[name] = split.map(encode, batched=True, remove_columns=drop, desc=f"tokenizing {name}")
    return tokenized


def tokenize_seq2seq(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, model_type: str, max_input_length: int,
    chat_template: bool = False,
) -> DatasetDict:
    """Seq2seq students' views, as the paper's code tokenised them (T5's ids as its tokenizer gave them). Their
    prompts are plain text: chat_template is for decoder-only students (run.py refuses it for these)."""
    tokenizer = original_t5_pretokenization(tokenizer)
    prompts = truncating_encoder(tokenizer, max_input_length)
    return tokenize_views(
        splits, model_type, prompts=prompts, targets=truncating_encoder(tokenizer, MAX_TARGET_LENGTH, target=True),
        explain_prompts=explain_from_predict(tokenizer, prompts),
    )


def explain_from_predict(
    tokenizer: PreTrainedTokenizerBase, prompts: Encode
) -> Callable[[list[str], list[list[int]]], list[list[int]]] | None:
    """The explain prompts' ids made from the predict prompts' ids, for a tokenizer that cuts its text into pieces at
    whitespace before its model sees them (SentencePiece's Metaspace with split, T5's as the paper tokenised): both
    prefixes end in ': ', so the input after them becomes the same ids, cut at the same length where the prefixes
    have as many ids; only the prefix's ids differ. This halves the work of tokenising prompts. A row whose predict
    ids do not begin with the predict prefix's is tokenised in full. None (tokenise both) for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = json.loads(backend.pre_tokenizer.__getstate__()) if backend and backend.pre_tokenizer else {}
    if pre_tokenizer.get("type") != "Metaspace" or not pre_tokenizer.get("split"):
        return None
    predict, explain = prompts([PREDICT_PREFIX + "a", EXPLAIN_PREFIX + "a"])
    tail = next(n for n in range(min(len(predict), len(explain)), -1, -1) if predict[len(predict) - n:] ==
                explain[len(explain) - n:])
    predict_head, explain_head = predict[: len(predict) - tail], explain[: len(explain) - tail]
    if len(predict_head) != len(explain_head):
        return None

    def explain_prompts(inputs: list[str], predict_ids: list[list[int]]) -> list[list[int]]:
        ids = [explain_head + row[len(predict_head):] if row[: len(predict_head)] == predict_head else None
               for row in predict_ids]
        unmatched = [i for i, row in enumerate(ids) if row is None]
        for i, row in zip(unmatched, prompts([EXPLAIN_PREFIX + inputs[i] for i in unmatched]) if unmatched else []):
            ids[i] = row
        return ids

    return explain_prompts


def truncating_encoder(tokenizer: PreTrainedTokenizerBase, max_length: int, target: bool = False) -> Encode:
    """texts -> token ids, as `tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]` gives them
    (`text_target=texts` with target). A fast tokenizer without input and target modes (T5's) is called on its Rust
    backend directly, set up as transformers sets it for that call: the same ids, without the per-row
    dictionaries of token type ids, attention masks and offsets that the call builds and tokenising throws away."""
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    backend = getattr(tokenizer, "backend_tokenizer", None)
    has_modes = any(hasattr(tokenizer, name) for name in ("_switch_to_input_mode", "_switch_to_target_mode"))
    if backend is None or not hasattr(tokenizer, "set_truncation_and_padding") or has_modes:
        key = "text_target" if target else "text"
        return lambda texts: tokenizer(**{key: texts}, max_length=max_length, truncation=True)["input_ids"]

    def encode(texts: list[str]) -> list[list[int]]:
        tokenizer.set_truncation_and_padding(PaddingStrategy.DO_NOT_PAD, TruncationStrategy.LONGEST_FIRST, max_length,
                                             stride=0, pad_to_multiple_of=None, padding_side=None)
        backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=True)]

    return encode


def prompt_frame(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after a decoder-only prompt's text: the tokenizer's BOS (if it adds one) and SEPARATOR,
    or, with chat_template, the chat template's user turn around the text and its generation prompt."""
    if chat_template:
        if not tokenizer.chat_template:
            raise ValueError("--chat_template: the student's tokenizer has no chat template (use an instruct model or "
                             "drop --chat_template)")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT_MARK}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(PROMPT_MARK)
        return tuple(tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, tail))
    bos = [t for t in tokenizer("")["input_ids"] if t == tokenizer.bos_token_id]
    return bos, tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]


def causal_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_input_length: int, chat_template: bool
) -> list[list[int]]:
    """Decoder-only prompt token ids; the text is truncated so that the whole prompt fits max_input_length."""
    head, tail = prompt_frame(tokenizer, chat_template)
    room = max(1, max_input_length - len(head) - len(tail))
    body = tokenizer(texts, add_special_tokens=False, max_length=room, truncation=True)["input_ids"]
    return [head + ids + tail for ids in body]


def causal_targets(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Decoder-only target token ids, ending in EOS (where generation stops)."""
    ids = tokenizer(texts, add_special_tokens=False, max_length=MAX_TARGET_LENGTH - 1, truncation=True)["input_ids"]
    return [t + [tokenizer.eos_token_id] for t in ids]


def tokenize_causal(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, model_type: str, max_input_length: int,
    chat_template: bool = False,
) -> DatasetDict:
    """Decoder-only students' views: prompts framed by BOS and SEPARATOR (or the chat template's user turn), targets
    ending in EOS."""
    return tokenize_views(
        splits, model_type,
        prompts=lambda texts: causal_prompts(tokenizer, texts, max_input_length, chat_template),
        targets=lambda texts: causal_targets(tokenizer, texts),
    )
