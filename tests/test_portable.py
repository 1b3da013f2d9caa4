"""A trained student is the same model wherever it is loaded (portable.py), and predict.py gives, row for row, the
prediction the run's evaluation recorded.

The round trip trains tiny students of every family (T5 with its own head, a LoRA T5's merged best/, BART, GPT-2,
Llama, Qwen2), then loads each best/ under an older transformers, in an environment built here from the package
registry beside the project's torch (cached in ~/.cache/dss-compat), and compares token ids, greedy generations and
logits with what the project computes from the same folder. Where that environment cannot be built (no uv, no
registry) those tests skip and say why.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import predict
import run
from conftest import SHARED_DATA, SHARED_TOKENIZER, build_tiny_t5
from load_probe import probe
from portable import legacy_tokenizer_json, portable_config, portable_tokenizer_config

PROBE = Path(__file__).with_name("load_probe.py")
# Older transformers a saved student must load in: the paper's 4.30.2 (with the tokenizers and numpy it ran on) and
# the last 4.x release. Each lists the student shapes it has: 4.30.2 predates Qwen2 (4.37) and Llama's grouped-query
# attention (4.31), which the tiny Llama uses.
OLD_TRANSFORMERS = {
    "4.30.2": (("transformers==4.30.2", "tokenizers==0.13.3", "numpy==1.26.4"), ("t5", "t5_lora", "bart", "gpt2")),
    "4.57.6": (("transformers==4.57.6",), ("t5", "t5_lora", "bart", "gpt2", "llama", "qwen2")),
}
# Token ids, generations and logits are compared; logits may differ by float rounding in a different code path.
LOGITS_TOLERANCE = 1e-4
GEN_MAX_LEN = 8
MAX_INPUT_LENGTH = 64
# Inputs as users write them, with the whitespace on which transformers 5's T5 tokenizer differs from the paper's.
INPUTS = [
    "Where would you find a bus?\nAnswer Choices:\n(a) station\n(b) tree",
    "the apple tree is in the park, what grows on it? ",
    "premise: kids played tag  in the garden </s> hypothesis: children play ",
    "Luke scored 84 points in 2 rounds. How many points per round?",
    "how many books",
    " ",
]
# Per student: its shape in the tiny_students fixture and the run's extra flags.
RUNS = {
    "t5": ("t5", ()),
    "t5_lora": ("t5", ("--lora_r", "4")),
    "bart": ("bart", ()),
    "gpt2": ("gpt2", ()),
    "llama": ("llama", ()),
    "qwen2": ("qwen2", ("--chat_template",)),
}


def write_custom_data(root: Path) -> Path:
    rows = [{"input": text, "label": ["station", "apples", "garden"][i % 3], "rationale": f"because of row {i}"}
            for i, text in enumerate(INPUTS * 2)]
    (root / "custom").mkdir(parents=True)
    for split, chosen in (("train", rows), ("test", rows[: len(INPUTS)])):
        (root / "custom" / f"custom_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return root


def train(student: Path, data_dir: Path, out: Path, dataset: str, *extra: str) -> Path:
    """A short run with --output_rationale; returns its run folder (best/, predictions.jsonl)."""
    argv = ["--dataset", dataset, "--from_pretrained", str(student), "--data_dir", str(data_dir),
            "--output_dir", str(out), "--batch_size", "4", "--max_steps", "2", "--eval_steps", "2",
            "--gen_max_len", str(GEN_MAX_LEN), "--max_input_length", str(MAX_INPUT_LENGTH), "--lr", "1e-4",
            "--no_log", "--output_rationale", *extra]
    assert run.main(argv) == 0
    [results] = list(out.glob("ckpts/**/results.json"))
    return results.parent


@pytest.fixture(scope="session")
def trained(tiny_students, tmp_path_factory) -> dict[str, Path]:
    """Run folders of short runs, one per entry of RUNS, on rows that include INPUTS."""
    root = tmp_path_factory.mktemp("portable")
    data = write_custom_data(root / "data")
    return {name: train(tiny_students[shape], data, root / name, "custom", "--llm", "dataset", *extra)
            for name, (shape, extra) in RUNS.items()}


# ---- what the saved folder holds (offline) ----


def test_best_states_the_head_and_holds_tokenizer_files_older_versions_read(trained):
    t5 = trained["t5"] / "best"
    config = json.loads((t5 / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["scale_decoder_outputs"] is False
    assert (t5 / "spiece.model").is_file()
    for name, run_dir in trained.items():
        for folder in [run_dir / "best"] + ([run_dir / "best" / "adapter"] if "lora" in name else []):
            state = json.loads((folder / "tokenizer.json").read_text())
            assert all(isinstance(merge, str) for merge in state["model"].get("merges", [])), name
            assert "prepend_scheme" not in json.dumps(state), name
            tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
            assert tokenizer_config["tokenizer_class"] != "TokenizersBackend", name
            assert not isinstance(tokenizer_config.get("extra_special_tokens"), list), name
            Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_the_project_loads_best_as_the_model_it_trained(trained):
    """transformers 5 reads the rewritten files as before: the T5 head stays its own, token ids are training's."""
    from datasets import Dataset, DatasetDict

    from students import load_saved
    from views import original_t5_pretokenization, tokenize_seq2seq

    tokenizer, model = predict.load_model(str(trained["t5"] / "best"))
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr() and not model.config.scale_decoder_outputs
    split = Dataset.from_dict({"input": INPUTS, "label": ["x"] * len(INPUTS), "rationale": ["y"] * len(INPUTS)})
    _, source_tokenizer, _ = load_saved(str(trained["t5"] / "best"))
    expected = tokenize_seq2seq(DatasetDict({"test": split}), source_tokenizer, "task_prefix", MAX_INPUT_LENGTH)["test"]
    assert [tokenizer(predict.PREDICT_PREFIX + text).input_ids for text in INPUTS] == expected["input_ids"]
    assert original_t5_pretokenization(source_tokenizer) is not source_tokenizer  # the fix is needed, and applied


def test_legacy_tokenizer_json_is_none_where_the_old_format_cannot_say_it(tiny_students):
    from tokenizers import models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert legacy_tokenizer_json(backend) is None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    legacy = legacy_tokenizer_json(backend)
    assert legacy["model"]["merges"] == ["a b"] and legacy["pre_tokenizer"]["add_prefix_space"] is True


def test_config_and_tokenizer_config_speak_4x():
    t5 = {"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert portable_config(t5)["tie_word_embeddings"] is False
    assert portable_config({"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": True}) == {
        "model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": True}
    llama = {"model_type": "llama", "tie_word_embeddings": False}
    assert portable_config(llama) == llama
    written = portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<x>"]})
    assert written == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<x>"]}


# ---- the same model under an older transformers ----


def compat_env(pins: tuple[str, ...]) -> Path:
    """A folder with the pinned packages (not torch: the project's is used), built once per set of pins and Python,
    atomically; skips the test where it cannot be built."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dss-compat"
    key = " ".join([*pins, sys.version, sys.platform])
    target = cache / f"{pins[0].split('==')[1]}-{hashlib.blake2b(key.encode(), digest_size=4).hexdigest()}"
    if target.is_dir():
        return target
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip(f"cannot build {' '.join(pins)}: uv is not installed (https://docs.astral.sh/uv/)")
    building = cache / f"{target.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    # Compiled up front: where PYTHONDONTWRITEBYTECODE is set (CI), each probe would otherwise recompile transformers.
    install = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", sys.executable, "--target"]
    done = subprocess.run([*install, str(building), *pins], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        lines = done.stderr.strip().splitlines() or ["no message"]
        first_error = next((line for line in lines if line.startswith("error")), lines[-1])
        reason = "; ".join(dict.fromkeys([first_error.strip(), lines[-1].strip()]))
        pytest.skip(f"cannot build {' '.join(pins)} from the package registry: {reason}")
    try:
        os.replace(building, target)
    except OSError:  # another session built it first
        shutil.rmtree(building, ignore_errors=True)
    return target


def probe_under(env: Path, folders: dict[str, Path], texts: dict[str, list[str]], scratch: Path) -> dict:
    """load_probe.probe's rows for each folder, computed under the transformers installed in env."""
    import torch

    logits_file = scratch / "old_logits.pt"
    request = {"folders": {name: str(folder) for name, folder in folders.items()}, "texts": texts,
               "max_new_tokens": GEN_MAX_LEN - 1, "logits_file": str(logits_file)}
    environment = {**os.environ, "PYTHONPATH": str(env), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(PROBE), json.dumps(request)], capture_output=True, text=True,
                          env=environment, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, logits = json.loads(done.stdout), torch.load(logits_file)
    return {name: [row | {"logits": values} for row, values in zip(rows[name], logits[name])] for name in rows}


def student_texts(name: str) -> list[str]:
    """The project's own inputs to the student: the prefixed text, and a decoder-only student's prompt frame."""
    if RUNS[name][0] in ("t5", "bart"):
        return [predict.PREDICT_PREFIX + text for text in INPUTS]
    return [f"{predict.PREDICT_PREFIX}{text}\n" for text in INPUTS]


def largest_difference(old: list[dict], ours: list[dict]) -> float:
    """The largest absolute difference between the rows' logits (their generations are equal, so are the shapes)."""
    return max(float((o["logits"] - p["logits"]).abs().max()) for o, p in zip(old, ours, strict=True))


@pytest.mark.parametrize("version", OLD_TRANSFORMERS)
def test_best_loads_as_the_same_model_in_older_transformers(trained, version, capsys, tmp_path):
    pins, names = OLD_TRANSFORMERS[version]
    env = compat_env(pins)
    folders = {name: trained[name] / "best" for name in names}
    texts = {name: student_texts(name) for name in names}
    old = probe_under(env, folders, texts, tmp_path)
    differences = {}
    for name in names:
        tokenizer, model = predict.load_model(str(folders[name]))
        ours = probe(tokenizer, model.cpu(), texts[name], GEN_MAX_LEN - 1)
        assert [row["ids"] for row in old[name]] == [row["ids"] for row in ours], name
        assert [row["generated"] for row in old[name]] == [row["generated"] for row in ours], name
        differences[name] = largest_difference(old[name], ours)
        assert differences[name] <= LOGITS_TOLERANCE, (name, differences[name])
    with capsys.disabled():
        print(f"\ntransformers {version}: largest logit difference "
              + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))


# ---- predict.py gives the evaluation's predictions ----


def predict_rows(capsys, run_dir: Path, inputs: list[str], *flags: str) -> list[dict]:
    inputs_file = run_dir / "predict_inputs.jsonl"
    inputs_file.write_text("".join(json.dumps({"input": text}) + "\n" for text in inputs))
    capsys.readouterr()  # what the run printed
    code = predict.main(["--model", str(run_dir / "best"), "--json", "--rationale", "--file", str(inputs_file),
                         "--max_new_tokens", str(GEN_MAX_LEN - 1), "--max_input_length", str(MAX_INPUT_LENGTH),
                         *flags])
    assert code == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def assert_predict_matches_evaluation(capsys, run_dir: Path, *flags: str) -> list[dict]:
    recorded = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    rows = predict_rows(capsys, run_dir, [row["input"] for row in recorded], *flags)
    assert [(row["label"], row["rationale"]) for row in rows] == [
        (row["pred_label"], row["pred_rationale"]) for row in recorded]
    return rows


@pytest.mark.parametrize("name", RUNS)
def test_predict_gives_the_evaluation_s_prediction_row_for_row(trained, capsys, name):
    chat_template = [flag for flag in RUNS[name][1] if flag == "--chat_template"]
    rows = assert_predict_matches_evaluation(capsys, trained[name], *chat_template)
    # The tiny BART's head is tied to its embeddings, so from its start token (EOS) it predicts EOS: blank rows.
    assert name == "bart" or any(row["label"] for row in rows), "the student must generate text for this to mean much"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A short cqa run of a tiny T5 with the public T5 vocabulary, on the real rows of ../shared."""
    if not (SHARED_DATA / "cqa").is_dir() or not (SHARED_TOKENIZER / "spiece.model").is_file():
        pytest.skip(f"real data or the public T5 vocabulary not found in {SHARED_DATA.parent}")
    root = tmp_path_factory.mktemp("real")
    student = build_tiny_t5(root / "student", SHARED_TOKENIZER)
    return train(student, SHARED_DATA, root / "out", "cqa", "--subsample", "0.01", "--label_type", "llm",
                 "--max_eval_samples", "64")


@pytest.mark.slow
def test_predict_gives_the_evaluation_s_prediction_on_real_rows(real_run, capsys):
    assert_predict_matches_evaluation(capsys, real_run)


@pytest.mark.slow
def test_a_public_vocabulary_student_gives_the_same_ids_and_model_in_4_30(real_run, tmp_path):
    """cqa and anli1 test inputs (108 of 1,000 anli1 hypotheses end in whitespace, where the T5 id fix matters)."""
    from data_utils import DATASETS
    from students import load_saved

    if not (SHARED_DATA / "anli1").is_dir():
        pytest.skip(f"anli1 not found in {SHARED_DATA}")
    lines = (SHARED_DATA / "anli1" / "anli1_test.json").read_text().splitlines()[:300]
    anli = [DATASETS["anli1"].build_row(json.loads(line), "</s>")["input"] for line in lines]
    anli = [text for text in anli if text != text.rstrip()] + anli[:10]  # the logits of a 32k vocabulary are large
    cqa = [json.loads(line)["input"] for line in (real_run / "predictions.jsonl").read_text().splitlines()[:10]]
    texts = [predict.PREDICT_PREFIX + text for text in cqa + anli]
    env = compat_env(OLD_TRANSFORMERS["4.30.2"][0])
    [old] = probe_under(env, {"t5": real_run / "best"}, {"t5": texts}, tmp_path).values()
    tokenizer, model = predict.load_model(str(real_run / "best"))
    ours = probe(tokenizer, model.cpu(), texts, GEN_MAX_LEN - 1)
    _, plain, _ = load_saved(real_run / "best")
    assert sum(plain(text)["input_ids"] != row["ids"] for text, row in zip(texts, ours)) > 10, "no row needs the fix"
    assert [row["ids"] for row in old] == [row["ids"] for row in ours]
    assert [row["generated"] for row in old] == [row["generated"] for row in ours]
    assert largest_difference(old, ours) <= LOGITS_TOLERANCE
