"""What makes a run the original's: its token ids, generation budget, comparison, flags that opt out, --dump_data.

Expected ids and texts below are what the original's tokenizer (transformers 4.30.2, tokenizers 0.13.3) gave on the
public T5 vocabulary.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5ForConditionalGeneration

import run
from config import DataConfig, RunConfig, StudentConfig, TrainingConfig
from conftest import SHARED_TOKENIZER
from train_utils import Evaluator, build_trainer, metric_name, training_arguments
from views import original_t5_pretokenization, tokenize_seq2seq, truncating_encoder


@pytest.fixture
def t5_vocabulary():
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip(f"the public T5 vocabulary is not at {SHARED_TOKENIZER}")
    return AutoTokenizer.from_pretrained(SHARED_TOKENIZER)


@pytest.mark.parametrize("text, ids", [("a ", [3, 9, 3, 1]), (" ", [3, 1]), ("P.</s>H. ", [276, 5, 1, 454, 5, 3, 1]),
                                       ("a  b", [3, 9, 3, 115, 1]), ("", [1])])
def test_t5_ids_are_the_originals(t5_vocabulary, text, ids):
    tokenizer = original_t5_pretokenization(t5_vocabulary)
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer(text, max_length=2, truncation=True)["input_ids"] == ids[:-1][:1] + [1]


def test_the_fix_leaves_the_callers_tokenizer_and_other_tokenizers_alone(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    space = tokenizer.convert_tokens_to_ids("▁")
    fixed = original_t5_pretokenization(tokenizer)
    assert fixed("apple ")["input_ids"] == tokenizer("apple")["input_ids"][:-1] + [space, 1]
    assert tokenizer("apple ")["input_ids"] == tokenizer("apple")["input_ids"], "the caller's tokenizer is unchanged"
    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert original_t5_pretokenization(other) is other


@pytest.mark.parametrize("max_length", [2, 5, 256])
@pytest.mark.parametrize("target", [False, True])
def test_the_backend_encoder_gives_the_calls_ids(t5_vocabulary, tiny_t5, max_length, target):
    """truncating_encoder, which calls a fast tokenizer's backend directly, gives what tokenizer(...) gives, truncation
    and trailing spaces included; a tokenizer with input and target modes keeps the call."""
    texts = ["a ", " ", "", "P.</s>H. ", "a  b", "explain: " + "word " * 40, "é ﬁ <pad> </s>"]
    key = "text_target" if target else "text"
    for tokenizer in (original_t5_pretokenization(t5_vocabulary), AutoTokenizer.from_pretrained(tiny_t5)):
        expected = tokenizer(**{key: texts}, max_length=max_length, truncation=True)["input_ids"]
        assert truncating_encoder(tokenizer, max_length, target)(texts) == expected
        assert tokenizer(**{key: texts})["input_ids"][5] != expected[5] or max_length == 256, "the call is unchanged"


def t5_args(**overrides) -> TrainingConfig:
    defaults = dict(no_log=True, eval_steps=1, save_total_limit=1, select_on="test", lr=1e-4, optimizer_name="AdamW",
                    max_steps=1, batch_size=2, eval_batch_size=None, grad_steps=1, seed=0, bf16=False,
                    model_type="task_prefix", alpha=0.5, gen_max_len=4, output_rationale=False, deepspeed=None)
    return TrainingConfig(**{**defaults, **overrides})


def test_gen_max_len_counts_the_start_token_and_golds_are_not_cut(tiny_t5, tmp_path):
    from datasets import Dataset, DatasetDict

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    long_gold = "apple tree " * 10
    split = Dataset.from_dict({"input": ["the apple", "a tree"], "label": [long_gold, "park"], "rationale": ["r", "s"]})
    tokenized = tokenize_seq2seq(DatasetDict({"train": split, "test": split}), tokenizer, "task_prefix", 64)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    args = t5_args()
    trainer, _ = build_trainer(args, training_arguments(args, tmp_path / "c", tmp_path / "l"), model, tokenizer,
                               tokenized, "text")
    calls = []
    generate = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs) or generate(**kwargs)
    batch = trainer.data_collator(list(tokenized["test"]))
    _, predictions, labels = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert calls[0]["max_new_tokens"] == 3, "the original's generation_max_length=4 allowed 3 new tokens"
    assert predictions.shape[1] == 4
    assert labels.shape[1] == len(tokenized["test"][0]["labels"]) > 4
    decoded = Evaluator(tokenizer, "text").decode(labels.cpu().numpy())
    assert decoded[0] == tokenizer.decode(tokenized["test"][0]["labels"], skip_special_tokens=True)


def test_predictions_are_compared_unstripped(t5_vocabulary):
    evaluator = Evaluator(t5_vocabulary, "text")
    assert evaluator.decode(np.array([[0, 3, 9, 3, 1, -100], [0, 3, 1, -100, -100, -100]])) == ["a ", ""]
    pair = argparse.Namespace(predictions=np.array([[0, 3, 9, 3, 1]]), label_ids=np.array([[3, 9, 1, -100, -100]]))
    score = evaluator(pair)
    assert score == {"accuracy": 0.0}, "'a ' and 'a' differ, as they did in the original"


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cqa", "--gen_max_len", "1"], "--gen_max_len counts the decoder's start token"),
    (["--dataset", "cqa", "--tolerant_equations"], "--tolerant_equations applies to equation answers"),
    (["--dataset", "asdiv", "--llm", "gpt"], "--llm gpt: the paper has no GPT-NeoX outputs for --dataset asdiv"),
])
def test_flag_mistakes_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_opt_outs_have_run_folders_of_their_own():
    def config_dir(**data) -> str:
        return RunConfig(
            data=DataConfig(dataset="svamp", llm="palm", subsample=0.5, label_type="gt", **data),
            student=StudentConfig(from_pretrained="t5", parallelize=False),
            training=TrainingConfig(model_type="task_prefix", alpha=0.5, max_input_length=1024, batch_size=64,
                                    grad_steps=1, optimizer_name="AdamW", lr=5e-5, select_on="test"),
        ).config_dir(data_parallel=1)

    faithful = config_dir(fixed_valid=False, tolerant_equations=False)
    assert config_dir(fixed_valid=True, tolerant_equations=True) == \
        f"{faithful}/fixed_valid/tolerant_equations"
    assert metric_name(run.parse_args(["--dataset", "svamp", "--tolerant_equations"]).data) == "equation_tolerant"


def svamp_folder(root: Path, rows: int = 20) -> Path:
    folder = root / "svamp"
    (folder / "llm").mkdir(parents=True)
    for split, n in (("train", rows), ("test", 3)):
        lines = [json.dumps({"input": f"There are {i} apples ", "label": f"( {i}.0 + 1.0 )"}) for i in range(n)]
        (folder / f"svamp_{split}.json").write_text("\n".join(lines) + "\n")
        outputs = [f"Add one. The answer is ({i} + 1)." for i in range(n)]
        (folder / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(outputs))
    (folder / "llm" / "train_CoT_1.json").write_text("[]")
    return root


def test_dump_data_writes_every_prepared_row_and_trains_nothing(tiny_t5, tmp_path, capsys):
    data = svamp_folder(tmp_path / "data")
    dump = tmp_path / "rows.jsonl"
    argv = ["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(data), "--subsample", "0.5",
            "--output_dir", str(tmp_path / "out"), "--dump_data", str(dump)]
    assert run.main(argv) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(r["split"], r["idx"]) for r in rows] == [("train", i) for i in range(9)] + [("valid", 0)] + \
        [("test", i) for i in range(3)]
    assert set(rows[0]) == {"split", "idx", "input", "label", "rationale", "input_ids", "labels", "expl_input_ids",
                            "rationale_labels"}
    tokenizer = original_t5_pretokenization(AutoTokenizer.from_pretrained(tiny_t5))
    for row in rows:
        assert row["input_ids"] == tokenizer("predict: " + row["input"])["input_ids"]
        assert row["expl_input_ids"] == tokenizer("explain: " + row["input"])["input_ids"]
        assert row["labels"] == tokenizer(row["label"])["input_ids"]
        assert row["rationale_labels"] == tokenizer(row["rationale"])["input_ids"]
    assert not (tmp_path / "out").exists(), "--dump_data trains nothing and writes no run folders"
    assert run.main(argv) == 1 and "already exists" in capsys.readouterr().err, "an earlier dump is never overwritten"
    standard = tmp_path / "standard.jsonl"
    assert run.main([*argv[:-1], str(standard), "--model_type", "standard", "--llm", "none"]) == 0
    assert set(json.loads(standard.read_text().splitlines()[0])) == {"split", "idx", "input", "label", "input_ids",
                                                                      "labels"}
