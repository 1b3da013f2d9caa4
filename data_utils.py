"""Dataset loaders and teacher-output parsers for the layout of the paper's datasets.zip.

Everything that differs between datasets is data in DATASETS: which files to read, how a row becomes
(input, label), how the teacher's chain-of-thought text becomes (rationale, label), and the metric.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `datasets` is slow to import; run.py answers flag mistakes before that.
    from datasets import Dataset, DatasetDict

# The paper's README has users unzip the datasets.zip committed in its repository; this is that file.
DATA_URL = "https://raw.githubusercontent.com/google-research/distilling-step-by-step/refs/heads/main/datasets.zip"
NLI_LABELS = ("entailment", "neutral", "contradiction")
# A blank rationale/label marks a teacher output that did not parse: a space, as in the paper's code (which tokenises
# it as '▁' + </s>); anli's parsers give '' there, as the paper's code does.
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
# Each follows the paper's code rule for rule (its _parse_llm_output / _parse_gpt_output), so targets are the same
# strings: a blank is ' ' for cqa, svamp and esnli and '' for anli, as there. Where that code crashes (a cqa output
# without exactly one 'So the answer is'), both targets are ' ' instead.


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    """(before, after) where marker occurs exactly once, as the paper's `rationale, label = text.split(marker)`."""
    parts = text.split(marker)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _choice_text(answer: str) -> str:
    """`' (d) math problem.'` -> 'math problem': the text after the first `(x)` choice letter, final '.' dropped."""
    choice = re.split(r"\(.\)", answer)
    if len(choice) < 2 or not choice[1].strip():
        return BLANK
    label = choice[1].strip()
    return label[:-1] if label.endswith(".") else label


def parse_cqa(output: str, lstrip: bool = False) -> tuple[str, str]:
    """PaLM: `... So the answer is (d) math problem.\n\nQ: ...` -> (rationale, 'math problem'); lstrip=True drops
    leading whitespace first (GPT-NeoX's outputs)."""
    text = output.partition("Q:")[0].rstrip()
    split = _split_once(text.lstrip() if lstrip else text, "So the answer is")
    if split is None:
        return BLANK, BLANK
    return split[0].rstrip(), _choice_text(split[1])


def parse_equation(output: str, lstrip: bool = False) -> tuple[str, str]:
    """PaLM: `... The answer is (84 / 2).` -> (rationale, '(84 / 2)'), for svamp and asdiv; lstrip=True drops leading
    whitespace first (GPT-NeoX's outputs)."""
    text = output.partition("Q:")[0].rstrip()
    split = _split_once(text.lstrip() if lstrip else text, "The answer is")
    if split is None:
        return BLANK, BLANK
    equation = re.search(r"\(.*\)", split[1])
    return split[0].rstrip(), equation.group(0) if equation else BLANK


def parse_esnli(output: str, lstrip: bool = False) -> tuple[str, str]:
    """PaLM: `<rationale>\nAnswer: neutral\n\nPremise: ...` -> (rationale, 'neutral'); lstrip=True drops the
    rationale's leading whitespace (GPT-NeoX's outputs)."""
    rationale = output.partition("Answer:")[0].rstrip()
    _, answered, answer = output.partition("Answer: ")
    # the text up to the next "Answer: " (the paper's split("Answer: ")[1]), cut before "Premise"
    label = answer.partition("Answer: ")[0].partition("Premise")[0].rstrip() if answered else BLANK
    return rationale.lstrip() if lstrip else rationale, label


parse_cqa_gpt = partial(parse_cqa, lstrip=True)
parse_equation_gpt = partial(parse_equation, lstrip=True)
parse_esnli_gpt = partial(parse_esnli, lstrip=True)


def _anli(text: str, markers: tuple[str, ...]) -> tuple[str, str]:
    for marker in markers:
        split = _split_once(text, marker)
        if split is not None:
            # The paper's code drops the label's last character whatever it is (normally the final '.').
            return split[0].rstrip(), split[1].lstrip()[:-1]
    return "", ""


def parse_anli(output: str) -> tuple[str, str]:
    """PaLM: `... So the answer is contradiction.\n\nPremise: ...` -> (rationale, 'contradiction')."""
    return _anli(output.split("Premise:")[0].rstrip(), ("So the answer is",))


def parse_anli_gpt(output: str) -> tuple[str, str]:
    """GPT-NeoX: leading whitespace dropped, and `The answer is` read where `So the answer is` is not."""
    return _anli(output.split("Premise:")[0].rstrip().lstrip(), ("So the answer is", "The answer is"))


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
    `optional_splits` are read only if their file exists; `parse_gpt` reads GPT-NeoX's outputs (--llm gpt), where the
    paper's code has a parser for them."""

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
    # The fixed label set of a classification dataset, for the teacher audit's per-class accuracy.
    classes: tuple[str, ...] = ()
    parse_gpt: Callable[[str], tuple[str, str]] | None = None
    # How a student's rationale is checked against its own predicted label (rationale_eval.CONSISTENCY_RULES, for
    # run.py --eval_rationales); None: the dataset has no such rule.
    consistency: str | None = None

    @property
    def from_paper(self) -> bool:
        """The paper's datasets.zip holds this dataset with PaLM's outputs (chunk counts per split)."""
        return bool(self.chunks)


def _nli_spec(parse, parse_gpt, chunk_size: int, chunks: dict[str, int], cue: str) -> DatasetSpec:
    """A premise/hypothesis dataset (esnli, anli1): the teacher's query ends with `cue`, where its answers begin."""
    return DatasetSpec(
        ("train", "valid", "test"), ("premise", "hypothesis", "label"), _nli_row, parse, chunk_size, chunks,
        query=f"Premise: {{premise}}\nHypothesis: {{hypothesis}}\n{cue}", classes=NLI_LABELS, parse_gpt=parse_gpt,
        consistency="relation",
    )


DATASETS: dict[str, DatasetSpec] = {
    "cqa": DatasetSpec(
        ("train", "test"), ("question", "choices", "answer"), _cqa_row, parse_cqa, 1000, {"train": 10, "test": 2},
        parse_gpt=parse_cqa_gpt, consistency="choice",
    ),
    "svamp": DatasetSpec(
        ("train", "test"), ("input", "label"), _plain_row, parse_equation, 500, {"train": 2, "test": 1}, "equation",
        parse_gpt=parse_equation_gpt, consistency="equation",
    ),
    "esnli": _nli_spec(parse_esnli, parse_esnli_gpt, 5500, {"train": 100, "valid": 2, "test": 2}, "Reasonings:"),
    "anli1": _nli_spec(parse_anli, parse_anli_gpt, 5000, {"train": 4, "valid": 1, "test": 1}, "Answer:"),
    "asdiv": DatasetSpec(
        ("train", "test"),
        ("Body", "Question", "Answer"),
        _asdiv_row,
        parse_equation,
        1000,
        {"train": 3, "test": 1},
        "equation",
        sources={"train": ("svamp", "asdiv"), "test": ("svamp",)},
        consistency="equation",
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


def json_rows(
    lines: Iterable[str], error: type[Exception], source: str, remedy: str = ""
) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank JSON line; a line that is not JSON raises `error` naming source, line
    and reason, followed by `remedy` (each command has its own error type and advice)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{source}:{number}: not valid JSON ({e.msg}){remedy}") from None


def numbered_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of each non-blank line of a JSON-lines file, read as they come (a file of 550,000 rows is
    never held as a whole); a bad line is reported with file and line."""
    with open(path, "rb") as f:
        lines = (decode_utf8(raw, path, number) for number, raw in enumerate(f, 1))
        for number, row in json_rows(lines, DataError, str(path), "; fix or re-download the file"):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            yield number, row


def data_path(data_dir: Path, name: str, split: str) -> Path:
    return data_dir / name / f"{name}_{split}.json"


def split_names(data_dir: Path, name: str) -> tuple[str, ...]:
    """The dataset's splits in this data folder: an optional split counts only where its file exists."""
    spec = DATASETS[name]
    return tuple(s for s in spec.splits if s not in spec.optional_splits or data_path(data_dir, name, s).is_file())


def read_rows(data_dir: Path, name: str, split: str, eos: str, raw: bool = True) -> list[dict]:
    """One file's rows: the raw fields plus the built `input` and `label` (the raw fields fill teacher prompts);
    with raw=False the built fields only, so that the raw ones (e-SNLI's three explanations) are not kept."""
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
        rows.append({**row, **built} if raw else {"input": built["input"], "label": built["label"]})
    if not rows:
        raise DataError(f"{path} holds no rows: fill it with JSON lines ({', '.join(spec.fields)}) or re-download it")
    return rows


def read_json_list(path: Path) -> list[str] | list[list[str]]:
    """A chunk of teacher outputs: a list of strings (one output per row, PaLM's layout) or a list of equally long
    lists of strings (K sampled outputs per row, annotate.py --samples K)."""
    try:
        outputs = json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); re-download or regenerate it") from None
    one_each = isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
    k_each = (
        isinstance(outputs, list)
        and all(isinstance(o, list) and o and all(isinstance(s, str) for s in o) for o in outputs)
        and len({len(o) for o in outputs}) <= 1
    )
    if not (one_each or k_each):
        raise DataError(f"{path}: expected a JSON list of strings (the teacher's outputs), or of equally long lists "
                        "of strings (several samples per row)")
    return outputs


def samples_per_row(outputs: list[str] | list[list[str]]) -> list[list[str]]:
    """Every row's teacher outputs as a list: [output] in PaLM's one-per-row layout, the K samples otherwise."""
    return [output if isinstance(output, list) else [output] for output in outputs]


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


def read_teacher_outputs(data_dir: Path, name: str, split: str, llm: str) -> list[str] | list[list[str]]:
    """Raw teacher continuations for one folder's split (one or K per row, see read_json_list), chunks in order."""
    return [output for chunk in teacher_output_chunks(data_dir, name, split, llm) for output in chunk]


def teacher_output_paths(data_dir: Path, name: str, split: str, llm: str) -> list[Path]:
    """The files holding the teacher's outputs for one split, in row order."""
    if llm == "gpt":
        return [data_dir / "gpt-neox" / name / f"{split}.json"]
    folder = "llm" if llm == "palm" else llm
    return [chunk_path(data_dir, name, folder, split, i) for i in range(teacher_chunk_count(data_dir, name, split, llm))]


def split_files(data_dir: Path, name: str, split: str, llm: str) -> list[Path]:
    """Every file load_split reads for one split, in order (what its cache entry is keyed by)."""
    files = []
    for source in DATASETS[name].sources.get(split, (name,)):
        files.append(data_path(data_dir, source, split))
        if llm not in ("none", "dataset"):
            files += teacher_output_paths(data_dir, source, split, llm)
    return files


def teacher_output_chunks(
    data_dir: Path, name: str, split: str, llm: str
) -> Iterator[list[str] | list[list[str]]]:
    """Each chunk file's raw teacher continuations in turn, so that a caller can parse one chunk and let it go."""
    for path in teacher_output_paths(data_dir, name, split, llm):
        if not path.is_file():
            paper = llm in ("palm", "gpt")
            hint = _missing_data_hint(data_dir) if paper else f"write them with annotate.py --llm_name {llm}"
            raise DataError(f"missing teacher outputs {path}: {hint}")
        yield read_json_list(path)


def _teacher_rationales(
    data_dir: Path, source: str, split: str, llm: str, rows: list[dict]
) -> tuple[list[dict], list[list[tuple[str, str]]]]:
    """(the rows the teacher covered, per row the parsed (rationale, label) pair of each of its samples)."""
    spec = DATASETS[source]
    parse = spec.parse_gpt if llm == "gpt" else spec.parse
    # The train split may run past what the teacher covered; only the covered rows are used.
    if split == "train":
        rows = rows[: spec.chunk_size * teacher_chunk_count(data_dir, source, split, llm)]
    parsed: list[list[tuple[str, str]]] = []
    for outputs in teacher_output_chunks(data_dir, source, split, llm):  # one chunk's raw text held at a time
        if parse is None:
            raise DataError(f"--llm gpt: the paper's GPT-NeoX outputs do not cover {source}; choose another --llm")
        parsed += [[parse(sample) for sample in samples] for samples in samples_per_row(outputs)]
    if len(parsed) != len(rows):
        raise DataError(
            f"{source} {split}: {len(parsed)} teacher outputs (--llm {llm}) for {len(rows)} data rows; "
            "they must match one to one: re-download or regenerate the teacher outputs"
        )
    return rows, parsed


def _dataset_rationales(source: str, split: str, rows: list[dict]) -> list[tuple[str, str]]:
    """--llm dataset: the rows' own `rationale` field, paired with their gold label."""
    for number, row in enumerate(rows, 1):
        if "rationale" not in row:
            raise DataError(
                f"{source} {split}: row {number} has no 'rationale' field, which --llm dataset needs; "
                "add one to every row or choose another --llm"
            )
    return [[(row["rationale"] or BLANK, row["label"])] for row in rows]


def load_split(data_dir: Path, name: str, split: str, llm: str, eos: str, samples: bool = False) -> Dataset:
    """One split with columns input, label and, when rationales are used, llm_rationale and llm_label (the first
    sample's); with samples=True also llm_rationales and llm_labels, every sample's (see rationales.py)."""
    from datasets import Dataset

    columns: dict[str, list] = {"input": [], "label": [], "llm_rationale": [], "llm_label": []}
    if samples:
        columns |= {"llm_rationales": [], "llm_labels": []}
    for source in DATASETS[name].sources.get(split, (name,)):
        rows = read_rows(data_dir, source, split, eos, raw=llm == "dataset")  # --llm dataset reads `rationale`
        parsed = []
        if llm == "dataset":
            parsed = _dataset_rationales(source, split, rows)
        elif llm != "none":
            rows, parsed = _teacher_rationales(data_dir, source, split, llm, rows)
        columns["llm_rationale"] += [pairs[0][0] for pairs in parsed]
        columns["llm_label"] += [pairs[0][1] for pairs in parsed]
        if samples:
            columns["llm_rationales"] += [[rationale for rationale, _ in pairs] for pairs in parsed]
            columns["llm_labels"] += [[label for _, label in pairs] for pairs in parsed]
        columns["input"] += [row["input"] for row in rows]
        columns["label"] += [row["label"] for row in rows]
    if llm == "none":
        columns = {key: columns[key] for key in ("input", "label")}
    return Dataset.from_dict(columns)


def read_split(data_dir: Path, name: str, split: str, llm: str, eos: str, samples: bool, cache_dir: Path | None,
               write_cache: bool) -> Dataset:
    """load_split, through the cache where there is one and every file it reads exists (a missing one is reported
    by load_split itself)."""
    files = split_files(data_dir, name, split, llm)
    if cache_dir is None or not all(path.is_file() for path in files):
        return load_split(data_dir, name, split, llm, eos, samples)
    from token_cache import cached_load

    def load() -> Dataset:
        return load_split(data_dir, name, split, llm, eos, samples)

    return cached_load(cache_dir, load, files, (name, split, llm, eos, samples), write=write_cache,
                       what=f"{name} {split} rows")


def load_data(
    name: str,
    data_dir: str | Path,
    llm: str = "palm",
    eos: str = "</s>",
    fraction: float = 1.0,
    seed: int = 0,
    fixed_valid: bool = False,
    samples: bool = False,
    cache_dir: Path | None = None,
    write_cache: bool = True,
) -> DatasetDict:
    """train/valid/test as the paper's code prepares them.

    Train is the `fraction` of the train file drawn with `seed` (--subsample, --run); a dataset without a valid file
    then holds out 10% of that subsample as valid (seed 0), so valid shrinks with the fraction and changes with the
    seed, and train comes out shuffled even at 1.0. `fixed_valid` holds out 10% of the whole train file first (seed 0)
    and subsamples the rest: the same valid rows for every fraction and seed, but more of them than the budget.
    samples=True adds every teacher sample's rationale and label (llm_rationales, llm_labels) to each row.
    With a cache_dir, each split as read from its files is kept there and read back by later runs on the same files
    (token_cache.cached_load); write_cache=False only reads it.
    """
    from datasets import DatasetDict

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} not found: {_missing_data_hint(data_dir)}")
    names = split_names(data_dir, name)
    splits = DatasetDict({split: read_split(data_dir, name, split, llm, eos, samples, cache_dir, write_cache)
                          for split in names})
    if "valid" in names:
        splits["train"] = subsample(splits["train"], fraction, seed)
        return splits
    train = splits["train"]
    if fixed_valid:
        train, valid = hold_out_valid(train, name)
        train = subsample(train, fraction, seed)
    else:
        train, valid = hold_out_valid(subsample(train, fraction, seed), name)
    return DatasetDict({"train": train, "valid": valid, "test": splits["test"]})


def hold_out_valid(train: Dataset, name: str) -> tuple[Dataset, Dataset]:
    """(train, valid): 10% of the rows as valid, drawn with seed 0 as in the paper's code."""
    if len(train) < 10:
        raise DataError(f"{name}: train has {len(train)} rows (after --subsample); at least 10 are needed to hold out "
                        "10% as valid")
    parts = train.train_test_split(test_size=0.1, seed=0)
    return parts["train"], parts["test"]


def subsample(train: Dataset, fraction: float, seed: int) -> Dataset:
    """A fraction of train, drawn with the run's seed as in the paper (kept in the draw's order)."""
    if fraction >= 1.0:
        return train
    if int(len(train) * fraction) < 1:
        raise DataError(f"--subsample {fraction} of {len(train)} train rows keeps none; use a larger fraction")
    return train.train_test_split(test_size=1.0 - fraction, seed=seed)["train"]
