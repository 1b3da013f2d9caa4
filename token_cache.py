"""Tokenise once: the tokenised splits of a run, kept on disk and reused by reruns, resumes and sweep runs.

An entry's key hashes everything its token ids depend on: the prepared splits' contents (so data files, teacher
outputs, parsers, subsampling and label choices are all covered without listing them), the tokenizer's own
serialisation, the tokenising function's module source (an edit to the code re-tokenises), its other arguments,
and the versions of the libraries that tokenise. A changed input is a new entry; nothing is ever overwritten.
Entries are datasets' save_to_disk folders, written under a temporary name and renamed into place, so a run that
dies while writing leaves no half entry. Deleting the folder is always safe.
"""

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import tokenizers
import transformers
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

# Bump when the entry format changes.
CACHE_VERSION = 1
CACHE_VARIABLE = "DSS_CACHE"


def default_cache_dir() -> Path:
    """$DSS_CACHE, else $XDG_CACHE_HOME/dss, else ~/.cache/dss."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dss"


def hash_split(split: Dataset, digest) -> None:
    """Feed a split's schema and every value into digest (Arrow buffers, so a 10k-row split takes milliseconds)."""
    table = split.data.table
    if split._indices is not None:  # a select()ed split: its rows, in order
        table = table.take(split._indices.column(0))
    digest.update(repr((split.num_rows, table.schema.to_string())).encode())
    for column in table.columns:
        for chunk in column.chunks:
            digest.update(repr((chunk.offset, len(chunk))).encode())
            for buffer in chunk.buffers():
                digest.update(b"-" if buffer is None else memoryview(buffer))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer as it tokenises: its full serialisation where it is a fast one, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        vocabulary = repr(sorted(tokenizer.get_vocab().items()))
    else:  # less the truncation and padding state, which every call with max_length sets anew
        vocabulary = json.dumps({**json.loads(backend.to_str()), "truncation": None, "padding": None})
    return repr((type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.padding_side,
                 tokenizer.truncation_side, vocabulary))


def cache_key(tokenize_fn: Callable, splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, *args, **kwargs) -> str:
    digest = hashlib.blake2b(digest_size=16)
    versions = (CACHE_VERSION, sys.version_info[:2], datasets.__version__, transformers.__version__,
                tokenizers.__version__)
    digest.update(repr(versions).encode())
    digest.update(inspect.getsource(inspect.getmodule(tokenize_fn)).encode())
    digest.update(repr((tokenize_fn.__qualname__, args, sorted(kwargs.items()))).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for name in sorted(splits):
        digest.update(name.encode())
        hash_split(splits[name], digest)
    return digest.hexdigest()


def cached_tokenize(
    cache_dir: Path | None,
    tokenize_fn: Callable[..., DatasetDict],
    splits: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    *args,
    write: bool = True,
    **kwargs,
) -> DatasetDict:
    """tokenize_fn(splits, tokenizer, *args, **kwargs), read from cache_dir where an entry has the same key.

    cache_dir None tokenises without the cache; write=False (processes other than rank 0) only reads it. A cache
    that cannot be written costs a warning, never the run.
    """
    if cache_dir is None:
        return tokenize_fn(splits, tokenizer, *args, **kwargs)
    entry = Path(cache_dir) / "tokenized" / cache_key(tokenize_fn, splits, tokenizer, *args, **kwargs)
    if (entry / "dataset_dict.json").is_file():
        print(f"tokenised splits read from the cache {entry}", file=sys.stderr)
        return DatasetDict.load_from_disk(str(entry))
    tokenized = tokenize_fn(splits, tokenizer, *args, **kwargs)
    if write:
        try:
            save_entry(tokenized, entry)
        except OSError as e:
            print(f"warning: could not cache the tokenised splits in {entry.parent} ({e}); "
                  "pass --cache_dir to a writable folder, or --no_cache", file=sys.stderr)
    return tokenized


def save_entry(tokenized: DatasetDict, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        tokenized.save_to_disk(str(partial))
        os.rename(partial, entry)
    except OSError:
        if not (entry / "dataset_dict.json").is_file():  # a concurrent run that wrote the same entry is no failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
