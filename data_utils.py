"""Dataset loaders and teacher-output parsers for the layout of the paper's datasets.zip.

Everything that differs between datasets is data in DATASETS: which files to read, how a row becomes
(input, label), how the teacher's chain-of-thought text becomes (rationale, label), and the metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:  # `datasets` takes seconds to import; run.py answers flag mistakes before that.
    from datasets import Dataset, DatasetDict

DATA_URL = "https://storage.googleapis.com/distilling-step-by-step/datasets.zip"
NLI_LABELS = ("entailment", "neutral", "contradiction")
# A blank rationale/label marks a teacher output that did not parse; a space, as in the paper's code, so that
# tokenisation still yields a (one-token) target.
BLANK = " "


class DataError(Exception):
    """A problem with the user's data files; its message says which file and what to do."""


def _missing_data_hint(data_dir: Path, name: str | None = None) -> str:
    if name is not None and not DATASETS[name].from_paper:
        return (
            f"write your data as JSON lines with 'input' and 'label' into {data_dir}/{name}/{name}_<split>.json "
            "(train and test, optionally valid)"
        )
    return (
        f"download the paper's data ({DATA_URL}), unzip it so that {data_dir}/<dataset>/ exists, "
        f"or point --data_dir at the unzipped 'datasets' folder"
    )


# ---- teacher-output parsers: text continuation -> (rationale, label) ----


def _split_answer(text: str, marker: str) -> tuple[str, str] | None:
    parts = text.split(marker)
    if len(parts) != 2:
        return None
    return parts[0].rstrip(), parts[1]


def parse_cqa(output: str) -> tuple[str, str]:
    """`... So the answer is (d) math problem.` -> (rationale, 'math problem')."""
    split = _split_answer(output.split("Q:")[0].rstrip(), "So the answer is")
    if split is None:
        return BLANK, BLANK
    rationale, answer = split
    choice = re.split(r"\(.\)", answer)
    if len(choice) < 2 or not choice[1].strip():
        return rationale, BLANK
    label = choice[1].strip()
    return rationale, label[:-1] if label.endswith(".") else label


def parse_equation(output: str) -> tuple[str, str]:
    """`... The answer is (84 / 2).` -> (rationale, '(84 / 2)'); used for svamp and asdiv."""
    split = _split_answer(output.split("Q:")[0].rstrip(), "The answer is")
    if split is None:
        return BLANK, BLANK
    rationale, answer = split
    equation = re.search(r"\(.*\)", answer)
    return rationale, equation.group(0) if equation else BLANK


def parse_esnli(output: str) -> tuple[str, str]:
    """`<rationale>\nAnswer: neutral\n\nPremise: ...` -> (rationale, 'neutral')."""
    rationale = output.split("Answer:")[0].rstrip()
    parts = output.split("Answer: ")
    if len(parts) < 2:
        return rationale or BLANK, BLANK
    return rationale or BLANK, parts[1].split("Premise")[0].strip() or BLANK


def parse_anli(output: str) -> tuple[str, str]:
    """`... So the answer is contradiction.\n\nPremise: ...` -> (rationale, 'contradiction')."""
    split = _split_answer(output.split("Premise:")[0].rstrip(), "So the answer is")
    if split is None:
        return BLANK, BLANK
    rationale, answer = split
    label = answer.strip()
    label = label[:-1] if label.endswith(".") else label
    return rationale, label or BLANK


def parse_answer(output: str) -> tuple[str, str]:
    """Generic rule for custom datasets: `<rationale> So the answer is 42.` (or `The answer is 42.`), up to the
    first blank line (the end of an exemplar), -> (rationale, '42')."""
    parts = re.split(r"So the answer is|The answer is", output.split("\n\n")[0].rstrip())
    if len(parts) != 2:
        return BLANK, BLANK
    label = parts[1].strip()
    label = label[:-1].strip() if label.endswith(".") else label
    return parts[0].rstrip() or BLANK, label or BLANK


# ---- row builders: one JSON line -> {'input', 'label'} ----


def _cqa_row(row: dict, eos: str) -> dict:
    choices = "\n".join(f"({letter}) {choice}" for letter, choice in zip("abcde", row["choices"]))
    return {"input": f"{row['question']}\nAnswer Choices:\n{choices}", "label": row["answer"]}


def _plain_row(row: dict, eos: str) -> dict:
    return {"input": row["input"], "label": row["label"]}


def _nli_row(row: dict, eos: str) -> dict:
    return {"input": row["premise"] + eos + row["hypothesis"], "label": NLI_LABELS[row["label"]]}


def _asdiv_row(row: dict, eos: str) -> dict:
    return {"input": row["Body"] + "\n" + row["Question"], "label": row["Answer"].split(" ")[0]}


def _custom_row(row: dict, eos: str) -> dict:
    """A user's row: `input` text, `label` text (a number is taken as its text), optional `rationale` text."""
    label = row["label"]
    if not isinstance(row["input"], str) or isinstance(label, bool) or not isinstance(label, (str, int, float)):
        raise TypeError("'input' must be text and 'label' text or a number")
    if not isinstance(row.get("rationale", ""), str):
        raise TypeError("'rationale' must be text")
    return {"input": row["input"], "label": str(label)}


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is read. `sources` lists, per split, which folders' files make it up; `query` is the teacher's
    prompt for one row (formatted with its raw fields and input), ending where the exemplars' answers begin;
    `optional_splits` are read only if their file exists."""

    splits: tuple[str, ...]
    fields: tuple[str, ...]
    build_row: Callable[[dict, str], dict]
    parse: Callable[[str], tuple[str, str]]
    chunk_size: int
    chunks: dict[str, int]
    metric: str = "text"
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    query: str = "Q: {input}\nA:"
    optional_splits: tuple[str, ...] = ()

    @property
    def from_paper(self) -> bool:
        """The paper's datasets.zip holds this dataset with PaLM's outputs (chunk counts per split)."""
        return bool(self.chunks)


DATASETS: dict[str, DatasetSpec] = {
    "cqa": DatasetSpec(
        ("train", "test"), ("question", "choices", "answer"), _cqa_row, parse_cqa, 1000, {"train": 10, "test": 2}
    ),
    "svamp": DatasetSpec(
        ("train", "test"), ("input", "label"), _plain_row, parse_equation, 500, {"train": 2, "test": 1}, "equation"
    ),
    "esnli": DatasetSpec(
        ("train", "valid", "test"),
        ("premise", "hypothesis", "label"),
        _nli_row,
        parse_esnli,
        5500,
        {"train": 100, "valid": 2, "test": 2},
        query="Premise: {premise}\nHypothesis: {hypothesis}\nReasonings:",
    ),
    "anli1": DatasetSpec(
        ("train", "valid", "test"),
        ("premise", "hypothesis", "label"),
        _nli_row,
        parse_anli,
        5000,
        {"train": 4, "valid": 1, "test": 1},
        query="Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:",
    ),
    "asdiv": DatasetSpec(
        ("train", "test"),
        ("Body", "Question", "Answer"),
        _asdiv_row,
        parse_equation,
        1000,
        {"train": 3, "test": 1},
        "equation",
        sources={"train": ("svamp", "asdiv"), "test": ("svamp",)},
    ),
    # A user's dataset in <data_dir>/custom/ (see README); it has no PaLM outputs, only annotate.py's.
    "custom": DatasetSpec(
        ("train", "valid", "test"), ("input", "label"), _custom_row, parse_answer, 1000, {},
        optional_splits=("valid",),
    ),
}


def decode_utf8(data: bytes, path: Path, number: int | None = None) -> str:
    """Text of a file (or of its line `number`); bytes that are not UTF-8 are reported with file, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = number or data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 text; "
                        "re-save the file as UTF-8") from None


def numbered_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line of a JSON-lines file; a bad line is reported with file and line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); fix or re-download the file") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_json_lines(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a bad line is reported with file and line number."""
    return [row for _, row in numbered_json_lines(path)]


def data_path(data_dir: Path, name: str, split: str) -> Path:
    return data_dir / name / f"{name}_{split}.json"


def split_names(data_dir: Path, name: str) -> tuple[str, ...]:
    """The dataset's splits in this data folder: an optional split counts only where its file exists."""
    spec = DATASETS[name]
    return tuple(s for s in spec.splits if s not in spec.optional_splits or data_path(data_dir, name, s).is_file())


def read_rows(data_dir: Path, name: str, split: str, eos: str) -> list[dict]:
    """One file's rows: the raw fields plus the built `input` and `label` (the raw fields fill teacher prompts)."""
    spec = DATASETS[name]
    path = data_path(data_dir, name, split)
    if not path.is_file():
        raise DataError(f"missing data file {path}: {_missing_data_hint(data_dir, name)}")
    rows = []
    for index, (number, row) in enumerate(numbered_json_lines(path), 1):
        missing = [key for key in spec.fields if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: row {index} lacks field(s) {', '.join(missing)}; "
                            f"expected {', '.join(spec.fields)}")
        try:
            built = spec.build_row(row, eos)
        except (TypeError, IndexError, AttributeError, KeyError) as e:
            raise DataError(f"{path}:{number}: row {index} has a malformed field ({e}); "
                            f"expected {', '.join(spec.fields)}") from None
        for key in ("input", "label"):
            if not isinstance(built[key], str):
                raise DataError(f"{path}:{number}: row {index}'s {key} is {type(built[key]).__name__} "
                                f"{json.dumps(built[key])[:40]}, expected text; fix that line")
        rows.append({**row, **built})
    if not rows:
        raise DataError(f"{path} holds no rows: fill it with JSON lines ({', '.join(spec.fields)}) or re-download it")
    return rows


def read_json_list(path: Path) -> list[str]:
    try:
        outputs = json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); re-download or regenerate it") from None
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise DataError(f"{path}: expected a JSON list of strings (the teacher's outputs)")
    return outputs


def chunk_path(data_dir: Path, name: str, folder: str, split: str, index: int) -> Path:
    return data_dir / name / folder / f"{split}_CoT_{index}.json"


def teacher_chunk_count(data_dir: Path, name: str, split: str, llm: str) -> int:
    """PaLM's (and GPT's) outputs come in the paper's fixed number of chunks; another teacher's folder holds as
    many consecutive chunks as annotate.py has written so far."""
    if llm in ("palm", "gpt"):
        return DATASETS[name].chunks[split]
    count = 0
    while chunk_path(data_dir, name, llm, split, count).is_file():
        count += 1
    return max(count, 1)  # at least one, so that a missing folder is reported as a missing first chunk


def read_teacher_outputs(data_dir: Path, name: str, split: str, llm: str) -> list[str]:
    """Raw teacher continuations for one folder's split, chunks concatenated in order."""
    if llm == "gpt":
        paths = [data_dir / "gpt-neox" / name / f"{split}.json"]
    else:
        folder = "llm" if llm == "palm" else llm
        count = teacher_chunk_count(data_dir, name, split, llm)
        paths = [chunk_path(data_dir, name, folder, split, i) for i in range(count)]
    outputs = []
    for path in paths:
        if not path.is_file():
            paper = llm in ("palm", "gpt")
            hint = _missing_data_hint(data_dir) if paper else f"write them with annotate.py --llm_name {llm}"
            raise DataError(f"missing teacher outputs {path}: {hint}")
        outputs += read_json_list(path)
    return outputs


def _teacher_rationales(
    data_dir: Path, source: str, split: str, llm: str, rows: list[dict]
) -> tuple[list[dict], list[tuple[str, str]]]:
    """(the rows the teacher covered, their parsed (rationale, label) pairs)."""
    spec = DATASETS[source]
    outputs = read_teacher_outputs(data_dir, source, split, llm)
    # The train split may run past what the teacher covered; only the covered rows are used.
    if split == "train":
        rows = rows[: spec.chunk_size * teacher_chunk_count(data_dir, source, split, llm)]
    if len(outputs) != len(rows):
        raise DataError(
            f"{source} {split}: {len(outputs)} teacher outputs (--llm {llm}) for {len(rows)} data rows; "
            "they must match one to one: re-download or regenerate the teacher outputs"
        )
    return rows, [spec.parse(output) for output in outputs]


def _dataset_rationales(source: str, split: str, rows: list[dict]) -> list[tuple[str, str]]:
    """--llm dataset: the rows' own `rationale` field, paired with their gold label."""
    for number, row in enumerate(rows, 1):
        if "rationale" not in row:
            raise DataError(
                f"{source} {split}: row {number} has no 'rationale' field, which --llm dataset needs; "
                "add one to every row or choose another --llm"
            )
    return [(row["rationale"] or BLANK, row["label"]) for row in rows]


def load_split(data_dir: Path, name: str, split: str, llm: str, eos: str) -> Dataset:
    """One split with columns input, label and, when rationales are used, llm_rationale and llm_label."""
    from datasets import Dataset

    columns: dict[str, list] = {"input": [], "label": [], "llm_rationale": [], "llm_label": []}
    for source in DATASETS[name].sources.get(split, (name,)):
        rows = read_rows(data_dir, source, split, eos)
        parsed = []
        if llm == "dataset":
            parsed = _dataset_rationales(source, split, rows)
        elif llm != "none":
            rows, parsed = _teacher_rationales(data_dir, source, split, llm, rows)
        columns["llm_rationale"] += [rationale for rationale, _ in parsed]
        columns["llm_label"] += [label for _, label in parsed]
        columns["input"] += [row["input"] for row in rows]
        columns["label"] += [row["label"] for row in rows]
    if llm == "none":
        del columns["llm_rationale"], columns["llm_label"]
    return Dataset.from_dict(columns)


def load_data(name: str, data_dir: str | Path, llm: str = "palm", eos: str = "</s>") -> DatasetDict:
    """train/valid/test splits as in the paper: a missing valid split is 10% of train drawn with seed 0."""
    from datasets import DatasetDict

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} not found: {_missing_data_hint(data_dir)}")
    names = split_names(data_dir, name)
    splits = DatasetDict({split: load_split(data_dir, name, split, llm, eos) for split in names})
    if "valid" not in names:
        if len(splits["train"]) < 10:
            raise DataError(f"{name}: train has {len(splits['train'])} rows; at least 10 are needed to hold out 10% as valid")
        train_valid = splits["train"].train_test_split(test_size=0.1, seed=0)
        splits = DatasetDict({"train": train_valid["train"], "valid": train_valid["test"], "test": splits["test"]})
    return splits


def subsample(train: Dataset, fraction: float, seed: int) -> Dataset:
    """A fraction of train, drawn with the run's seed as in the paper."""
    if fraction >= 1.0:
        return train
    if int(len(train) * fraction) < 1:
        raise DataError(f"--subsample {fraction} of {len(train)} train rows keeps none; use a larger fraction")
    return train.train_test_split(test_size=1.0 - fraction, seed=seed)["train"]


def _download(url: str, target: Path) -> None:
    """Copy a URL (or local path) to target with a progress bar."""
    source = url if "://" in url else Path(url).resolve().as_uri()
    with urllib.request.urlopen(source, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc="datasets.zip") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_data(url: str, data_dir: Path, ask: bool) -> None:
    """Fetch and unpack datasets.zip into data_dir, all or nothing: unpack beside it, then rename into place."""
    manual = (
        f"data folder {data_dir} not found: download {DATA_URL}, unzip it and pass the 'datasets' folder as "
        "--data_dir (or run again with --download)"
    )
    if ask:
        if not sys.stdin.isatty():
            raise DataError(manual)
        answer = input(f"{data_dir} does not exist. Download and unpack the paper's data from {url}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise DataError(manual)
    parent = data_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".datasets-download-") as tmp:
        archive = Path(tmp) / "datasets.zip"
        try:
            _download(url, archive)
        except (OSError, ValueError) as e:
            raise DataError(f"could not fetch {url} ({e}); {manual}") from None
        try:
            with zipfile.ZipFile(archive) as zf:
                broken = zf.testzip()
                if broken is not None:
                    raise DataError(f"{url}: archive member {broken} is corrupt; download it again")
                unpacked = Path(tmp) / "unpacked"
                for member in zf.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DataError(f"{url}: archive member {member!r} would unpack outside the data folder")
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise DataError(f"{url} is not a zip archive; download {DATA_URL} by hand") from None
        root = unpacked / "datasets" if (unpacked / "datasets").is_dir() else unpacked
        paper = [name for name, spec in DATASETS.items() if spec.from_paper]
        if not any((root / name).is_dir() for name in paper):
            raise DataError(f"{url} holds none of the folders {', '.join(paper)}; is it the paper's datasets.zip?")
        shutil.rmtree(root / "__MACOSX", ignore_errors=True)
        os.replace(root, data_dir)
    print(f"unpacked the data into {data_dir}", file=sys.stderr)
