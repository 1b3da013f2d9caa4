"""The collator's two views and the task-prefix loss, on the tiny T5."""


import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, T5ForConditionalGeneration

from model_utils import LABEL_PAD, StandardDataCollator, TaskPrefixDataCollator
from config import TrainingConfig
from train_utils import build_trainer, training_arguments
from views import tokenize_seq2seq

from conftest import SHARED_TOKENIZER


def test_vocabulary_encodes_ordinary_words(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    for text in ("the apple tree is in the park", "Where does a bum live? The train station.",
                 "Luke scored 84 points; ( 84.0 / 2.0 ) = 42 [x] {y} ~z"):
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text
    assert len(tokenizer) > 200, "a tokenizer of special tokens only means the SentencePiece model was not loaded"


def test_public_t5_vocabulary_loads_whole():
    if not (SHARED_TOKENIZER / "spiece.model").is_file():
        pytest.skip(f"public T5 vocabulary not found at {SHARED_TOKENIZER}")
    tokenizer = AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
    assert len(tokenizer) == 32100
    assert tokenizer.unk_token_id not in tokenizer("Where does a bum live? The train station.").input_ids


def splits_for(texts, labels, rationales):
    split = Dataset.from_dict({"input": texts, "label": labels, "rationale": rationales})
    return DatasetDict({"train": split, "test": split})


@pytest.fixture
def tokenizer(tiny_t5):
    return AutoTokenizer.from_pretrained(tiny_t5)


def test_collator_builds_both_views_padded_separately(tokenizer):
    splits = splits_for(
        ["the apple tree", "where does he live in the park with many trees"],
        ["park", "bus"],
        ["a short reason", "a much longer reason about the tree and the park and the bus station"],
    )
    rows = list(tokenize_seq2seq(splits, tokenizer, "task_prefix", 64)["train"])
    batch = TaskPrefixDataCollator(tokenizer)(rows)
    pred, expl = batch["pred"], batch["expl"]
    assert pred["input_ids"][0, :3].tolist() == tokenizer("predict: the apple tree").input_ids[:3]
    assert expl["input_ids"][0, :3].tolist() == tokenizer("explain: the apple tree").input_ids[:3]
    for view in (pred, expl):
        assert view["input_ids"].shape == view["attention_mask"].shape
        assert view["attention_mask"].sum(1).tolist() == [(row != tokenizer.pad_token_id).sum().item() for row in view["input_ids"]]
    assert expl["labels"].shape[1] > pred["labels"].shape[1], "rationales must not pad the label view"
    short = len(rows[0]["rationale_labels"])
    assert (expl["labels"][0, short:] == LABEL_PAD).all() and (expl["labels"][0, :short] != LABEL_PAD).all()
    assert expl["labels"][0, :short].tolist() == rows[0]["rationale_labels"]


def test_standard_collator_has_no_prefix_and_no_explain_view(tokenizer):
    rows = list(tokenize_seq2seq(splits_for(["the apple tree"], ["park"], ["r"]), tokenizer, "standard", 64)["train"])
    batch = StandardDataCollator(tokenizer)(rows)
    assert set(batch) == {"pred"}
    assert batch["pred"]["input_ids"][0].tolist() == tokenizer("the apple tree").input_ids


def test_inputs_and_targets_are_truncated(tokenizer):
    long_text = " ".join(["apple tree"] * 400)
    rows = tokenize_seq2seq(splits_for([long_text], [long_text], [long_text]), tokenizer, "task_prefix", 32)["train"]
    assert len(rows[0]["input_ids"]) == 32 and len(rows[0]["expl_input_ids"]) == 32
    assert len(rows[0]["labels"]) == 256 and len(rows[0]["rationale_labels"]) == 256


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_alpha_weighted_sum_of_two_separate_passes(tiny_t5, tokenizer, tmp_path, alpha):
    splits = splits_for(
        ["the apple tree", "where does he live", "kids played tag in the park"],
        ["park", "bus station", "tree"],
        ["apples grow on trees", "a bum lives near the bus", "tag is played in a park by kids"],
    )
    tokenized = tokenize_seq2seq(splits, tokenizer, "task_prefix", 64)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5)
    model.eval()
    args = TrainingConfig(
        no_log=True, eval_steps=1, save_total_limit=1, select_on="test", lr=1e-4, optimizer_name="AdamW",
        max_steps=1, batch_size=3, eval_batch_size=None, grad_steps=1, seed=0, bf16=False, model_type="task_prefix", alpha=alpha,
        gen_max_len=4, output_rationale=False, deepspeed=None,
    )
    training_args = training_arguments(args, tmp_path / "ckpt", tmp_path / "log")
    trainer, _ = build_trainer(args, training_args, model, tokenizer, tokenized, "text")
    batch = TaskPrefixDataCollator(tokenizer)(list(tokenized["train"]))
    with torch.no_grad():
        combined = trainer.compute_loss(model, batch)
        label_loss = model(**batch["pred"]).loss
        rationale_loss = model(**batch["expl"]).loss
    expected = alpha * label_loss + (1 - alpha) * rationale_loss
    torch.testing.assert_close(combined, expected, rtol=1e-6, atol=1e-6)
    assert not torch.isclose(label_loss, rationale_loss), "the views must differ for this test to mean anything"
