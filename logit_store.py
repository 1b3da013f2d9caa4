"""The teacher's top-k token log-probabilities at every target token of a run's training rows, computed once
(teacher_logits.py) and memory-mapped at training (run.py --kd_logits): distillation without running the teacher.

A store is a folder <root>/<key>, key = hash of (the teacher, the training rows' token ids, k, the tokenizer), so a
store is never read for other data, another k or another tokenizer, and never overwritten by one:

- meta.json: format, teacher, k, vocabulary (the logits per token), rows, tokens, views, the fingerprints;
- ids.npy [tokens, k] int32 and log_probs.npy [tokens, k] float32: per target token, the teacher's k most likely
  tokens and their log-probabilities (over the whole vocabulary, temperature 1), most likely first;
- counts.npy [rows, views] int64: per training row, its target tokens in each view (predict, then explain). Tokens
  are stored row by row, each row's predict targets then its explain targets.

Written the way token_cache.py writes: chunks of rows land under <key>.partial/ each written to a temporary name and
renamed into place, so an interrupted extraction resumes at the first missing chunk and never stores a row twice; the
finished store is assembled under a temporary name and renamed to <key> in one step.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from datasets import Dataset

from recovery import RunError
from model_utils import LABEL_PAD
from token_cache import tokenizer_fingerprint
from views import VIEWS

FORMAT = 1
META = "meta.json"
PARTIAL_SUFFIX = ".partial"


def view_columns(train: Dataset) -> list[tuple[str, str, str]]:
    """The VIEWS entries (view, prompt column, target column) the training rows have, in VIEWS order."""
    return [entry for entry in VIEWS if entry[2] in train.column_names]


def data_fingerprint(train: Dataset) -> str:
    """The training rows' prompt and target token ids, in order, hashed: the data a store belongs to."""
    columns = [column for _, prompt, target in view_columns(train) for column in (prompt, target)]
    digest = hashlib.blake2b(digest_size=16)
    for column in columns:
        digest.update(column.encode())
        digest.update(json.dumps(list(train[column])).encode())
    return digest.hexdigest()


def teacher_fingerprint(teacher: str) -> str:
    """The teacher as named, and where it is a local folder, its files' names, sizes and modification times: a
    retrained teacher saved over the same folder gets a new store."""
    folder = Path(teacher)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()) \
        if folder.is_dir() else []
    return repr((str(folder.resolve()) if folder.is_dir() else teacher, files))


def tokenizer_digest(tokenizer) -> str:
    """A short hash of how the tokenizer tokenises (token_cache.tokenizer_fingerprint), which meta.json records:
    the fingerprint itself holds the whole vocabulary, megabytes for a real tokenizer."""
    return hashlib.blake2b(tokenizer_fingerprint(tokenizer).encode(), digest_size=16).hexdigest()


def store_key(teacher: str, train: Dataset, k: int, tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr((FORMAT, teacher_fingerprint(teacher), data_fingerprint(train), k,
                        tokenizer_fingerprint(tokenizer))).encode())
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path) then rename it to path: readers see the whole file or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """arrays as one .npz at exactly path (np.savez given a name would add .npz to it)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def chunk_name(start: int, stop: int) -> str:
    return f"rows_{start:09d}_{stop:09d}.npz"


def model_top_k(teacher_states: Callable, k: int, vocabulary: int) -> Callable:
    """view_top_k of a local teacher: teacher_states(view batch) -> (hidden, lm_head weight, keep mask) at the
    view's target tokens (fast_loss.TARGET_STATES); log-softmax and top-k taken a bounded number of tokens at a
    time."""
    logits_per_chunk = max(16, (64 << 20) // (4 * vocabulary))

    @torch.no_grad()
    def view_top_k(view: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hidden, head, keep = teacher_states(view)
        ids, log_probs = [], []
        for start in range(0, len(hidden), logits_per_chunk):
            logits = (hidden[start : start + logits_per_chunk].to(head.dtype) @ head.T).float()
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32))
            log_probs.append(top.values)
        counts = keep.sum(1).tolist()
        return list(torch.cat(ids).split(counts)), list(torch.cat(log_probs).split(counts))

    return view_top_k


def served_top_k(complete: Callable[[dict], dict], model: str, k: int) -> Callable:
    """view_top_k of a decoder-only teacher behind an OpenAI-compatible server that returns prompt log-probabilities
    (vLLM's prompt_logprobs): one completions request per row, its prompt the row's token ids, and at each target
    position the k most likely tokens the server gives for it. complete(request body) -> response body."""

    def view_top_k(view: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ids, log_probs = [], []
        for tokens, mask, labels in zip(view["input_ids"], view["attention_mask"], view["labels"]):
            length = int(mask.sum())
            answer = complete({"model": model, "prompt": tokens[:length].tolist(), "max_tokens": 1,
                               "prompt_logprobs": k})
            positions = answer["choices"][0]["prompt_logprobs"]
            # Position p's entry is the distribution of token p given the tokens before it.
            tops = [sorted(((int(token), entry["logprob"]) for token, entry in positions[p].items()),
                           key=lambda pair: -pair[1])[:k] for p in range(1, length) if labels[p] != LABEL_PAD]
            if any(len(top) < k for top in tops):
                raise RunError(f"the server gave fewer than {k} log-probabilities for a prompt token of {model}: "
                               "start it allowing at least --top_k prompt log-probabilities")
            ids.append(torch.tensor([[token for token, _ in top] for top in tops], dtype=torch.int32))
            log_probs.append(torch.tensor([[value for _, value in top] for top in tops], dtype=torch.float32))
        return ids, log_probs

    return view_top_k


def top_k_of_rows(view_top_k: Callable, rows: list[dict], collate: Callable, views: list[str]):
    """(ids [tokens, k], log-probabilities [tokens, k], counts [rows, views]) for rows, stored order: row by row,
    each row's views in order. view_top_k(view batch) -> per row, its target tokens' top-k ids and log-probs."""
    batch = collate(rows)
    per_view = [view_top_k(batch[view]) for view in views]
    order = [(view, row) for row in range(len(rows)) for view in range(len(views))]
    ids = torch.cat([per_view[v][0][r] for v, r in order]).cpu().numpy()
    log_probs = torch.cat([per_view[v][1][r] for v, r in order]).cpu().numpy()
    counts = np.array([[len(per_view[v][0][r]) for v in range(len(views))] for r in range(len(rows))],
                      dtype=np.int64)
    return ids, log_probs, counts


def extract(root: Path, key: str, train: Dataset, view_top_k: Callable, collate: Callable, k: int,
            meta: dict, batch_size: int, chunk_rows: int, say: Callable[[str], None] = print) -> Path:
    """The store <root>/<key> of train's rows, extracted where missing (resuming an interrupted extraction)."""
    final = root / key
    if (final / META).is_file():
        say(f"teacher log-probabilities already stored in {final}")
        return final
    partial = root / (key + PARTIAL_SUFFIX)
    partial.mkdir(parents=True, exist_ok=True)
    views = [view for view, _, _ in view_columns(train)]
    for chunk_start in range(0, len(train), chunk_rows):
        chunk_stop = min(chunk_start + chunk_rows, len(train))
        path = partial / chunk_name(chunk_start, chunk_stop)
        if path.is_file():
            continue
        parts = [top_k_of_rows(view_top_k, [train[i] for i in range(start, min(start + batch_size, chunk_stop))],
                               collate, views)
                 for start in range(chunk_start, chunk_stop, batch_size)]
        arrays = {name: np.concatenate([part[i] for part in parts]) for i, name in
                  enumerate(("ids", "log_probs", "counts"))}
        write_atomic(path, lambda temporary: save_arrays(temporary, arrays))
        say(f"rows {chunk_stop}/{len(train)}")
    assemble(partial, final, train, views, k, meta)
    shutil.rmtree(partial)
    say(f"teacher log-probabilities stored in {final}")
    return final


def assemble(partial: Path, final: Path, train: Dataset, views: list[str], k: int, meta: dict) -> None:
    """The chunks of partial, in row order, as one store renamed into place at final."""
    chunks = sorted(partial.glob("rows_*.npz"))
    counts = np.concatenate([np.load(chunk)["counts"] for chunk in chunks])
    if len(counts) != len(train):
        raise RunError(f"{partial}: its chunks hold {len(counts)} rows, the data {len(train)}; remove the folder "
                       "and extract again")
    tokens = int(counts.sum())
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    ids = np.lib.format.open_memmap(temporary / "ids.npy", "w+", np.int32, (tokens, k))
    log_probs = np.lib.format.open_memmap(temporary / "log_probs.npy", "w+", np.float32, (tokens, k))
    at = 0
    for chunk in chunks:
        arrays = np.load(chunk)
        ids[at : at + len(arrays["ids"])] = arrays["ids"]
        log_probs[at : at + len(arrays["ids"])] = arrays["log_probs"]
        at += len(arrays["ids"])
    ids.flush()
    log_probs.flush()
    del ids, log_probs
    np.save(temporary / "counts.npy", counts)
    with open(temporary / META, "w") as f:
        json.dump({**meta, "format": FORMAT, "k": k, "rows": len(train), "tokens": tokens, "views": views}, f,
                  indent=1)
    os.replace(temporary, final)


@dataclass
class TopKStore:
    """A finished store, memory-mapped: the teacher's top-k at the target tokens of any batch of training rows."""

    folder: Path
    ids: np.ndarray
    log_probs: np.ndarray
    counts: np.ndarray
    row_starts: np.ndarray

    def batch(self, rows: list[int], views: int) -> dict[str, torch.Tensor]:
        """{"ids", "log_probs"} [tokens, k] at the target tokens of rows' first `views` views, in the losses' order:
        view by view, row by row."""
        spans = []
        for view in range(views):
            for row in rows:
                start = self.row_starts[row] + self.counts[row, :view].sum()
                spans.append((start, start + self.counts[row, view]))
        index = np.concatenate([np.arange(start, stop) for start, stop in spans])
        return {"ids": torch.from_numpy(self.ids[index].astype(np.int64)),
                "log_probs": torch.from_numpy(np.ascontiguousarray(self.log_probs[index]))}


def open_store(folder: str, train: Dataset, tokenizer, vocabulary: int) -> TopKStore:
    """The store at folder, checked against the run: its data, tokenizer and vocabulary; a RunError naming
    --kd_logits where it is not this run's."""
    path = Path(folder)
    if not (path / META).is_file():
        raise RunError(f"--kd_logits {folder}: no finished store there ({META} missing); run teacher_logits.py with "
                       "this run's data flags first and pass the folder it prints")
    meta = json.loads((path / META).read_text())
    checks = (
        ("data", meta.get("data"), data_fingerprint(train), "other training rows (another --dataset, --subsample, "
         "--run, --max_input_length or label type)"),
        ("tokenizer", meta.get("tokenizer"), tokenizer_digest(tokenizer), "another tokenizer"),
        ("vocabulary", meta.get("vocabulary"), vocabulary, "another vocabulary size"),
    )
    for name, stored, expected, what in checks:
        if stored != expected:
            raise RunError(f"--kd_logits {folder}: stored for {what} than this run's ({name} differs); extract it "
                           "with this run's flags")
    counts = np.load(path / "counts.npy")
    row_starts = np.concatenate([[0], np.cumsum(counts.sum(1))[:-1]])
    return TopKStore(path, np.load(path / "ids.npy", mmap_mode="r"), np.load(path / "log_probs.npy", mmap_mode="r"),
                     counts, row_starts)


class TopKCollator:
    """A family's collator plus, for training rows (they carry kd_row, their index in the store), the teacher's
    stored top-k at their target tokens as batch["kd"]."""

    def __init__(self, collate: Callable, store: TopKStore):
        self.collate, self.store = collate, store

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        if "kd_row" in features[0]:
            views = 2 if batch.get("expl") is not None else 1
            batch["kd"] = self.store.batch([f["kd_row"] for f in features], views)
        return batch
