"""What every command (run.py, annotate.py, predict.py, sweep.py, summarize.py) shares at its edge: the types its
flags parse with, the one line a user mistake is answered with, and JSON files written whole or not at all."""

import argparse
import json
import math
import os
import re
from pathlib import Path

# numpy's and torch's generators take seeds below 2**32.
MAX_SEED = 2**32 - 1


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed from 0 to {MAX_SEED}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be zero or positive and finite, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within (0, 1], got {text}")
    return value


def folder_name(text: str) -> bool:
    """A single folder name: letters, digits, . _ -, and not . or .. (which would leave the data folder)."""
    return bool(re.fullmatch(r"[\w.-]+", text)) and text.strip(".") != ""


def first_line(error: BaseException) -> str:
    """An exception as one line for a user: its message's first line, or its type where it has no message."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def finite_or_none(data):
    """NaN and infinities become null: strict JSON has no spelling for them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def write_json_atomic(path: Path, data, indent: int | None = 2) -> None:
    """Strict JSON (no NaN) in UTF-8, written to a temporary name and renamed, so a reader (or a run that resumes
    after a kill) sees the old file or the new one, never a truncated one."""
    text = json.dumps(finite_or_none(data), indent=indent, default=str, allow_nan=False, ensure_ascii=False)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
