"""Student families: what differs between seq2seq students (T5, Flan-T5, mT5, BART) and decoder-only ones (GPT-2,
Llama, Qwen2, SmolLM, Gemma), kept as data in one small spec per family: how their views become token ids
(views.py), how they are batched and which fast loss computes on them (model_utils.py, fast_loss.py). The method
itself (two views, the alpha-weighted loss, the trainer) is model_utils'.
"""

import hashlib
import inspect
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from cli import first_line
from config import LoraConfig, StudentConfig
from fast_loss import causal_fast_loss_applies, causal_grouped_loss, grouped_loss, seq2seq_fast_loss_applies
from model_utils import causal_collator, length_mask, pad, seq2seq_collator, unwrap_peft
from recovery import RunError, check_tokenizer
from views import SEPARATOR, causal_prompts, tokenize_causal, tokenize_seq2seq

# Plain greedy decoding (the trainer sets num_beams=1, do_sample=False) whatever a student's generation_config adds
# (BART checkpoints ship n-gram blocking and a minimum length); for T5 these are its defaults, so nothing changes.
GREEDY = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0}
# How the class names of text-generating heads end (T5ForConditionalGeneration, LlamaForCausalLM, GPT2LMHeadModel, and
# the older T5WithLMHeadModel). A model saved with another head (BertForMaskedLM, T5EncoderModel) would be trained
# through a generative head it never had; one saved as its bare base model (facebook/bart-base's BartModel) is taken
# where its family's generative head needs no weights it lacks (a head tied to the embeddings).
GENERATIVE_HEADS = ("ForConditionalGeneration", "ForCausalLM", "LMHeadModel")
SUPPORTED_STUDENTS = ("seq2seq LMs (T5, BART, ...: *ForConditionalGeneration) or decoder-only causal LMs "
                      "(GPT-2, Llama, Qwen2, ...: *ForCausalLM, *LMHeadModel)")

# LoRA's default target modules: the attention and MLP projections of each architecture; others get peft's
# "all-linear" (every linear layer but the output head).
LORA_TARGETS = {
    **dict.fromkeys(("t5", "mt5", "umt5"), ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]),
    **dict.fromkeys(("bart", "mbart"), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(
        ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2", "granite"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


@dataclass(frozen=True, repr=False)
class StudentFamily:
    """What differs between model families; everything else is shared."""

    name: str
    auto_class: type  # the Auto class that loads it
    model_types: frozenset[str]  # the config model_types auto_class has a generative head for
    peft_task_type: str
    # generate() returns the prompt before the continuation, which evaluation strips.
    prompt_in_output: bool
    # (splits, tokenizer, model_type, max_input_length, chat_template) -> both views' token ids (views.py)
    tokenize: Callable[..., DatasetDict]
    # (tokenizer, model_type) -> the batches' collator (model_utils)
    make_collator: Callable[[PreTrainedTokenizerBase, str], Callable]
    # The fast implementation of the trainer's loss (TaskPrefixTrainer.weighted_view_loss; fast_loss.py), and the
    # models it applies to.
    fast_loss: Callable
    fast_loss_applies: Callable[[PreTrainedModel], bool]
    generation: dict  # generate() settings at evaluation, over the student's generation_config
    # What joins an input's parts (e-SNLI/ANLI: premise and hypothesis): T5's </s>, as the paper's code does; for
    # decoder-only students a newline, since their EOS inside a prompt would read as the end of the text (or turn).
    segment_joiner: Callable[[PreTrainedTokenizerBase], str]

    def __repr__(self) -> str:
        """The same in every process (the tokenisation cache hashes it): the name and its tokenising code's source."""
        code = inspect.getsource(inspect.getmodule(self.tokenize))
        return f"StudentFamily({self.name!r}, {hashlib.blake2b(code.encode(), digest_size=8).hexdigest()})"


FAMILIES = {
    "seq2seq": StudentFamily(
        name="seq2seq", auto_class=AutoModelForSeq2SeqLM,
        model_types=frozenset(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES), peft_task_type="SEQ_2_SEQ_LM",
        prompt_in_output=False, tokenize=tokenize_seq2seq, make_collator=seq2seq_collator,
        fast_loss=grouped_loss, fast_loss_applies=seq2seq_fast_loss_applies, generation=GREEDY,
        segment_joiner=lambda tokenizer: tokenizer.eos_token,
    ),
    "causal": StudentFamily(
        name="causal", auto_class=AutoModelForCausalLM, model_types=frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        peft_task_type="CAUSAL_LM", prompt_in_output=True,
        tokenize=tokenize_causal, make_collator=causal_collator,
        fast_loss=causal_grouped_loss, fast_loss_applies=causal_fast_loss_applies, generation=GREEDY,
        segment_joiner=lambda tokenizer: SEPARATOR,
    ),
}


def family_of(config) -> StudentFamily:
    """From the model's config: encoder-decoder models are seq2seq, the rest decoder-only."""
    return FAMILIES["seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"]


class UnsupportedStudent(ValueError):
    """A model folder or hub id whose model does not generate text, so no family can train it."""


def saved_heads(config) -> list[str]:
    """The classes the model was saved as (config.architectures), if the config names them."""
    return getattr(config, "architectures", None) or []


def unsupported(config, source: str, why: str) -> UnsupportedStudent:
    saved_as = "/".join(saved_heads(config)) or "model"
    return UnsupportedStudent(f"{source} holds a {saved_as} ({config.model_type}), {why}; students are "
                              f"{SUPPORTED_STUDENTS}")


def supported_family(config, source: str) -> StudentFamily:
    """The family that trains this config's model; UnsupportedStudent, naming source and what it holds, where the
    model is not a text-generating LM of a family: its saved head must be one too, or its bare base model (which
    load_pretrained accepts only where no head weights are missing)."""
    family = family_of(config)
    base = MODEL_MAPPING_NAMES.get(config.model_type)
    heads_generate = all(head.endswith(GENERATIVE_HEADS) or head == base for head in saved_heads(config))
    if config.model_type not in family.model_types or not heads_generate:
        raise unsupported(config, source, "which does not generate text")
    return family


def is_peft(model) -> bool:
    return unwrap_peft(model) is not model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model) -> None:
    """Decoder-only tokenizers often have no pad token (GPT-2, Llama): pad with EOS, which the collator masks by
    length. Generation stops at the EOS the targets end with, and pads with the tokenizer's pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = model.generation_config
    stops = generation.eos_token_id
    stops = list(stops) if isinstance(stops, (list, tuple)) else [] if stops is None else [stops]
    if tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def add_lora(model, lora: LoraConfig, seed: int):
    """Wrap the student in peft LoRA adapters of lora's rank, scaling, dropout and target modules."""
    import peft

    family = family_of(model.config)
    # LoRA's A matrices are drawn from torch's generator before the Trainer seeds it: seed by --run, so runs repeat.
    torch.manual_seed(seed)
    targets = list(lora.targets) if lora.targets else LORA_TARGETS.get(model.config.model_type, "all-linear")
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        task_type=family.peft_task_type,
    )
    return peft.get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def load_pretrained(path: str, dtype=torch.float32, source: dict | None = None, **placement):
    """(family, tokenizer, model) of any Hugging Face seq2seq or causal LM, the family read from its config.
    `source` holds hub options for all three loads (local_files_only when the hub is unreachable, hub_options)."""
    from transformers import AutoConfig, AutoTokenizer

    source = source or {}
    config = AutoConfig.from_pretrained(path, **source)
    family = supported_family(config, path)
    tokenizer = AutoTokenizer.from_pretrained(path, **source)
    model, loading = family.auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **placement,
                                                       **source)
    missing = sorted(loading["missing_keys"])
    if missing and not all(head.endswith(GENERATIVE_HEADS) for head in saved_heads(config)):
        raise unsupported(config, path, f"without the weights of a text-generating head ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''} would start at random)")
    prepare_tokenizer(tokenizer, model)
    return family, tokenizer, model


HUB_REMEDIES = ("pass --from_pretrained a local directory holding a saved model and tokenizer, set HF_HUB_OFFLINE=1 "
                "with the model in the Hugging Face cache (HF_HOME), or set HF_ENDPOINT to a reachable mirror")
# transformers 5 ties every T5's head to its embeddings and warns when a checkpoint (t5-v1_1, and every student
# saved from one) has its own head, which it then keeps as saved; the Trainer, reloading the best checkpoint, warns
# that the embeddings tied to `shared` are not in it (they are saved once, as `shared`). Both are what these models
# are, on every run, and a user cannot act on them.
UNTIED_HEAD_NOTICE = "to tie shared.weight to lm_head.weight, but both are present in the checkpoints with different"
MISSING_KEYS_NOTICE = re.compile(r"There were missing keys in the checkpoint model loaded: \[([^\]]*)\]")
T5_TIED_KEYS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}


def without_tied_weight_notices(record) -> bool:
    message = record.getMessage()
    missing = MISSING_KEYS_NOTICE.search(message)
    if missing:
        return not set(re.findall(r"'([^']+)'", missing.group(1))) <= T5_TIED_KEYS
    return UNTIED_HEAD_NOTICE not in message


def quiet_tied_weight_notices() -> None:
    """Drop transformers' warnings about a T5 checkpoint's tied and untied weights: harmless, and not actionable."""
    from transformers.utils import logging

    for name in ("transformers.modeling_utils", "transformers.trainer"):
        logging.get_logger(name).addFilter(without_tied_weight_notices)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint (HF_ENDPOINT) gives no answer, or None when it answers: one request and no retries,
    bounded in time even where name resolution hangs, instead of transformers' minute of retries per file."""
    from huggingface_hub import constants, get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP status is an answer
            outcome.append(None)
        except Exception as e:  # whatever the HTTP stack raises, there was no answer
            outcome.append(first_line(e))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_options(name: str) -> dict:
    """from_pretrained options for a hub id: none while the hub answers; local_files_only where it does not but the
    model is cached; where neither, a RunError naming the remedies."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).is_dir() or constants.is_offline_mode():
        return {}
    reason = hub_unreachable()
    if reason is None:
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        print(f"the hub ({constants.ENDPOINT}) cannot be reached: using the cached copy of {name}", file=sys.stderr)
        return {"local_files_only": True}
    raise RunError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) to fetch {name!r}, "
                   f"and it is not in the local cache: {HUB_REMEDIES}")


def load_student(student: StudentConfig, seed: int):
    """(family, tokenizer, model) of the student: seq2seq or causal LM, from a local directory or the hub, wrapped in
    LoRA adapters where student.lora is enabled (initialised from seed) and spread over GPUs with parallelize; a
    RunError, naming the flag, where it cannot be loaded or does not fit the options."""
    name = student.from_pretrained
    placement = {"device_map": "auto"} if student.parallelize else {}
    source = hub_options(name)
    quiet_tied_weight_notices()
    try:
        family, tokenizer, model = load_pretrained(name, source=source, **placement)
    except UnsupportedStudent as e:
        raise RunError(f"--from_pretrained {e}") from None
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, or the weight loaders' own errors for truncated files
        raise RunError(f"could not load --from_pretrained {name!r} ({first_line(e)}); pass a local directory holding "
                       "a saved seq2seq or causal LM and its tokenizer, or a reachable hub id") from None
    check_tokenizer(tokenizer, f"--from_pretrained {name}")
    if student.chat_template and not family.prompt_in_output:
        raise RunError(f"--chat_template is for decoder-only students; {name} is {family.name}: drop --chat_template")
    if student.chat_template and not tokenizer.chat_template:
        raise RunError(f"--chat_template: the tokenizer of {name} has no chat template; use an instruct model or "
                       "drop --chat_template")
    if student.lora.enabled:
        try:
            model = add_lora(model, student.lora, seed)
        except ValueError as e:  # peft: target modules not found in the model
            raise RunError(f"--lora_targets: {first_line(e)}; name modules of "
                           f"{model.config.model_type} (see print(model)) or leave --lora_targets out") from None
    return family, tokenizer, model


def save_best(trainer, directory: Path) -> None:
    """The selected model: save_pretrained + tokenizer, in files that transformers 4.x loads as the same model
    (portable.make_portable). A LoRA student saves its adapter in best/adapter and the merged model in best/ itself,
    which plain from_pretrained loads."""
    from portable import make_portable

    if not is_peft(trainer.model):
        trainer.save_model(str(directory))
        if trainer.is_world_process_zero():
            make_portable(directory, trainer.processing_class)
        return
    trainer.save_model(str(directory / "adapter"))
    if trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(directory))
        trainer.processing_class.save_pretrained(str(directory))
        for folder in (directory, directory / "adapter"):
            make_portable(folder, trainer.processing_class)


def causal_generate(
    tokenizer: PreTrainedTokenizerBase, model, texts: list[str], max_input_length: int, max_new_tokens: int,
    chat_template: bool = False,
) -> list[str]:
    """A decoder-only student's greedy continuations of prompts built as in training (left-padded), decoded as
    evaluation records them."""
    prompts = causal_prompts(tokenizer, texts, max_input_length, chat_template)
    input_ids = pad(prompts, tokenizer.pad_token_id, left=True).to(model.device)
    with torch.inference_mode():
        tokens = model.generate(
            input_ids=input_ids, attention_mask=length_mask(prompts, left=True).to(model.device),
            max_new_tokens=max_new_tokens, num_beams=1, do_sample=False, **FAMILIES["causal"].generation,
        )
    continuations = tokens[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(continuations, skip_special_tokens=True)


def load_saved(directory: str | Path):
    """(family, tokenizer, model) of a saved student: a full model folder (a run's best/), or a LoRA adapter folder
    (best/adapter, a LoRA checkpoint) on top of the base model its adapter_config.json names."""
    import json

    adapter_config = Path(directory) / "adapter_config.json"
    if not adapter_config.is_file():
        return load_pretrained(str(directory))
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    family, _, model = load_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    prepare_tokenizer(tokenizer, model)
    return family, tokenizer, PeftModel.from_pretrained(model, str(directory))


def student_record(model) -> dict:
    """For results.json: the student's architecture, family, parameter counts and LoRA settings (None: full)."""
    trainable, total = parameter_counts(model)
    lora = None
    if is_peft(model):
        config = next(iter(model.peft_config.values()))
        lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "targets": sorted(config.target_modules) if isinstance(config.target_modules, set)
                else config.target_modules}
    return {"model_type": model.config.model_type, "family": family_of(model.config).name,
            "trainable_parameters": trainable, "total_parameters": total, "lora": lora}
