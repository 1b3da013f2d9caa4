"""Training step for step against the original's own: ../shared/parity/trajectory/ records, per optimizer step, what
the original code's Trainer (transformers 4.30.2) did on cqa with the benchmark's reference T5 (dropout off): the
batch's rows, the learning rate, the loss and the gradient norm before clipping. The project must agree on rows and
learning rate exactly and on loss and gradient norm to float32 rounding.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config

import run
from conftest import SHARED, SHARED_DATA, SHARED_TOKENIZER
from students import load_student
from train_utils import build_trainer, metric_name, run_splits, training_arguments
from views import tokenize_seq2seq

TRAJECTORIES = SHARED / "parity" / "trajectory"
# The reference student of ../shared/bench/make_ref_model.py, with dropout off as the trajectories were recorded.
REFERENCE_CONFIG = dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4,
                        num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
FIRST_STEP_TOLERANCE = 1e-6
STEP_TOLERANCE = 2e-5
COMMON_FLAGS = ["--dataset", "cqa", "--label_type", "llm", "--subsample", "1.0", "--run", "0", "--batch_size", "8",
                "--max_input_length", "256", "--max_steps", "40", "--lr", "5e-5", "--eval_steps", "100000",
                "--no_log", "--max_eval_samples", "8"]
CONFIGURATIONS = {
    "cqa_tp_llm_s1.0_r0": ["--model_type", "task_prefix", "--alpha", "0.5"],
    "cqa_std_llm_s1.0_r0": ["--model_type", "standard", "--llm", "palm"],
}


def reference_t5_weights(config: T5Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights transformers 4.30.2 gives T5ForConditionalGeneration(config) after torch.manual_seed(seed).

    Today's T5 draws its initial weights in another order (and ties the head), so 4.30's draws are replayed here:
    every layer's default initialisation as its constructor ran (Linear: Kaiming-uniform; Embedding: normal), each
    stack's own T5 initialisation right after it was built, then the embeddings and head once more.
    """
    d, kv, heads, inner = config.d_model, config.d_kv, config.num_heads, config.num_heads * config.d_kv
    torch.manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: int, columns: int) -> None:
        weights[name] = torch.nn.init.kaiming_uniform_(torch.empty(rows, columns), a=math.sqrt(5))

    weights["shared.weight"] = torch.empty(config.vocab_size, d).normal_()
    for stack, kinds, layers in (("encoder", ["SelfAttention"], config.num_layers),
                                 ("decoder", ["SelfAttention", "EncDecAttention"], config.num_decoder_layers)):
        attentions = [(i, f"{stack}.block.{i}.layer.{j}.{kind}", kind == "SelfAttention" and i == 0)
                      for i in range(layers) for j, kind in enumerate(kinds)]
        dense = [f"{stack}.block.{i}.layer.{len(kinds)}.DenseReluDense" for i in range(layers)]
        for i in range(layers):
            for _, prefix, relative in (a for a in attentions if a[0] == i):
                for name, rows, columns in (("q", inner, d), ("k", inner, d), ("v", inner, d), ("o", d, inner)):
                    linear(f"{prefix}.{name}.weight", rows, columns)
                if relative:
                    weights[f"{prefix}.relative_attention_bias.weight"] = torch.empty(
                        config.relative_attention_num_buckets, heads).normal_()
            for name, rows, columns in (("wi_0", config.d_ff, d), ("wi_1", config.d_ff, d), ("wo", d, config.d_ff)):
                linear(f"{dense[i]}.{name}.weight", rows, columns)
        for i in range(layers):
            for _, prefix, relative in (a for a in attentions if a[0] == i):
                for name, std in (("q", (d * kv) ** -0.5), ("k", d**-0.5), ("v", d**-0.5), ("o", inner**-0.5)):
                    weights[f"{prefix}.{name}.weight"].normal_(0.0, std)
                if relative:
                    weights[f"{prefix}.relative_attention_bias.weight"].normal_(0.0, d**-0.5)
            for name, std in (("wi_0", d**-0.5), ("wi_1", d**-0.5), ("wo", config.d_ff**-0.5)):
                weights[f"{dense[i]}.{name}.weight"].normal_(0.0, std)
            for j in range(len(kinds) + 1):
                weights[f"{stack}.block.{i}.layer.{j}.layer_norm.weight"] = torch.ones(d)
        weights[f"{stack}.final_layer_norm.weight"] = torch.ones(d)
    linear("lm_head.weight", config.vocab_size, d)
    weights["shared.weight"].normal_()
    weights["lm_head.weight"].normal_()
    return weights


@pytest.fixture(scope="module")
def reference_student(tmp_path_factory):
    if not (TRAJECTORIES.is_dir() and SHARED_DATA.is_dir() and SHARED_TOKENIZER.is_dir()):
        pytest.skip(f"the original's trajectories, data or T5 vocabulary are not in {SHARED}")
    folder = tmp_path_factory.mktemp("reference-t5")
    config = T5Config(**REFERENCE_CONFIG)
    config.save_pretrained(folder)
    save_file(reference_t5_weights(config), folder / "model.safetensors", metadata={"format": "pt"})
    for file in SHARED_TOKENIZER.iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def train_and_record(flags: list[str], output_dir) -> list[dict]:
    """Train as run.py does and record every optimizer step: rows, learning rate, loss, gradient norm."""
    config = run.parse_args([*flags, "--output_dir", str(output_dir)])
    training = config.training
    training_args = training_arguments(training, output_dir / "ckpt", output_dir / "logs")
    _, tokenizer, model = load_student(config.student, training.seed)
    splits = run_splits(config, tokenizer.eos_token)
    tokenized = tokenize_seq2seq(splits, tokenizer, training.model_type, training.max_input_length)
    tokenized["train"] = tokenized["train"].add_column("row", list(range(len(tokenized["train"]))))
    trainer, _ = build_trainer(training, training_args, model, tokenizer, tokenized, metric_name(config.data))
    steps: list[dict] = []
    collate, training_step = trainer.data_collator, trainer.training_step

    def recording_collate(features):
        if "row" in features[0]:  # a training batch
            steps.append({"row_idx": [feature["row"] for feature in features]})
        return collate(features)

    def recording_step(model, inputs, num_items_in_batch=None):
        steps[-1]["lr"] = trainer.optimizer.param_groups[0]["lr"]
        loss = training_step(model, inputs, num_items_in_batch)
        steps[-1]["loss"] = loss.item()
        steps[-1]["grad_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]).item()
        return loss

    trainer.data_collator, trainer.training_step = recording_collate, recording_step
    trainer.train()
    return steps[: trainer.state.global_step]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_training_follows_the_originals_trajectory(name, reference_student, tmp_path):
    expected = [json.loads(line) for line in (TRAJECTORIES / f"{name}.jsonl").read_text().splitlines()]
    flags = [*COMMON_FLAGS, *CONFIGURATIONS[name], "--from_pretrained", str(reference_student),
             "--data_dir", str(SHARED_DATA)]
    steps = train_and_record(flags, tmp_path)
    assert len(steps) == len(expected)
    for step, (ours, original) in enumerate(zip(steps, expected), start=1):
        assert ours["row_idx"] == original["row_idx"], f"step {step}: other rows"
        assert ours["lr"] == pytest.approx(original["lr"], rel=1e-12), f"step {step}: other learning rate"
        tolerance = FIRST_STEP_TOLERANCE if step == 1 else STEP_TOLERANCE
        for key in ("loss", "grad_norm"):
            assert ours[key] == pytest.approx(original[key], rel=tolerance), f"step {step}: {key}"
