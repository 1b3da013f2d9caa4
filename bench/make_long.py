"""cqa with long inputs, for benchmarks at --max_input_length 1024 (bench_original.py --data_dir OUT).

    python bench/make_long.py --source ../shared/datasets --tokens 900 --out /tmp/cqa-long

The paper's inputs are short (cqa's are under 150 T5 tokens), so on the shipped data an input limit of 1024 trains
exactly what 256 does. This writes OUT/cqa/ with every train and test question repeated, space-separated, until the
question alone has about --tokens tokens (counted as characters / 4), choices, answers and the PaLM teacher's
chunks unchanged, so both codes read it as cqa and train inputs of about that length.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

NAME = "cqa"
CHARACTERS_PER_TOKEN = 4  # about, for English under T5's vocabulary


def lengthen(question: str, tokens: int) -> str:
    return " ".join([question] * math.ceil(tokens * CHARACTERS_PER_TOKEN / max(1, len(question))))


def make(source: Path, tokens: int, out: Path) -> None:
    folder = out / NAME
    shutil.copytree(source / NAME / "llm", folder / "llm", dirs_exist_ok=True)
    for split in ("train", "test"):
        lines = (source / NAME / f"{NAME}_{split}.json").read_text().splitlines()
        with open(folder / f"{NAME}_{split}.json", "w") as f:
            for line in filter(str.strip, lines):
                row = json.loads(line)
                row["question"] = lengthen(row["question"], tokens)
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a datasets folder with cqa (../shared/datasets)")
    parser.add_argument("--tokens", type=int, default=900, help="about how many tokens each question becomes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    make(args.source, args.tokens, args.out)
    print(f"wrote {args.out / NAME}")


if __name__ == "__main__":
    main()
