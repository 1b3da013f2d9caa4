"""Synthetic e-SNLI at any size, in the paper's layout, for start-up and memory benchmarks (bench_startup.py).

    python bench/make_esnli.py --source ../shared/datasets --rows 550000 --out /tmp/esnli-550k

Writes OUT/esnli/esnli_{train,valid,test}.json (JSON lines: premise, hypothesis, label, explanation_1..3) and the
PaLM teacher's chunks OUT/esnli/llm/{split}_CoT_{i}.json (JSON lists of outputs), as datasets.zip holds them: 100
train chunks of 5,500 outputs (the paper's 550,000 rows), 2 valid and 2 test chunks. Train row i recycles shipped
valid row i mod N and its teacher output, its premise made unique by the row number appended; chunks past the
requested rows hold an empty list, so that the original code, which always reads the 100 train chunks, and this
project both load any row count unchanged. Valid and test (rows and chunks) are the shipped files, copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

NAME = "esnli"
CHUNK_ROWS = 5500  # teacher outputs per chunk file, as in datasets.zip
TRAIN_CHUNKS = 100
SHIPPED_CHUNKS = 2  # valid and test come in two chunks each


def read_shipped(source: Path) -> tuple[list[str], list[str]]:
    """The shipped valid rows (as JSON lines) and their teacher outputs, in order."""
    folder = source / NAME
    lines = [line for line in (folder / f"{NAME}_valid.json").read_text().splitlines() if line.strip()]
    outputs = []
    for index in range(SHIPPED_CHUNKS):
        outputs += json.loads((folder / "llm" / f"valid_CoT_{index}.json").read_text())
    if len(lines) != len(outputs):
        raise SystemExit(f"error: {folder}: {len(lines)} valid rows but {len(outputs)} teacher outputs")
    return lines, outputs


def write_train(lines: list[str], outputs: list[str], rows: int, folder: Path) -> None:
    """Train rows and their teacher chunks, one chunk in memory at a time."""
    (folder / "llm").mkdir(parents=True, exist_ok=True)
    with open(folder / f"{NAME}_train.json", "w") as train:
        for chunk in range(TRAIN_CHUNKS):
            numbers = range(chunk * CHUNK_ROWS, min(rows, (chunk + 1) * CHUNK_ROWS))
            chunk_outputs = []
            for number in numbers:
                row = json.loads(lines[number % len(lines)])
                row["premise"] = f"{row['premise']} ({number})"
                train.write(json.dumps(row) + "\n")
                chunk_outputs.append(outputs[number % len(outputs)])
            (folder / "llm" / f"train_CoT_{chunk}.json").write_text(json.dumps(chunk_outputs))


def copy_shipped(source: Path, folder: Path) -> None:
    for split in ("valid", "test"):
        shutil.copyfile(source / NAME / f"{NAME}_{split}.json", folder / f"{NAME}_{split}.json")
        for index in range(SHIPPED_CHUNKS):
            name = f"{split}_CoT_{index}.json"
            shutil.copyfile(source / NAME / "llm" / name, folder / "llm" / name)


def make(source: Path, rows: int, out: Path) -> Path:
    """Write the dataset folder under out (out/esnli) and return out, the --data_dir to pass."""
    if not 1 <= rows <= CHUNK_ROWS * TRAIN_CHUNKS:
        raise SystemExit(f"error: --rows {rows}: choose 1 to {CHUNK_ROWS * TRAIN_CHUNKS} (the paper's 100 chunks)")
    lines, outputs = read_shipped(source)
    folder = out / NAME
    write_train(lines, outputs, rows, folder)
    copy_shipped(source, folder)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a datasets folder holding esnli's valid split")
    parser.add_argument("--rows", type=int, required=True, help="train rows to write (up to 550,000)")
    parser.add_argument("--out", type=Path, required=True, help="the data folder to write (OUT/esnli/...)")
    args = parser.parse_args(argv)
    make(args.source, args.rows, args.out)
    print(f"wrote {args.rows} train rows to {args.out / NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
