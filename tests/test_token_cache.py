"""Tokenise once: reruns read the tokenised splits back; any change to what the ids depend on tokenises anew."""

import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from conftest import ROOT
import data_utils
import views
from data_utils import DataError, load_data
from students import FAMILIES
from token_cache import MANIFEST, cache_key, cached_tokenize, default_cache_dir
from views import tokenize_seq2seq

ROWS = {"input": ["the apple tree", "where does he live", "kids played tag"], "label": ["park", "bus", "tree"],
        "rationale": ["apples grow on trees", "he lives near the bus", "tag is played by kids"]}


@pytest.fixture
def tokenizer(tiny_t5):
    return AutoTokenizer.from_pretrained(tiny_t5)


def splits(**changes) -> DatasetDict:
    train = Dataset.from_dict({**ROWS, **changes})
    return DatasetDict({"train": train, "test": train.select([2, 0])})


def counting_tokenize(calls: list):
    def tokenize_fn(*args):
        calls.append(args[2:])
        return tokenize_seq2seq(*args)

    return tokenize_fn


def test_a_rerun_reads_the_cache_and_gets_the_same_rows(tokenizer, tmp_path, capsys):
    calls = []
    tokenize_fn = counting_tokenize(calls)
    first = cached_tokenize(tmp_path, tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    again = cached_tokenize(tmp_path, tokenize_fn, splits(), AutoTokenizer.from_pretrained(tokenizer.name_or_path),
                            "task_prefix", 64)
    assert len(calls) == 1, "the second run is read from the cache"
    assert "read from the cache" in capsys.readouterr().err
    for name in ("train", "test"):
        assert again[name].column_names == first[name].column_names
        assert again[name].to_list() == first[name].to_list()
    assert [name for name in os.listdir(tmp_path / "tokenized") if name.startswith(".")] == [], "no partial entry"


@pytest.mark.parametrize("change", ["label", "selection", "flags", "tokenizer"])
def test_what_the_ids_depend_on_is_in_the_key(tokenizer, tiny_t5, tmp_path, change):
    calls = []
    tokenize_fn = counting_tokenize(calls)
    cached_tokenize(tmp_path, tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    data, other_tokenizer, flags = splits(), tokenizer, ("task_prefix", 64)
    if change == "label":
        data = splits(label=["park", "bus", "trees"])
    elif change == "selection":
        data["test"] = data["train"].select([0, 2])
    elif change == "flags":
        flags = ("task_prefix", 3)
    else:
        other_tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
        other_tokenizer.add_tokens(["appletree"])
    got = cached_tokenize(tmp_path, tokenize_fn, data, other_tokenizer, *flags)
    assert len(calls) == 2, f"a changed {change} tokenises anew"
    assert got["test"].to_list() == tokenize_seq2seq(data, other_tokenizer, *flags)["test"].to_list()
    assert len(os.listdir(tmp_path / "tokenized")) == 2, "the earlier entry stays"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_edit_to_the_tokenising_code_is_a_new_key(tokenizer, tmp_path, monkeypatch, family):
    """Every family's tokenising, down to its helpers, lives in views.py, whose source the key hashes."""
    edited = tmp_path / "edited_views.py"
    edited.write_text(Path(views.__file__).read_text().replace("MAX_TARGET_LENGTH = 256", "MAX_TARGET_LENGTH = 255"))
    spec = importlib.util.spec_from_file_location("edited_views", edited)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "edited_views", module)
    spec.loader.exec_module(module)
    tokenize_fn = FAMILIES[family].tokenize
    assert tokenize_fn.__module__ == "views"
    same = cache_key(tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    assert cache_key(tokenize_fn, splits(), tokenizer, "task_prefix", 64) == same
    assert cache_key(getattr(module, tokenize_fn.__name__), splits(), tokenizer, "task_prefix", 64) != same


def test_no_cache_and_readers_write_nothing(tokenizer, tmp_path):
    cached_tokenize(None, tokenize_seq2seq, splits(), tokenizer, "standard", 64)
    cached_tokenize(tmp_path, tokenize_seq2seq, splits(), tokenizer, "standard", 64, write=False)
    assert not (tmp_path / "tokenized").exists()


def test_an_unwritable_cache_costs_a_warning_not_the_run(tokenizer, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    got = cached_tokenize(blocked, tokenize_seq2seq, splits(), tokenizer, "standard", 64)
    assert got["train"].num_rows == 3
    assert "warning: could not cache the tokenised splits" in capsys.readouterr().err


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSS_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DSS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dss"


@pytest.mark.slow
def test_run_py_tokenises_once_across_a_sweep(tiny_t5, shared_data, tmp_path, capsys):
    import run

    def argv(*extra):
        return ["--dataset", "svamp", "--from_pretrained", str(tiny_t5), "--data_dir", str(shared_data), "--output_dir",
                str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--batch_size", "4", "--max_steps", "1",
                "--max_eval_samples", "4", "--gen_max_len", "2", "--max_input_length", "64", "--no_log", *extra]

    assert run.main(argv("--alpha", "0.5")) == 0
    assert "read from the cache" not in capsys.readouterr().err
    assert run.main(argv("--alpha", "0.2")) == 0, "another alpha: the same tokenised splits"
    assert "read from the cache" in capsys.readouterr().err
    assert run.main(argv("--alpha", "0.3", "--no_cache")) == 0
    assert "read from the cache" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1


def damage(entry: Path, how: str) -> None:
    arrow = sorted(entry.rglob("*.arrow"))[0]
    data = arrow.read_bytes()
    if how == "truncate":
        arrow.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        arrow.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        (entry / "dataset_dict.json").unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "remove"])
def test_a_damaged_entry_is_reported_discarded_and_rebuilt(tokenizer, tmp_path, capsys, how):
    calls = []
    tokenize_fn = counting_tokenize(calls)
    first = cached_tokenize(tmp_path, tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    [entry] = (tmp_path / "tokenized").iterdir()
    damage(entry, how)
    capsys.readouterr()

    again = cached_tokenize(tmp_path, tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    [line] = [line for line in capsys.readouterr().err.splitlines() if "cache" in line]
    assert line.startswith(f"note: the cached tokenised splits in {entry} are damaged (")
    assert line.endswith("): discarding them and tokenising afresh")
    assert len(calls) == 2 and again["train"].to_list() == first["train"].to_list()
    cached_tokenize(tmp_path, tokenize_fn, splits(), tokenizer, "task_prefix", 64)
    assert len(calls) == 2, "the rebuilt entry is read"
    assert os.listdir(tmp_path / "tokenized") == [entry.name]


# Writes a cache entry and is killed (SIGKILL) once its files are written, before they are renamed into place.
KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer
from token_cache import cached_tokenize
from views import tokenize_seq2seq

original = DatasetDict.save_to_disk

def save_then_die(self, path, *args, **kwargs):
    original(self, path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

DatasetDict.save_to_disk = save_then_die
rows = Dataset.from_dict({{"input": ["a b"], "label": ["c"], "rationale": ["d"]}})
cached_tokenize({cache!r}, tokenize_seq2seq, DatasetDict({{"train": rows}}), AutoTokenizer.from_pretrained({model!r}),
                "task_prefix", 64)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_writer_removes(tokenizer, tiny_t5, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(root=str(ROOT), cache=str(tmp_path), model=str(tiny_t5)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    folder = tmp_path / "tokenized"
    [stale] = os.listdir(folder)
    assert stale.startswith(".")
    # A live writer's temporary (this process's) and another host's stay: neither can be known to be abandoned.
    live = folder / f".{'0' * 32}.{os.getpid()}@{socket.gethostname()}.abc"
    elsewhere = folder / f".{'1' * 32}.{2**22 + 1}@another-host.example.org.abc"
    live.mkdir()
    elsewhere.mkdir()
    cached_tokenize(tmp_path, tokenize_seq2seq, splits(), tokenizer, "standard", 64)
    left = sorted(os.listdir(folder))
    assert stale not in left and live.name in left and elsewhere.name in left
    assert len([name for name in left if not name.startswith(".")]) == 1, "the new entry"


# ---- the splits as read from their files (data_utils.load_data with a cache_dir) ----


def custom_dataset(folder: Path, rationale: str = "Because") -> Path:
    """A custom dataset with an annotate.py teacher folder `t1` (two train chunks of 4 rows, one test chunk)."""
    data = folder / "custom"
    (data / "t1").mkdir(parents=True)
    for split, count in (("train", 8), ("valid", 2), ("test", 3)):
        rows = [{"input": f"{split} question {i}?", "label": str(i)} for i in range(count)]
        (data / f"custom_{split}.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    outputs = [f"{rationale} {i}. So the answer is {i}." for i in range(8)]
    (data / "t1" / "train_CoT_0.json").write_text(json.dumps(outputs[:4]))
    (data / "t1" / "train_CoT_1.json").write_text(json.dumps(outputs[4:]))
    (data / "t1" / "valid_CoT_0.json").write_text(json.dumps(outputs[:2]))
    (data / "t1" / "test_CoT_0.json").write_text(json.dumps(outputs[:3]))
    return folder


def as_lists(splits: DatasetDict) -> dict:
    return {name: split.to_dict() for name, split in splits.items()}


def test_a_rerun_reads_the_splits_from_the_cache_with_the_rows_of_a_fresh_read(tmp_path, capsys):
    data = custom_dataset(tmp_path / "data")
    fresh = load_data("custom", data, llm="t1", fraction=0.5, seed=3)
    first = load_data("custom", data, llm="t1", fraction=0.5, seed=3, cache_dir=tmp_path / "cache")
    assert "read from the cache" not in capsys.readouterr().err
    again = load_data("custom", data, llm="t1", fraction=0.5, seed=3, cache_dir=tmp_path / "cache")
    assert capsys.readouterr().err.count("rows read from the cache") == 3
    assert as_lists(first) == as_lists(again) == as_lists(fresh)
    other_seed = load_data("custom", data, llm="t1", fraction=1.0, seed=1, cache_dir=tmp_path / "cache")
    assert as_lists(other_seed) == as_lists(load_data("custom", data, llm="t1", fraction=1.0, seed=1))
    assert len(list((tmp_path / "cache" / "splits").iterdir())) == 3, "one entry per split, shared by every draw"


def test_subsampling_and_tokenising_write_nothing_into_a_cached_split(tokenizer, tmp_path):
    data = custom_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    for seed in (0, 1):
        splits = load_data("custom", data, llm="t1", fraction=0.5, seed=seed, cache_dir=cache)
        splits = DatasetDict({name: split.rename_column("llm_rationale", "rationale") for name, split in splits.items()})
        cached_tokenize(cache, tokenize_seq2seq, splits, tokenizer, "task_prefix", 64)
    for entry in (cache / "splits").iterdir():
        written = json.loads((entry / MANIFEST).read_text())
        assert sorted(path.name for path in entry.iterdir()) == sorted([*written, MANIFEST]), "only what was written"


@pytest.mark.parametrize("change", ["data file", "teacher chunk", "eos", "parser code"])
def test_what_the_rows_depend_on_is_in_the_key(tmp_path, monkeypatch, change):
    data = custom_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    load_data("custom", data, llm="t1", cache_dir=cache)
    eos = "</s>"
    if change == "data file":
        path = data / "custom" / "custom_test.json"
        path.write_text(path.read_text().replace("test question 1?", "test question one?"))
    elif change == "teacher chunk":
        (data / "custom" / "t1" / "train_CoT_1.json").write_text(json.dumps([f"Since {i}. So the answer is {i}."
                                                                             for i in range(4, 8)]))
    elif change == "eos":
        eos = "<eos>"
    else:
        real = inspect.getsource
        monkeypatch.setattr(inspect, "getsource", lambda obj: real(obj) + ("\n# edited" if obj is data_utils else ""))
    got = load_data("custom", data, llm="t1", eos=eos, cache_dir=cache)
    assert as_lists(got) == as_lists(load_data("custom", data, llm="t1", eos=eos))
    assert len(list((cache / "splits").iterdir())) == (4 if change in ("data file", "teacher chunk") else 6)


def test_a_moved_data_folder_still_reads_the_cache(tmp_path, capsys):
    data = custom_dataset(tmp_path / "data")
    load_data("custom", data, llm="t1", cache_dir=tmp_path / "cache")
    moved = data.rename(tmp_path / "elsewhere")
    capsys.readouterr()
    load_data("custom", moved, llm="t1", cache_dir=tmp_path / "cache")
    assert capsys.readouterr().err.count("rows read from the cache") == 3


def test_a_missing_teacher_chunk_is_still_reported_as_such_with_a_cache(tmp_path):
    data = custom_dataset(tmp_path / "data")
    (data / "custom" / "t1" / "test_CoT_0.json").unlink()
    with pytest.raises(DataError, match="missing teacher outputs .*test_CoT_0.json"):
        load_data("custom", data, llm="t1", cache_dir=tmp_path / "cache")
