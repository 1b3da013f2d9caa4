"""What a teacher's annotation cost: tokens, time and retries per request (teachers.request_record), kept per chunk
beside the chunk files, totalled per split, priced when the user gives prices, and the share a training run used.

    <data_dir>/<dataset>/<llm_name>/<split>_CoT_<i>.json         the chunk's outputs (annotate.py)
    <data_dir>/<dataset>/<llm_name>/<split>_CoT_<i>.usage.json   its requests: tokens, seconds, attempts

A chunk's usage file is written before the chunk itself, so every chunk written since usage was recorded has one; a
resumed annotation keeps the finished chunks' records and adds the new ones'.
"""

import json
from pathlib import Path

from cli import write_json_atomic
from data_utils import DATASETS

USAGE_SUFFIX = ".usage.json"
PER_MILLION = 1_000_000
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens")


def usage_path(chunk: Path) -> Path:
    """<split>_CoT_<i>.json -> <split>_CoT_<i>.usage.json, beside it."""
    return chunk.with_name(chunk.stem + USAGE_SUFFIX)


def write_chunk_usage(chunk: Path, requests: list[dict], wall_seconds: float) -> None:
    """The chunk's request records and the wall time it took (requests run concurrently: less than their sum)."""
    write_json_atomic(usage_path(chunk), {"wall_seconds": wall_seconds, "requests": requests}, indent=None)


def price(prompt_tokens: int, completion_tokens: int, price_prompt: float, price_completion: float) -> float:
    """The cost of the tokens at prices per million prompt and completion tokens."""
    return (prompt_tokens * price_prompt + completion_tokens * price_completion) / PER_MILLION


def split_totals(chunks: list[Path], price_prompt: float | None = None, price_completion: float | None = None
                 ) -> dict:
    """A split's totals over its chunk files' usage records: requests, attempts and retries, prompt, completion and
    total tokens, seconds; chunks written before usage was recorded and requests whose server reported no usage are
    counted apart (their tokens are missing from the totals). With prices (per million tokens), the cost."""
    totals = {"chunks": len(chunks), "chunks_without_record": 0, "requests": 0, "attempts": 0, "retries": 0,
              "requests_without_usage": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
              "request_seconds": 0.0, "wall_seconds": 0.0}
    for chunk in chunks:
        path = usage_path(chunk)
        if not path.is_file():
            totals["chunks_without_record"] += 1
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        totals["wall_seconds"] += record["wall_seconds"]
        for request in record["requests"]:
            totals["requests"] += 1
            totals["attempts"] += request["attempts"]
            totals["request_seconds"] += request["seconds"]
            if any(request[key] is None for key in TOKEN_FIELDS):
                totals["requests_without_usage"] += 1
            for key in TOKEN_FIELDS:
                totals[key] += request[key] or 0
    totals["retries"] = totals["attempts"] - totals["requests"]
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    if price_prompt is not None or price_completion is not None:
        prompt_price, completion_price = price_prompt or 0.0, price_completion or 0.0
        totals |= {"price_prompt": prompt_price, "price_completion": completion_price,
                   "cost": price(totals["prompt_tokens"], totals["completion_tokens"], prompt_price, completion_price)}
    return totals


def describe_totals(split: str, totals: dict) -> str:
    """One line for annotate.py's summary."""
    line = (f"{split} teacher cost: {totals['prompt_tokens']:,} prompt + {totals['completion_tokens']:,} completion "
            f"tokens in {totals['requests']:,} requests ({totals['retries']:,} retries), "
            f"{totals['wall_seconds']:.1f} s")
    if "cost" in totals:
        prices = f"{totals['price_prompt']:g} / {totals['price_completion']:g}"
        line += f", cost {totals['cost']:.4f} at {prices} per million"
    missing = [f"{totals[key]} {what}" for key, what in (("chunks_without_record", "chunk(s) annotated before usage "
               "was recorded"), ("requests_without_usage", "request(s) without the server's usage")) if totals[key]]
    return line + (f"; not counted: {', '.join(missing)}" if missing else "")


def run_budget(data_dir: str | Path, dataset: str, llm: str, fraction: float) -> dict | None:
    """The teacher tokens (and cost) of a run's training rows, for results.json's `teacher_budget`: `fraction` of the
    train split's totals in <split>_annotation.json (the rows a run draws are spread over all chunks, so its share is
    taken as the fraction of the whole); None where a train folder has no recorded totals (PaLM's, an annotation
    from before usage was recorded, a teacher that recorded no requests)."""
    sources = DATASETS[dataset].sources.get("train", (dataset,))
    split_tokens, split_cost = 0, 0.0
    priced = True
    for source in sources:
        path = Path(data_dir) / source / llm / "train_annotation.json"
        try:
            totals = json.loads(path.read_text(encoding="utf-8"))["teacher_cost"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not totals.get("requests"):  # a teacher that recorded no request counted nothing
            return None
        split_tokens += totals["total_tokens"]
        priced = priced and "cost" in totals
        split_cost += totals.get("cost", 0.0)
    return {"fraction": fraction, "split_tokens": split_tokens, "tokens": fraction * split_tokens,
            "split_cost": split_cost if priced else None, "cost": fraction * split_cost if priced else None}
