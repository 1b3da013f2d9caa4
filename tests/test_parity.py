"""Row-for-row, id-for-id parity with what the original code prepared (../shared/parity, see its README).

Each scenario runs `run.py --dump_data` with the public T5 vocabulary and compares every row: text, the predict-view
ids, the label ids, and for task_prefix the explain-view ids and rationale ids. Skipped where ../shared is absent.
"""

import gzip
import json
from pathlib import Path

import pytest

import run
from conftest import ROOT, SHARED_DATA, SHARED_TOKENIZER

PARITY = ROOT.parent / "shared" / "parity"
# The original's names for what --dump_data calls rationale_labels.
ID_FIELDS = {"input_ids": "input_ids", "labels": "labels", "expl_input_ids": "expl_input_ids",
             "rationale_labels": "aux_labels"}
SCENARIOS = sorted(path.name[: -len(".jsonl.gz")] for path in PARITY.glob("*.jsonl.gz"))
# The full-size cqa scenarios take longest; CI runs them (-m slow), a quick local run leaves them out.
SLOW = {"cqa-task_prefix-gt-1.0-0", "cqa-task_prefix-llm-1.0-0", "cqa-standard-gt-1.0-0"}
# What the original printed for the llm scenarios (the parity README; svamp with numpy 1.23, see README.md).
PRINTED = {"cqa-task_prefix-llm-1.0-0": ("0.7431", "0.7723"), "svamp-task_prefix-llm-1.0-0": ("0.7292", "0.7400"),
           "svamp-task_prefix-llm-0.5-2": ("0.7417", "0.7400")}


def read_rows(path: Path) -> list[dict]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def anli1_without_train(tmp_path: Path) -> Path:
    """The shared anli1 folder has valid and test only: link them beside a stand-in train split (its rows are not
    compared), so the run prepares valid exactly as it would with the real train file."""
    from data_utils import DATASETS

    folder = tmp_path / "anli1"
    (folder / "llm").mkdir(parents=True)
    for split in ("valid", "test"):
        (folder / f"anli1_{split}.json").symlink_to(SHARED_DATA / "anli1" / f"anli1_{split}.json")
        for chunk in (SHARED_DATA / "anli1" / "llm").glob(f"{split}_CoT_*.json"):
            (folder / "llm" / chunk.name).symlink_to(chunk)
    chunks = DATASETS["anli1"].chunks["train"]
    row = {"uid": "0", "premise": "P.", "hypothesis": "H.", "label": 0, "reason": ""}
    (folder / "anli1_train.json").write_text((json.dumps(row) + "\n") * chunks)
    for i in range(chunks):
        (folder / "llm" / f"train_CoT_{i}.json").write_text(json.dumps(["R. So the answer is neutral."]))
    return tmp_path


@pytest.mark.parametrize("scenario", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SCENARIOS]
                         or [pytest.param("none", marks=pytest.mark.skip(reason=f"no parity files in {PARITY}"))])
def test_dump_data_matches_the_original_row_for_row(scenario, tmp_path, capsys):
    if not SHARED_TOKENIZER.is_dir() or not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data and T5 vocabulary in {ROOT.parent / 'shared'}")
    dataset, model_type, label_type, fraction, seed = scenario.split("-")
    expected = read_rows(PARITY / f"{scenario}.jsonl.gz")
    data_dir = anli1_without_train(tmp_path) if dataset == "anli1" else SHARED_DATA
    dump = tmp_path / "dump.jsonl"
    argv = ["--dataset", dataset, "--model_type", model_type, "--label_type", label_type, "--subsample", fraction,
            "--run", seed, "--from_pretrained", str(SHARED_TOKENIZER), "--data_dir", str(data_dir),
            "--dump_data", str(dump)]
    assert run.main(argv) == 0
    rows = read_rows(dump)
    if dataset == "anli1":  # only valid is known for anli1 (see the parity README)
        rows = [row for row in rows if row["split"] == "valid"]
    assert [(r["split"], r["idx"]) for r in rows] == [(r["split"], r["idx"]) for r in expected]
    text_fields = ("input", "label", "rationale") if model_type == "task_prefix" else ("input", "label")
    id_fields = {k: v for k, v in ID_FIELDS.items() if model_type == "task_prefix" or k in ("input_ids", "labels")}
    for ours, theirs in zip(rows, expected):
        for field in text_fields:
            assert ours[field] == theirs[field], f"{ours['split']} row {ours['idx']}: {field} differs"
        for field, original_field in id_fields.items():
            assert ours[field] == theirs[original_field], f"{ours['split']} row {ours['idx']}: {field} differs"
    if scenario in PRINTED:
        train_acc, test_acc = PRINTED[scenario]
        assert f"LLM Train Acc: {train_acc}\nLLM Test Acc: {test_acc}\n" in capsys.readouterr().out
