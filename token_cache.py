"""Read and tokenise once: a run's loaded and tokenised splits, kept on disk and reused by reruns, resumes and sweeps.

Two kinds of entry. `splits/`: one split as data_utils.load_split builds it from the data and teacher-output files
(before subsampling, so every seed and fraction shares it), keyed by those files' contents, the loader's module
source and its arguments. `tokenized/`: a run's tokenised splits, keyed by everything their token ids depend on: the
prepared splits' contents (so subsampling and label choices are covered without listing them), the tokenizer's own
serialisation, the tokenising function's module source (an edit to the code re-tokenises), its other arguments, and
the versions of the libraries that tokenise. A changed input is a new entry; nothing is ever overwritten. Either
kind is read back, also right after it is written, so a first run and a rerun hold the same tables.
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
CACHE_VERSION = 3
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


def versions_digest():
    """A digest fed with what every key depends on: the entry format and the versions of the libraries that build it."""
    digest = hashlib.blake2b(digest_size=16)
    versions = (CACHE_VERSION, sys.version_info[:2], datasets.__version__, transformers.__version__,
                tokenizers.__version__)
    digest.update(repr(versions).encode())
    return digest


def cache_key(tokenize_fn: Callable, splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, *args, **kwargs) -> str:
    digest = versions_digest()
    digest.update(inspect.getsource(inspect.getmodule(tokenize_fn)).encode())
    digest.update(repr((tokenize_fn.__qualname__, args, sorted(kwargs.items()))).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for name in sorted(splits):
        digest.update(name.encode())
        hash_split(splits[name], digest)
    return digest.hexdigest()


def files_key(load_fn: Callable, files: list[Path], settings: tuple) -> str:
    """The key of what load_fn builds from `files` under `settings`: the files' contents in order (not their names
    or folder, so a moved data folder still hits), load_fn's module source and name, and the settings."""
    digest = versions_digest()
    digest.update(inspect.getsource(inspect.getmodule(load_fn)).encode())
    digest.update(repr((load_fn.__qualname__, settings, len(files))).encode())
    for path in files:
        digest.update(file_digest(path).encode())
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
    return cached(entry, lambda: tokenize_fn(splits, tokenizer, *args, **kwargs), write, "tokenised splits",
                  "tokenising afresh")


def cached_load(cache_dir: Path | None, load_fn: Callable[[], Dataset], files: list[Path], settings: tuple,
                write: bool = True, what: str = "rows") -> Dataset:
    """load_fn(), which reads exactly `files` and depends on nothing else but `settings` and its module's code, from
    cache_dir where an entry has the same files_key."""
    if cache_dir is None:
        return load_fn()
    entry = Path(cache_dir) / "splits" / files_key(load_fn, files, settings)
    # In memory: subsampling a memory-mapped split would write its index files into the entry.
    return cached(entry, load_fn, write, what, "reading the files afresh", keep_in_memory=True)


def cached(entry: Path, build: Callable[[], Dataset | DatasetDict], write: bool, what: str, afresh: str,
           keep_in_memory: bool = False) -> Dataset | DatasetDict:
    """The Dataset or DatasetDict in the entry folder, else build()'s, written there (when `write`) and read back
    (memory-mapped unless keep_in_memory). `what` names the entry and `afresh` what building does, in messages."""
    if entry.is_dir():
        problem = entry_problem(entry)
        if problem is None:
            try:
                found = datasets.load_from_disk(str(entry), keep_in_memory=keep_in_memory)
            except Exception as e:  # noqa: BLE001 - pyarrow's, datasets' and json's errors for a damaged folder
                problem = first_line(e)
            else:
                print(f"{what} read from the cache {entry}", file=sys.stderr)
                return found
        print(f"note: the cached {what} in {entry} are damaged ({problem}): "
              f"{'discarding them and ' if write else ''}{afresh}", file=sys.stderr)
        if write:
            discard(entry)
    built = build()
    if not write:
        return built
    try:
        remove_stale_temporaries(entry.parent)
        save_entry(built, entry)
        return datasets.load_from_disk(str(entry), keep_in_memory=keep_in_memory)
    except OSError as e:
        print(f"warning: could not cache the {what} in {entry.parent} ({e}); "
              "pass --cache_dir to a writable folder, or --no_cache", file=sys.stderr)
    return built


def file_digest(path: Path) -> str:
    """A file's SHA-1: a checksum here, not a defence against forgery, and the quickest of hashlib's where the CPU
    has SHA instructions (reruns hash every data file)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


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


def save_entry(built: Dataset | DatasetDict, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=temporary_prefix(entry), dir=entry.parent))
    try:
        built.save_to_disk(str(partial))
        (partial / MANIFEST).write_text(json.dumps(entry_files(partial)))
        os.rename(partial, entry)
    except OSError:
        if not (entry / MANIFEST).is_file():  # a concurrent run that wrote the same entry is no failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
