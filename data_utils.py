"""Dataset loaders and teacher-output parsers for the layout of the paper's datasets.zip.

Everything that differs between datasets is data in DATASETS: which files to read, how a row becomes
(input, label), how the teacher's chain-of-thought text becomes (rationale, label), and the metric.
"""

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

from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

DATA_URL = "https://storage.googleapis.com/distilling-step-by-step/datasets.zip"
NLI_LABELS = ("entailment", "neutral", "contradiction")
# A blank rationale/label marks a teacher output that did not parse; a space, as in the paper's code, so that
# tokenisation still yields a (one-token) target.
BLANK = " "


class DataError(Exception):
    """A problem with the user's data files; its message says which file and what to do."""


def _missing_data_hint(data_dir: Path) -> str:
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


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset of datasets.zip is read. `sources` lists, per split, which folders' files make it up."""

    splits: tuple[str, ...]
    fields: tuple[str, ...]
    build_row: Callable[[dict, str], dict]
    parse: Callable[[str], tuple[str, str]]
    chunk_size: int
    chunks: dict[str, int]
    metric: str = "text"
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def has_valid(self) -> bool:
        return "valid" in self.splits


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
    ),
    "anli1": DatasetSpec(
        ("train", "valid", "test"),
        ("premise", "hypothesis", "label"),
        _nli_row,
        parse_anli,
        5000,
        {"train": 4, "valid": 1, "test": 1},
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
}


def read_json_lines(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a bad line is reported with file and line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); fix or re-download the file") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_rows(data_dir: Path, name: str, split: str, eos: str) -> list[dict]:
    spec = DATASETS[name]
    path = data_dir / name / f"{name}_{split}.json"
    if not path.is_file():
        raise DataError(f"missing data file {path}: {_missing_data_hint(data_dir)}")
    rows = []
    for number, row in enumerate(read_json_lines(path), 1):
        missing = [key for key in spec.fields if key not in row]
        if missing:
            raise DataError(f"{path}: row {number} lacks field(s) {', '.join(missing)}; expected {', '.join(spec.fields)}")
        try:
            rows.append(spec.build_row(row, eos))
        except (TypeError, IndexError, AttributeError, KeyError) as e:
            raise DataError(f"{path}: row {number} has a malformed field ({e}); expected {', '.join(spec.fields)}") from None
    return rows


def _read_json_list(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            outputs = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); re-download or regenerate it") from None
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise DataError(f"{path}: expected a JSON list of strings (the teacher's outputs)")
    return outputs


def read_teacher_outputs(data_dir: Path, name: str, split: str, llm: str) -> list[str]:
    """Raw teacher continuations for one folder's split, chunks concatenated in order."""
    spec = DATASETS[name]
    if llm == "gpt":
        paths = [data_dir / "gpt-neox" / name / f"{split}.json"]
    else:
        folder = "llm" if llm == "palm" else llm
        paths = [data_dir / name / folder / f"{split}_CoT_{i}.json" for i in range(spec.chunks[split])]
    outputs = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"missing teacher outputs {path}: {_missing_data_hint(data_dir)}")
        outputs += _read_json_list(path)
    return outputs


def load_split(data_dir: Path, name: str, split: str, llm: str, eos: str) -> Dataset:
    """One split with columns input, label and, when a teacher is used, llm_rationale and llm_label."""
    columns: dict[str, list] = {"input": [], "label": [], "llm_rationale": [], "llm_label": []}
    for source in DATASETS[name].sources.get(split, (name,)):
        rows = _read_rows(data_dir, source, split, eos)
        if llm != "none":
            outputs = read_teacher_outputs(data_dir, source, split, llm)
            # The train split may run past what the teacher covered; only the covered rows are used.
            covered = DATASETS[source].chunk_size * DATASETS[source].chunks[split] if split == "train" else len(rows)
            rows = rows[:covered]
            if len(outputs) != len(rows):
                raise DataError(
                    f"{source} {split}: {len(outputs)} teacher outputs (--llm {llm}) for {len(rows)} data rows; "
                    "they must match one to one: re-download or regenerate the teacher outputs"
                )
            parsed = [DATASETS[source].parse(output) for output in outputs]
            columns["llm_rationale"] += [rationale for rationale, _ in parsed]
            columns["llm_label"] += [label for _, label in parsed]
        columns["input"] += [row["input"] for row in rows]
        columns["label"] += [row["label"] for row in rows]
    if llm == "none":
        del columns["llm_rationale"], columns["llm_label"]
    return Dataset.from_dict(columns)


def load_data(name: str, data_dir: str | Path, llm: str = "palm", eos: str = "</s>") -> DatasetDict:
    """train/valid/test splits as in the paper: a missing valid split is 10% of train drawn with seed 0."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} not found: {_missing_data_hint(data_dir)}")
    spec = DATASETS[name]
    splits = DatasetDict({split: load_split(data_dir, name, split, llm, eos) for split in spec.splits})
    if not spec.has_valid:
        train_valid = splits["train"].train_test_split(test_size=0.1, seed=0)
        splits = DatasetDict({"train": train_valid["train"], "valid": train_valid["test"], "test": splits["test"]})
    return splits


def subsample(train: Dataset, fraction: float, seed: int) -> Dataset:
    """A fraction of train, drawn with the run's seed as in the paper."""
    if fraction >= 1.0:
        return train
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
        if not any((root / name).is_dir() for name in DATASETS):
            raise DataError(f"{url} holds none of the folders {', '.join(DATASETS)}; is it the paper's datasets.zip?")
        shutil.rmtree(root / "__MACOSX", ignore_errors=True)
        os.replace(root, data_dir)
    print(f"unpacked the data into {data_dir}", file=sys.stderr)
