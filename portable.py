"""A saved student's folder that transformers 4.x (from 4.30.2, the paper's version) and 5 load as the same model.

transformers 5 writes a few things its 4.x releases read otherwise:

- config.json: T5's `tie_word_embeddings` is always true (the head's scaling moved to `scale_decoder_outputs`), so a
  T5 v1.1 / Flan-T5 student, whose head is its own, would have its head tied to the embeddings by 4.x, its trained
  head weights dropped. The folder states the head's tying as 4.x reads it, which transformers 5 reads the same way.
- tokenizer.json: the current serialisation (BPE merges as pairs, Metaspace's `prepend_scheme`), which older tokenizers
  releases (0.13.3, the paper's, among them) cannot parse. Where the tokenizer can be said in the older form, the file is
  written in it, which the current tokenizers still reads as the same tokenizer. A T5 student's file is the
  tokenisation training used (views.original_t5_pretokenization), and its SentencePiece model is kept beside
  it as spiece.model, as T5 checkpoints ship it.
- tokenizer_config.json: the generic fast tokenizer's class name and the list of extra special tokens under their
  4.x names.
"""

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from recovery import write_json_atomic

# transformers 5's class names that 4.x spells otherwise (both read the 4.x name).
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Metaspace (prepend_scheme, split) as the older tokenizers says it: add_prefix_space, always splitting.
LEGACY_METASPACE = {("always", True): True, ("never", True): False}


class NotSayable(Exception):
    """A tokenizer setting that the older tokenizer.json format has no way to express."""


def legacy_metaspace(component: dict) -> dict:
    key = (component.get("prepend_scheme"), component.get("split"))
    if key not in LEGACY_METASPACE:
        raise NotSayable(f"Metaspace {key}")
    rest = {name: value for name, value in component.items() if name not in ("prepend_scheme", "split")}
    return rest | {"add_prefix_space": LEGACY_METASPACE[key]}


def legacy_bpe(component: dict) -> dict:
    if component.get("ignore_merges"):
        raise NotSayable("BPE ignore_merges")
    merges = component["merges"]
    if any(isinstance(pair, list) and any(" " in part for part in pair) for pair in merges):
        raise NotSayable("BPE merge of a token holding a space")
    rest = {name: value for name, value in component.items() if name != "ignore_merges"}
    return rest | {"merges": [" ".join(pair) if isinstance(pair, list) else pair for pair in merges]}


def legacy_unigram(component: dict) -> dict:
    if component.get("byte_fallback"):
        raise NotSayable("Unigram byte_fallback")
    return {name: value for name, value in component.items() if name != "byte_fallback"}


LEGACY_COMPONENTS = {"Metaspace": legacy_metaspace, "BPE": legacy_bpe, "Unigram": legacy_unigram}


def legacy_form(node):
    """The tokenizer.json tree with each component the older format spells differently rewritten in its form."""
    if isinstance(node, list):
        return [legacy_form(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {name: legacy_form(value) for name, value in node.items()}
    convert = LEGACY_COMPONENTS.get(node.get("type"))
    return convert(node) if convert else node


def legacy_tokenizer_json(backend: Tokenizer) -> dict | None:
    """backend's tokenizer.json in the older format, or None where it cannot be said there or where the current
    tokenizers would not read it back as the same tokenizer."""
    current = json.loads(backend.to_str())
    try:
        legacy = legacy_form(current)
    except NotSayable:
        return None
    return legacy if json.loads(Tokenizer.from_str(json.dumps(legacy)).to_str()) == current else None


def portable_config(config: dict) -> dict:
    """config.json with T5's tie_word_embeddings as 4.x reads it: there it both ties the head and scales the decoder's
    output, which transformers 5 keeps in scale_decoder_outputs and derives from tie_word_embeddings when loading.
    Other architectures' tie_word_embeddings already means the same to both."""
    if "scale_decoder_outputs" in config:
        return config | {"tie_word_embeddings": bool(config["scale_decoder_outputs"])}
    return config


def portable_tokenizer_config(config: dict) -> dict:
    config = dict(config)
    if config.get("tokenizer_class") in LEGACY_TOKENIZER_CLASSES:
        config["tokenizer_class"] = LEGACY_TOKENIZER_CLASSES[config["tokenizer_class"]]
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    return config


def rewrite_json(path: Path, change) -> None:
    if path.is_file():
        write_json_atomic(path, change(json.loads(path.read_text(encoding="utf-8"))))


def make_portable(directory: Path, tokenizer) -> None:
    """Rewrite a save_pretrained folder (a model and its tokenizer, or a tokenizer alone) so that transformers 4.x
    loads it as 5 does."""
    from views import original_t5_pretokenization

    directory = Path(directory)
    rewrite_json(directory / "config.json", portable_config)
    rewrite_json(directory / "tokenizer_config.json", portable_tokenizer_config)
    backend = getattr(original_t5_pretokenization(tokenizer), "backend_tokenizer", None)
    legacy = legacy_tokenizer_json(backend) if backend is not None else None
    if legacy is not None and (directory / "tokenizer.json").is_file():
        write_json_atomic(directory / "tokenizer.json", legacy)
    for attribute, name in getattr(tokenizer, "vocab_files_names", {}).items():
        source = getattr(tokenizer, attribute, None)
        if isinstance(source, str) and Path(source).is_file() and not (directory / name).exists():
            tmp = directory / (name + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, directory / name)
