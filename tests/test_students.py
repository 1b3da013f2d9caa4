"""Any student (students.py): T5-, BART-, GPT-2-, Llama- and Qwen2-shaped tiny random models, fully and with LoRA."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import predict
import run
from config import TrainingConfig
from conftest import train_until_killed
from fast_loss import causal_fast_loss_applies
from model_utils import LABEL_PAD, CausalViewsCollator, one_pass_per_view
from students import family_of, load_pretrained
from train_utils import build_trainer, training_arguments
from views import SEPARATOR, VIEWS, tokenize_causal

ROWS = {
    "input": ["Where would you find a bus? Answer Choices: (a) station (b) tree (c) park",
              "the apple tree is in the park, what grows on it?", "kids played tag in the garden"],
    "label": ["station", "apples", "garden"],
    "rationale": ["a bus stops at a station", "apples grow on apple trees and more words about trees here", "tag"],
}
FAMILY = {"t5": "seq2seq", "bart": "seq2seq", "gpt2": "causal", "llama": "causal", "qwen2": "causal"}


def splits() -> DatasetDict:
    split = Dataset.from_dict(ROWS)
    return DatasetDict({"train": split, "test": split})


def trainer_args(alpha: float, model_type: str = "task_prefix") -> TrainingConfig:
    return TrainingConfig(
        no_log=True, eval_steps=1, save_total_limit=1, select_on="test", lr=1e-4, optimizer_name="AdamW",
        max_steps=1, batch_size=3, eval_batch_size=None, grad_steps=1, seed=0, bf16=False, model_type=model_type,
        alpha=alpha, gen_max_len=4, output_rationale=False, deepspeed=None,
    )


@pytest.mark.parametrize("kind", FAMILY)
def test_family_is_read_from_the_config(tiny_students, kind):
    family, tokenizer, model = load_pretrained(str(tiny_students[kind]))
    assert family.name == FAMILY[kind] == family_of(model.config).name
    expected = AutoModelForSeq2SeqLM if family.name == "seq2seq" else AutoModelForCausalLM
    assert type(model) is type(expected.from_pretrained(tiny_students[kind]))
    assert tokenizer.pad_token_id is not None
    # Premise and hypothesis: joined by T5's </s> as in the paper, by a newline in a decoder-only prompt.
    assert family.segment_joiner(tokenizer) == (tokenizer.eos_token if family.name == "seq2seq" else "\n")


def test_decoder_only_views_are_prompt_separator_target_eos(tiny_students):
    tokenizer = AutoTokenizer.from_pretrained(tiny_students["gpt2"])
    tokenizer.pad_token = tokenizer.eos_token  # as load_pretrained does for GPT-2: pad is EOS
    rows = list(tokenize_causal(splits(), tokenizer, "task_prefix", 64)["train"])
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    eos = tokenizer.eos_token_id
    for row, text, label, rationale in zip(rows, ROWS["input"], ROWS["label"], ROWS["rationale"]):
        assert row["input_ids"] == encode(f"predict: {text}") + encode(SEPARATOR)
        assert row["expl_input_ids"] == encode(f"explain: {text}") + encode(SEPARATOR)
        assert row["labels"] == encode(label) + [eos] and row["rationale_labels"] == encode(rationale) + [eos]
    batch = CausalViewsCollator(tokenizer)(rows)
    for view, prompt_key, target_key in VIEWS:
        train, prompt = batch[view], batch[view + "_prompt"]
        for i, row in enumerate(rows):
            n_prompt, n_target = len(row[prompt_key]), len(row[target_key])
            n = n_prompt + n_target
            assert train["input_ids"][i, :n].tolist() == row[prompt_key] + row[target_key]
            # Padding is EOS here, yet the mask and labels see only the row's own tokens, its final EOS included.
            assert train["attention_mask"][i].tolist() == [1] * n + [0] * (train["input_ids"].shape[1] - n)
            assert train["labels"][i].tolist() == ([LABEL_PAD] * n_prompt + row[target_key]
                                                   + [LABEL_PAD] * (train["labels"].shape[1] - n))
            width = prompt["input_ids"].shape[1]
            assert prompt["input_ids"][i, width - n_prompt :].tolist() == row[prompt_key]  # left-padded
            assert prompt["attention_mask"][i].tolist() == [0] * (width - n_prompt) + [1] * n_prompt
            assert prompt["labels"][i, :n_target].tolist() == row[target_key]
    standard = list(tokenize_causal(splits(), tokenizer, "standard", 64)["train"])
    assert "expl" not in CausalViewsCollator(tokenizer)(standard)


def test_chat_template_wraps_the_prompt_and_the_target_ends_the_turn(tiny_students):
    tokenizer = AutoTokenizer.from_pretrained(tiny_students["qwen2"])
    [row] = list(tokenize_causal(DatasetDict({"t": Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})}),
                                 tokenizer, "task_prefix", 64, chat_template=True)["t"])
    assert tokenizer.decode(row["input_ids"]) == (
        f"<|im_start|>user\npredict: {ROWS['input'][0]}<|im_end|>\n<|im_start|>assistant\n")
    assert row["labels"][-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def hand_loss(model, batch: dict, view: str) -> torch.Tensor:
    """Mean token cross-entropy of one view, from the full logits, written out position by position."""
    inputs = batch[view]
    if model.config.is_encoder_decoder:
        logits = model(**inputs).logits  # position t predicts labels[t]
        targets = inputs["labels"]
    else:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
    terms = [-F.log_softmax(logits[i, t], dim=-1)[targets[i, t]]
             for i in range(targets.shape[0]) for t in range(targets.shape[1]) if targets[i, t] != LABEL_PAD]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("kind", FAMILY)
def test_loss_equals_the_hand_computed_reference(tiny_students, tmp_path, kind):
    alpha = 0.2
    family, tokenizer, model = load_pretrained(str(tiny_students[kind]))
    model.eval()
    tokenized = family.tokenize(splits(), tokenizer, "task_prefix", 64)
    trainer, _ = build_trainer(trainer_args(alpha), training_arguments(trainer_args(alpha), tmp_path, tmp_path / "l"),
                               model, tokenizer, tokenized, "text")
    batch = trainer.data_collator(list(tokenized["train"]))
    with torch.no_grad():
        label_loss, rationale_loss = hand_loss(model, batch, "pred"), hand_loss(model, batch, "expl")
        expected = alpha * label_loss + (1 - alpha) * rationale_loss
        fast = trainer.compute_loss(model, batch)
        plain = one_pass_per_view(model, [batch["pred"], batch["expl"]], [alpha, 1 - alpha])[0]
    assert not torch.isclose(label_loss, rationale_loss), "the views must differ for this test to mean anything"
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=0)
    # The fused head loss is what T5 and the decoder-only students train with; BART takes the plain formulation.
    assert trainer.fast_loss_applies(model) == (kind != "bart")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_fast_loss_gradients_match_the_plain_formulation(tiny_students, tmp_path, kind):
    family, tokenizer, model = load_pretrained(str(tiny_students[kind]))
    model.eval()
    assert causal_fast_loss_applies(model)
    tokenized = family.tokenize(splits(), tokenizer, "task_prefix", 64)
    batch = CausalViewsCollator(tokenizer)(list(tokenized["train"]))
    grads = []
    views, weights = [batch["pred"], batch["expl"]], [0.4, 0.6]
    for loss_fn in (lambda: one_pass_per_view(model, views, weights)[0],
                    lambda: family.fast_loss(model, views, weights)):
        model.zero_grad()
        loss_fn().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_generation_equals_one_row_at_a_time(tiny_students, kind):
    from students import causal_generate

    _, tokenizer, model = load_pretrained(str(tiny_students[kind]))
    model.eval()
    texts = ["predict: " + text for text in ROWS["input"]]
    together = causal_generate(tokenizer, model, texts, 64, 6)
    assert together == [causal_generate(tokenizer, model, [text], 64, 6)[0] for text in texts]
    assert any(together), "random weights must generate something for this test to mean anything"


# ---- whole runs ----

def custom_data(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """<root>/custom/ in the format users write: input, label and the row's own rationale."""
    inputs = ROWS["input"] * 6
    for split, rows in (("train", range(n_train)), ("test", range(n_test))):
        lines = [json.dumps({"input": f"{inputs[i]} ({i})", "label": ROWS["label"][i % 3],
                             "rationale": ROWS["rationale"][i % 3]}) for i in rows]
        (root / "custom").mkdir(parents=True, exist_ok=True)
        (root / "custom" / f"custom_{split}.json").write_text("\n".join(lines) + "\n")
    return root


def run_flags(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "custom", "--llm", "dataset", "--from_pretrained", str(student), "--data_dir", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--max_steps", "4", "--eval_steps", "2", "--gen_max_len",
            "4", "--max_input_length", "64", "--lr", "1e-3", "--no_log", *extra]


def only_record(out: Path) -> dict:
    [path] = list(out.glob("ckpts/**/results.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("kind, extra", [
    ("bart", ()), ("qwen2", ("--chat_template",)), ("gpt2", ("--model_type", "standard", "--gradient_checkpointing")),
    ("llama", ("--lora_r", "4", "--output_rationale")), ("t5", ("--lora_r", "4", "--gradient_checkpointing")),
])
def test_a_short_run_trains_evaluates_saves_reloads_and_predicts(tiny_students, tmp_path, capsys, kind, extra):
    data = custom_data(tmp_path / "data")
    assert run.main(run_flags(tiny_students[kind], data, tmp_path / "out", *extra)) == 0
    out = capsys.readouterr().out
    record = only_record(tmp_path / "out")
    student = record["student"]
    assert student["family"] == FAMILY[kind] and f"{student['trainable_parameters']:,} of" in out
    assert [e["step"] for e in record["evaluations"]] == [2, 4]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in record["evaluations"])
    assert record["config_dir"].split("/")[1] == f"tiny-{kind}0"
    assert record["config_dir"].endswith("/chat_template") == ("--chat_template" in extra)
    best = tmp_path / "out" / "ckpts" / record["config_dir"] / "0" / "best"
    auto = AutoModelForSeq2SeqLM if FAMILY[kind] == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(best)  # plain from_pretrained, LoRA runs included (the merged model)
    assert model.config.model_type == kind
    flags = ["--no_prefix"] if "standard" in extra else ["--rationale"]
    flags += ["--chat_template"] if "--chat_template" in extra else []
    code = predict.main(["--model", str(best), "--max_new_tokens", "3", "--json", *flags, "where do apples grow?",
                         "a bus?"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [row["input"] for row in rows] == ["where do apples grow?", "a bus?"]
    if "--lora_r" in extra:
        assert student["lora"]["r"] == 4 and student["trainable_parameters"] < student["total_parameters"] / 3
        assert record["config_dir"].endswith("/lora_r4_a16_d0.05_default")
        assert (best / "adapter" / "adapter_config.json").is_file() and not (best / "adapter_config.json").exists()
        assert predict.main(["--model", str(best / "adapter"), "--max_new_tokens", "3", "--json", "--rationale",
                             "where do apples grow?", "a bus?"]) == 0
        assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    if "--output_rationale" in extra:
        predictions = (best.parent / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 4 and "pred_rationale" in json.loads(predictions[0])


def test_lora_changes_only_adapters_and_a_resumed_run_ends_the_same(tiny_students, tmp_path):
    data = custom_data(tmp_path / "data")
    lora = ["--lora_r", "4", "--lora_dropout", "0", "--lora_targets", "q_proj", "v_proj", "--max_steps", "6"]

    def argv(out: Path, *extra: str) -> list[str]:
        return run_flags(tiny_students["qwen2"], data, out, *lora, *extra)

    assert run.main(argv(tmp_path / "whole")) == 0
    whole = only_record(tmp_path / "whole")
    assert whole["student"]["lora"]["targets"] == ["q_proj", "v_proj"]

    base = AutoModelForCausalLM.from_pretrained(tiny_students["qwen2"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "ckpts" / whole["config_dir"] / "0" / "best")
    changed = {name for name, value in merged.state_dict().items() if not torch.equal(value, base[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)

    train_until_killed(argv(tmp_path / "killed"), lambda step: step == 5)
    assert not list((tmp_path / "killed").glob("ckpts/**/results.json"))
    assert run.main(argv(tmp_path / "killed", "--resume")) == 0
    resumed = only_record(tmp_path / "killed")
    assert resumed["resumed"] is True
    def trajectory(record: dict) -> list[tuple]:
        return [(e["step"], round(e["train_loss"], 6), e["test_accuracy"]) for e in record["evaluations"]]

    assert trajectory(resumed) == trajectory(whole)


def test_flag_errors(tiny_students, tmp_path, capsys):
    data = custom_data(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(run_flags(tiny_students["t5"], data, tmp_path, "--lora_targets", "q"))
    assert exit_info.value.code == 2 and "--lora_r" in capsys.readouterr().err
    assert run.main(run_flags(tiny_students["bart"], data, tmp_path, "--chat_template")) == 1
    assert "--chat_template is for decoder-only students" in capsys.readouterr().err
    assert run.main(run_flags(tiny_students["gpt2"], data, tmp_path, "--lora_r", "2", "--lora_targets", "nope")) == 1
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("error: --lora_targets: ") and "nope" in last_line


def test_summary_names_the_student_and_keeps_lora_runs_apart(tmp_path, capsys):
    import summarize

    def write(name: str, accuracy: float, **config) -> None:
        config = {"dataset": "cqa", "from_pretrained": "/models/Qwen2.5-0.5B/", "model_type": "task_prefix",
                  "label_type": "llm", "llm": "palm", "alpha": 0.5, "subsample": 1.0, "run": 0, "lr": 5e-5,
                  "select_on": "test", "lora_r": None, "lora_targets": None, **config}
        path = tmp_path / "runs" / name / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"config": config, "selected_test_accuracy": accuracy}))

    write("full", 0.5)
    write("lora", 0.7, lora_r=8, lora_targets=["q_proj", "v_proj"])
    assert summarize.main([str(tmp_path / "runs"), "--out", str(tmp_path / "summary")]) == 0
    markdown = capsys.readouterr().out
    assert "## cqa, Qwen2.5-0.5B (lora_r=None, lora_targets=None)" in markdown
    assert "## cqa, Qwen2.5-0.5B, LoRA r=8 (lora_r=8, lora_targets=('q_proj', 'v_proj'))" in markdown
    assert "| dss_llm | 50.00 (n=1) |" in markdown and "| dss_llm | 70.00 (n=1) |" in markdown


def test_causal_fast_loss_under_bf16_autocast_matches_the_plain_formulation(tiny_students):
    family, tokenizer, model = load_pretrained(str(tiny_students["llama"]))
    model.eval()
    batch = CausalViewsCollator(tokenizer)(list(family.tokenize(splits(), tokenizer, "task_prefix", 64)["train"]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        views, weights = [batch["pred"], batch["expl"]], [0.5, 0.5]
        fast = family.fast_loss(model, views, weights)
        plain = one_pass_per_view(model, views, weights)[0]
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain.float(), rtol=2e-2, atol=0)


@pytest.mark.slow
def test_torchrun_trains_a_lora_decoder_only_student(tiny_students, tmp_path):
    import os
    import subprocess

    from test_distributed import torchrun

    data = custom_data(tmp_path / "data", n_test=5)
    out = tmp_path / "out"
    cmd = [*torchrun(), "run.py", *run_flags(tiny_students["qwen2"], data, out, "--lora_r", "4", "--output_rationale",
                                             "--batch_size", "2", "--eval_batch_size", "2")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = only_record(out)
    assert record["world_size"] == 2 and record["effective_batch_size"] == 4
    run_dir = out / "ckpts" / record["config_dir"] / "0"
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test_rows = (data / "custom" / "custom_test.json").read_text().splitlines()
    test_inputs = [json.loads(line)["input"] for line in test_rows]
    assert sorted(row["input"] for row in predictions) == sorted(test_inputs), "each test row scored exactly once"
    assert (run_dir / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(run_dir / "best").config.model_type == "qwen2"


def test_models_that_transform_logits_after_the_head_take_the_plain_formulation(tiny_students):
    _, _, model = load_pretrained(str(tiny_students["llama"]))
    assert causal_fast_loss_applies(model)
    model.config.final_logit_softcapping = 30.0
    assert not causal_fast_loss_applies(model)


def test_sweep_passes_student_flags_and_keeps_lora_runs_apart(tiny_students, tmp_path, capsys):
    import sweep

    common = ["--methods", "dss_gt", "--fractions", "1.0", "--dataset", "custom", "--llm", "dataset",
              "--from_pretrained", str(tiny_students["qwen2"]), "--output_dir", str(tmp_path)]
    assert sweep.main(["--print", *common, "--lora_r", "8", "--chat_template"]) == 0
    [command] = capsys.readouterr().out.splitlines()
    assert "--lora_r 8 --chat_template" in command
    [lora_argv], [full_argv] = sweep.run_argvs(*sweep.parse_args([*common, "--lora_r", "8"])), sweep.run_argvs(
        *sweep.parse_args(common))
    lora, full = sweep.results_path(lora_argv), sweep.results_path(full_argv)
    assert lora != full and "lora_r8_a16_d0.05_default" in lora.parts and "tiny-qwen20" in full.parts
