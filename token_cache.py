"""Tokenise once: the tokenised splits of a run, kept on disk and reused by reruns, resumes and sweep runs.

An entry's key hashes everything its token ids depend on: the prepared splits' contents (so data files, teacher
outputs, parsers, subsampling and label choices are all covered without listing them), the tokenizer's own
serialisation, the tokenising function's module source (an edit to the code re-tokenises), its other arguments,
and the versions of the libraries that tokenise. A changed input is a new entry; nothing is ever overwritten.
Entries are datasets' save_to_disk folders, written under a temporary name and renamed into place, so a run that
dies while writing leaves no half entry; the temporary folders of writers that died (SIGKILL) are removed by the next
writer. Each entry lists its files' sizes and checksums, so one damaged afterwards (a truncated .arrow) is noticed
when read, discarded and written anew. Deleting the folder is always safe.
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import tokenizers
import transformers
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from cli import first_line

# Bump when the entry format changes.
CACHE_VERSION = 2
CACHE_VARIABLE = "DSS_CACHE"
# In each entry: {file: [size, checksum]} for every other file of it, written last.
MANIFEST = "dss_entry.json"
# A writer's temporary folder beside the entries: .<key>.<pid>@<host>.<random>, so that one whose writer died can be
# told from one still being written.
TEMPORARY = re.compile(r"\.[0-9a-f]+\.(?P<pid>\d+)@(?P<host>.+)\.[^.]+")


def default_cache_dir() -> Path:
    """$DSS_CACHE, else $XDG_CACHE_HOME/dss, else ~/.cache/dss."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dss"


def hash_split(split: Dataset, digest) -> None:
    """Feed a split's schema and every value into digest (its Arrow buffers, not row by row, so hashing stays quick)."""
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
    if entry.is_dir():
        problem = entry_problem(entry)
        if problem is None:
            try:
                tokenized = DatasetDict.load_from_disk(str(entry))
            except Exception as e:  # noqa: BLE001 - pyarrow's, datasets' and json's errors for a damaged folder
                problem = first_line(e)
            else:
                print(f"tokenised splits read from the cache {entry}", file=sys.stderr)
                return tokenized
        print(f"note: the cached tokenised splits in {entry} are damaged ({problem}): "
              f"{'discarding them and ' if write else ''}tokenising afresh", file=sys.stderr)
        if write:
            discard(entry)
    tokenized = tokenize_fn(splits, tokenizer, *args, **kwargs)
    if write:
        try:
            remove_stale_temporaries(entry.parent)
            save_entry(tokenized, entry)
        except OSError as e:
            print(f"warning: could not cache the tokenised splits in {entry.parent} ({e}); "
                  "pass --cache_dir to a writable folder, or --no_cache", file=sys.stderr)
    return tokenized


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_files(folder: Path) -> dict[str, list]:
    """[size, checksum] of every file of an entry folder but its manifest, by path within the folder."""
    return {path.relative_to(folder).as_posix(): [path.stat().st_size, file_digest(path)]
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def entry_problem(entry: Path) -> str | None:
    """What is wrong with an entry's files against its manifest (missing, truncated, altered), or None."""
    try:
        written = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} is missing or unreadable"
    found = entry_files(entry)
    for name, (size, digest) in written.items():
        if name not in found:
            return f"{name} is missing"
        if found[name][0] != size:
            return f"{name} has {found[name][0]} bytes, written with {size}"
        if found[name][1] != digest:
            return f"{name} differs from what was written (checksum)"
    return None


def temporary_prefix(entry: Path) -> str:
    return f".{entry.name}.{os.getpid()}@{socket.gethostname()}."


def writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary folders whose writer, a process of this host, is gone (killed while writing). Those of
    live writers, and of other hosts (whose processes cannot be looked up from here), stay."""
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for path in folder.iterdir():
        found = TEMPORARY.fullmatch(path.name)
        if found and found["host"] == host and not writer_alive(int(found["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def discard(entry: Path) -> None:
    """Remove a damaged entry: renamed aside first, so no reader finds it half removed."""
    aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(entry), dir=entry.parent))
    try:
        os.replace(entry, aside)
    except OSError:
        pass  # already discarded by another run
    shutil.rmtree(aside, ignore_errors=True)


def save_entry(tokenized: DatasetDict, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=temporary_prefix(entry), dir=entry.parent))
    try:
        tokenized.save_to_disk(str(partial))
        (partial / MANIFEST).write_text(json.dumps(entry_files(partial)))
        os.rename(partial, entry)
    except OSError:
        if not (entry / "dataset_dict.json").is_file():  # a concurrent run that wrote the same entry is no failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
