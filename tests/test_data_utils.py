"""Parsers of teacher outputs and the per-dataset loaders, on synthetic files in the datasets.zip layout."""

import json
from pathlib import Path

import pytest

from data_utils import (
    BLANK,
    DataError,
    load_data,
    parse_anli,
    parse_cqa,
    parse_equation,
    parse_esnli,
    subsample,
)


def test_parse_cqa_cuts_at_next_exemplar_and_strips_choice_letter():
    output = (
        "The answer must be a place where a bum would live. So the answer is (c) train station.\n\n"
        "Q: What is this?\nAnswer Choices:\n(a) x\nA: blah. So the"
    )
    assert parse_cqa(output) == ("The answer must be a place where a bum would live.", "train station")


def test_parse_cqa_label_without_final_period_is_kept_whole():
    assert parse_cqa("Because. So the answer is (a) park") == ("Because.", "park")


@pytest.mark.parametrize("output", ["no marker at all", "", "So the answer is nothing", "x So the answer is (a) "])
def test_parse_cqa_unparseable_gives_blank_label(output):
    rationale, label = parse_cqa(output)
    assert label == BLANK
    assert isinstance(rationale, str)


def test_parse_cqa_two_markers_do_not_parse():
    assert parse_cqa("So the answer is (a) x. So the answer is (b) y.") == (BLANK, BLANK)


def test_parse_equation_takes_parenthesised_equation():
    output = "Luke scored 84 points in 2 rounds. 84 / 2 = 42. The answer is (84 / 2).\n\nQ: There are 120. A: The answer is (1 + 2)."
    assert parse_equation(output) == ("Luke scored 84 points in 2 rounds. 84 / 2 = 42.", "(84 / 2)")


def test_parse_equation_nested_parentheses_and_failures():
    assert parse_equation("x. The answer is ((3 + 4) * 2).")[1] == "((3 + 4) * 2)"
    assert parse_equation("x. The answer is 42.") == ("x.", BLANK)
    assert parse_equation("no answer here") == (BLANK, BLANK)


def test_parse_esnli_label_runs_to_premise():
    output = "The choir sings.\nAnswer: neutral\n\nPremise: This church.\nHypothesis: x\nAnswer: entailment"
    assert parse_esnli(output) == ("The choir sings.", "neutral")
    assert parse_esnli("no answer marker") == ("no answer marker", BLANK)


def test_parse_anli_drops_final_period_and_cuts_at_premise():
    output = "Oxford Street is in London. So the answer is contradiction.\n\nPremise: x\nAnswer: y. So the answer is neutral."
    assert parse_anli(output) == ("Oxford Street is in London.", "contradiction")
    assert parse_anli("garbage") == ("", ""), "the original's blank for anli is ''"
    assert parse_anli("R. So the answer is neutral") == ("R.", "neutra"), "the original drops the last character"


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_chunks(folder: Path, split: str, outputs: list[str], size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, max(len(outputs), 1), size):
        (folder / f"{split}_CoT_{i // size}.json").write_text(json.dumps(outputs[i : i + size]))


@pytest.fixture
def nli_dir(tmp_path, monkeypatch):
    """An anli1 folder with tiny chunks (chunk size patched to 2)."""
    import data_utils

    spec = data_utils.DATASETS["anli1"]
    patched = data_utils.DatasetSpec(**{**spec.__dict__, "chunk_size": 2, "chunks": {"train": 2, "valid": 1, "test": 1}})
    monkeypatch.setitem(data_utils.DATASETS, "anli1", patched)
    for split, n in (("train", 5), ("valid", 2), ("test", 2)):
        rows = [{"uid": str(i), "premise": f"P{i}.", "hypothesis": f"H{i}.", "label": i % 3, "reason": "r"} for i in range(n)]
        write_lines(tmp_path / "anli1" / f"anli1_{split}.json", rows)
        covered = min(n, 4) if split == "train" else n
        outputs = [f"Because {i}. So the answer is {['entailment', 'neutral', 'contradiction'][i % 3]}." for i in range(covered)]
        write_chunks(tmp_path / "anli1" / "llm", split, outputs, 2)
    return tmp_path


def test_nli_input_joins_premise_and_hypothesis_with_eos(nli_dir):
    splits = load_data("anli1", nli_dir, llm="palm", eos="</s>")
    assert splits["test"]["input"] == ["P0.</s>H0.", "P1.</s>H1."]
    assert splits["test"]["label"] == ["entailment", "neutral"]
    assert splits["test"]["llm_label"] == ["entailment", "neutral"]
    assert splits["test"]["llm_rationale"] == ["Because 0.", "Because 1."]


def test_train_is_cut_to_rows_the_teacher_covered(nli_dir):
    splits = load_data("anli1", nli_dir, llm="palm")
    assert len(splits["train"]) == 4
    assert len(load_data("anli1", nli_dir, llm="none")["train"]) == 5
    assert "llm_label" not in load_data("anli1", nli_dir, llm="none")["train"].column_names


def test_teacher_count_mismatch_names_split_and_counts(nli_dir):
    (nli_dir / "anli1" / "llm" / "test_CoT_0.json").write_text(json.dumps(["only one"]))
    with pytest.raises(DataError, match=r"anli1 test: 1 teacher outputs .* for 2 data rows"):
        load_data("anli1", nli_dir)


def test_teacher_file_not_a_list_of_strings(nli_dir):
    (nli_dir / "anli1" / "llm" / "test_CoT_0.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="test_CoT_0.json: expected a JSON list of strings"):
        load_data("anli1", nli_dir)


def test_malformed_json_line_names_file_and_line(nli_dir):
    path = nli_dir / "anli1" / "anli1_valid.json"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"anli1_valid.json:3: not valid JSON"):
        load_data("anli1", nli_dir)


def test_missing_field_is_named(nli_dir):
    write_lines(nli_dir / "anli1" / "anli1_test.json", [{"premise": "p", "label": 0}, {"premise": "p", "label": 0}])
    with pytest.raises(DataError, match="row 1 lacks field.*hypothesis"):
        load_data("anli1", nli_dir)


def test_missing_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match="datasets.zip"):
        load_data("cqa", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"cqa_train.json.*--data_dir"):
        load_data("cqa", tmp_path)


def test_cqa_input_layout_and_valid_split(tmp_path):
    rows = [
        {"id": str(i), "question": f"Q{i}?", "choices": ["a1", "b1", "c1", "d1", "e1"], "answer": "c1",
         "abstractive_explanation": "", "extractive_explanation": ""}
        for i in range(20)
    ]
    write_lines(tmp_path / "cqa" / "cqa_train.json", rows)
    write_lines(tmp_path / "cqa" / "cqa_test.json", rows[:3])
    splits = load_data("cqa", tmp_path, llm="none")
    assert splits["test"]["input"][0] == "Q0?\nAnswer Choices:\n(a) a1\n(b) b1\n(c) c1\n(d) d1\n(e) e1"
    assert splits["test"]["label"] == ["c1"] * 3
    assert (len(splits["train"]), len(splits["valid"])) == (18, 2)
    again = load_data("cqa", tmp_path, llm="none")
    assert again["valid"]["input"] == splits["valid"]["input"], "valid split must be drawn with a fixed seed"


def test_asdiv_trains_on_svamp_and_asdiv_and_tests_on_svamp(tmp_path):
    write_lines(tmp_path / "svamp" / "svamp_train.json", [{"input": f"s{i}", "label": f"( {i}.0 + 1.0 )"} for i in range(10)])
    write_lines(tmp_path / "svamp" / "svamp_test.json", [{"input": "t0", "label": "( 1.0 + 1.0 )"}])
    write_lines(
        tmp_path / "asdiv" / "asdiv_train.json",
        [{"Body": f"Body {i}.", "Question": "How many?", "Formula": "1+1=2", "Answer": f"{i} (apples)"} for i in range(10)],
    )
    splits = load_data("asdiv", tmp_path, llm="none")
    inputs = list(splits["train"]["input"]) + list(splits["valid"]["input"])
    assert len(inputs) == 20 and "s3" in inputs and "Body 4.\nHow many?" in inputs
    labels = dict(zip(inputs, list(splits["train"]["label"]) + list(splits["valid"]["label"])))
    assert labels["Body 4.\nHow many?"] == "4"
    assert splits["test"]["input"] == ["t0"]


def test_gpt_outputs_read_from_gpt_neox_folder(tmp_path):
    write_lines(tmp_path / "svamp" / "svamp_train.json", [{"input": f"s{i}", "label": "( 1.0 + 1.0 )"} for i in range(10)])
    write_lines(tmp_path / "svamp" / "svamp_test.json", [{"input": "t0", "label": "( 1.0 + 1.0 )"}])
    (tmp_path / "gpt-neox" / "svamp").mkdir(parents=True)
    (tmp_path / "gpt-neox" / "svamp" / "train.json").write_text(json.dumps(["R. The answer is (1 + 1)."] * 10))
    (tmp_path / "gpt-neox" / "svamp" / "test.json").write_text(json.dumps(["R. The answer is (2)."]))
    splits = load_data("svamp", tmp_path, llm="gpt")
    assert splits["test"]["llm_label"] == ["(2)"]
    assert set(splits["train"]["llm_rationale"]) == {"R."}


def test_subsample_is_seeded_by_run():
    from datasets import Dataset

    train = Dataset.from_dict({"input": [str(i) for i in range(100)], "label": ["x"] * 100})
    a, b, c = subsample(train, 0.25, 0), subsample(train, 0.25, 0), subsample(train, 0.25, 1)
    assert len(a) == 25 and a["input"] == b["input"] and a["input"] != c["input"]
    assert subsample(train, 1.0, 0) is train


# ---- the original's rules, where they differ from the obvious ----


def test_parsers_keep_the_originals_blanks_and_cuts():
    assert parse_esnli("  R.\nAnswer:  neutral \n\nPremise: x") == ("  R.", " neutral"), "label only right-stripped"
    assert parse_esnli("Answer: entailment") == ("", "entailment"), "an empty rationale stays empty"
    assert parse_equation("R. The answer is 42.") == ("R.", BLANK)
    assert parse_cqa("R. So the answer is (a) .") == ("R.", ""), "the original strips, then drops the final period"


def test_gpt_parsers_follow_the_originals_gpt_rules():
    from data_utils import DATASETS, parse_anli_gpt, parse_cqa_gpt, parse_equation_gpt, parse_esnli_gpt

    assert parse_cqa_gpt("  \n R. So the answer is (b) park.\n\nQ: next") == ("R.", "park")
    assert parse_cqa_gpt("no marker") == (BLANK, BLANK) and parse_cqa("\n R. So the answer is (b) x")[0] == "\n R."
    assert parse_equation_gpt(" R. The answer is (1 + 2).") == ("R.", "(1 + 2)")
    assert parse_esnli_gpt(" R.\nAnswer: neutral") == ("R.", "neutral")
    assert parse_anli_gpt(" R. The answer is neutral.\n\nPremise: x") == ("R.", "neutral"), "'The answer is' too"
    assert parse_anli("R. The answer is neutral.") == ("", ""), "PaLM's anli parser has no fallback"
    assert parse_anli_gpt("nothing") == ("", "")
    assert DATASETS["asdiv"].parse_gpt is None, "the paper has no GPT-NeoX outputs for asdiv"


def test_gpt_parser_is_the_one_used_for_llm_gpt(tmp_path):
    rows = [{"input": f"s{i}", "label": "( 1.0 + 1.0 )"} for i in range(10)]
    write_lines(tmp_path / "svamp" / "svamp_train.json", rows)
    write_lines(tmp_path / "svamp" / "svamp_test.json", rows[:1])
    (tmp_path / "gpt-neox" / "svamp").mkdir(parents=True)
    (tmp_path / "gpt-neox" / "svamp" / "train.json").write_text(json.dumps(["R. The answer is (1 + 1)."] * 10))
    (tmp_path / "gpt-neox" / "svamp" / "test.json").write_text(json.dumps(["\n  R. The answer is (2)."]))
    assert load_data("svamp", tmp_path, llm="gpt")["test"]["llm_rationale"] == ["R."]


def cqa_rows(n: int) -> list[dict]:
    return [{"id": str(i), "question": f"Q{i}?", "choices": ["a", "b", "c", "d", "e"], "answer": "c",
             "abstractive_explanation": "", "extractive_explanation": ""} for i in range(n)]


@pytest.mark.parametrize("fraction, seed", [(1.0, 0), (0.5, 1), (0.25, 3)])
def test_subsample_then_valid_in_the_originals_order(tmp_path, fraction, seed):
    """The original (parity README): subsample = a numpy default_rng(seed) permutation without its first
    ceil((1 - fraction) * n) positions; valid = the first ceil(0.1 * m) positions of a default_rng(0) permutation of
    that subsample, train the rest, both in permuted order."""
    import math

    import numpy as np

    n = 40
    write_lines(tmp_path / "cqa" / "cqa_train.json", cqa_rows(n))
    write_lines(tmp_path / "cqa" / "cqa_test.json", cqa_rows(3))
    questions = [f"Q{i}?" for i in range(n)]
    kept = questions
    if fraction < 1.0:
        kept = [questions[i] for i in np.random.default_rng(seed).permutation(n)[math.ceil((1 - fraction) * n):]]
    order = [kept[i] for i in np.random.default_rng(0).permutation(len(kept))]
    cut = math.ceil(0.1 * len(kept))
    splits = load_data("cqa", tmp_path, llm="none", fraction=fraction, seed=seed)
    assert [text.split("\n")[0] for text in splits["valid"]["input"]] == order[:cut]
    assert [text.split("\n")[0] for text in splits["train"]["input"]] == order[cut:]


def test_fixed_valid_is_the_same_rows_for_every_fraction_and_seed(tmp_path):
    write_lines(tmp_path / "cqa" / "cqa_train.json", cqa_rows(100))
    write_lines(tmp_path / "cqa" / "cqa_test.json", cqa_rows(3))
    runs = [load_data("cqa", tmp_path, llm="none", fraction=f, seed=s, fixed_valid=True) for f, s in ((1, 0), (0.5, 2))]
    assert runs[0]["valid"]["input"] == runs[1]["valid"]["input"] and len(runs[0]["valid"]) == 10
    assert (len(runs[0]["train"]), len(runs[1]["train"])) == (90, 45)
    assert not set(runs[1]["train"]["input"]) & set(runs[1]["valid"]["input"])
    faithful = load_data("cqa", tmp_path, llm="none", fraction=0.5, seed=2)
    assert (len(faithful["train"]), len(faithful["valid"])) == (45, 5), "the original: valid is 10% of the subsample"
