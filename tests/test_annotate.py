"""annotate.py (teacher rationales, step one of the method) and custom datasets, offline: a tiny random causal LM
for the transformers teacher and a minimal OpenAI-compatible server in a thread for the HTTP teacher."""

import dataclasses
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import annotate
import run
import teachers
from conftest import ROOT, corpus_lines
from data_utils import BLANK, DATASETS, DataError, load_data, parse_answer
from metrics import eval_equation


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def small_chunks(monkeypatch, name: str, size: int) -> None:
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], chunk_size=size))


def custom_data(root: Path, n_train: int = 8, n_test: int = 3, rationale: bool = False) -> Path:
    """<root>/custom/ with rows `s<i>` labelled `i + 1`."""
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"input": f"s{i}", "label": str(i + 1)} for i in range(n)]
        if rationale:
            rows = [{**row, "rationale": f"one more than {i}"} for i, row in enumerate(rows)]
        write_lines(root / "custom" / f"custom_{split}.json", rows)
    return root


# ---- prompts ----

EXPECTED_LABELS = {
    "cqa": ["mailbox", "refrigerator", "being funny", "hammer", "library", "tired"],
    "svamp": ["(24 - 9)", "(6 * 8)", "(35 / 5)", "(19 - 7)", "(50 - (12 + 15))", "((4 * 20) - 30)"],
    "asdiv": ["(18 + 14)", "(3 * 12)", "(45 / 9)", "(60 - (18 + 7))", "((5 * 8) + 6)"],
    "esnli": ["entailment", "contradiction", "neutral", "entailment", "neutral", "contradiction"],
    "anli1": ["entailment", "contradiction", "neutral", "entailment", "neutral", "contradiction"],
    "custom": ["star", "6", "neither", "Tokyo", "no"],
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_prompt_exemplars_parse_to_their_labels(name):
    prompt = (annotate.PROMPTS / f"{name}.txt").read_text()
    assert annotate.exemplar_labels(prompt, DATASETS[name]) == EXPECTED_LABELS[name]
    if DATASETS[name].metric == "equation":
        for exemplar, label in zip(prompt.strip().split("\n\n"), EXPECTED_LABELS[name]):
            stated = re.findall(r"= (\d+)", exemplar)[-1]
            assert eval_equation(label) == float(stated), f"{label} does not compute the exemplar's own result"


def test_query_is_formatted_like_the_exemplars_up_to_the_answer():
    row = {"premise": "P.", "hypothesis": "H.", "label": 0, "input": "P.</s>H."}
    assert annotate.build_query("EX", DATASETS["esnli"], row) == "EX\n\nPremise: P.\nHypothesis: H.\nReasonings:"
    assert annotate.build_query("EX", DATASETS["anli1"], row).endswith("Hypothesis: H.\nAnswer:")
    assert annotate.build_query("EX", DATASETS["cqa"], {"input": "Q?\nAnswer Choices:\n(a) x"}) == (
        "EX\n\nQ: Q?\nAnswer Choices:\n(a) x\nA:"
    )


def test_generic_parser_for_custom_datasets():
    assert parse_answer("Two plus two. So the answer is 4.\n\nQ: next") == ("Two plus two.", "4")
    assert parse_answer("Because. The answer is (3 + 4).") == ("Because.", "(3 + 4)")
    assert parse_answer("no marker") == (BLANK, BLANK)
    assert parse_answer("x. So the answer is .")[1] == BLANK
    assert parse_answer("x. The answer is a. So the answer is b.") == (BLANK, BLANK)


def test_prompt_without_parseable_answers_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: a?\nA: yes.\n\nQ: b?\nA: Because. So the answer is no.\n")
    custom_data(tmp_path)
    status = annotate.main(["--dataset", "custom", "--data_dir", str(tmp_path), "--teacher", "hf", "--model", "x",
                            "--prompt_file", str(bad)])
    assert status == 1
    assert "exemplar(s) 1 (separated by blank lines) have no answer the custom parser reads" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llm", "palm", "PaLM", "none", "dataset", "../up"])
def test_reserved_or_unsafe_llm_name_is_refused(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        annotate.parse_args(["--dataset", "cqa", "--teacher", "hf", "--model", "m", "--llm_name", name])
    assert exit_info.value.code == 2
    assert "--llm_name" in capsys.readouterr().err


def test_default_llm_name_is_the_models_basename():
    args = annotate.parse_args(["--dataset", "cqa", "--teacher", "hf", "--model", "/models/Llama-3.1-8B/"])
    assert args.llm_name == "Llama-3.1-8B" and args.stop == ["\n\n"]
    args = annotate.parse_args(["--dataset", "cqa", "--teacher", "openai", "--base_url", "http://h", "--model",
                                "llama3:8b", "--stop", "\\nQ:", "--stop", "END"])
    assert args.llm_name == "llama3-8b" and args.stop == ["\nQ:", "END"]


# ---- the transformers teacher ----


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE vocabulary trained here."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-lm")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(200), vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_hf_teacher_writes_chunks_that_load_data_reads(tiny_causal_lm, tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # float32 on CPU, like the reference below
    small_chunks(monkeypatch, "svamp", 4)
    write_lines(tmp_path / "svamp" / "svamp_train.json", [{"input": f"s{i}", "label": f"( {i}.0 + 1.0 )"} for i in range(10)])
    write_lines(tmp_path / "svamp" / "svamp_test.json", [{"input": f"t{i}", "label": "( 1.0 + 1.0 )"} for i in range(3)])
    prompt_file = tmp_path / "one-shot.txt"  # short prompts keep the test fast on a CPU
    prompt_file.write_text("Q: Tom has 3 apples and eats 1. How many are left?\nA: 3 - 1 = 2. The answer is (3 - 1).\n")
    for split in ("train", "test"):
        assert annotate.main(["--dataset", "svamp", "--split", split, "--data_dir", str(tmp_path), "--teacher", "hf",
                              "--model", str(tiny_causal_lm), "--llm_name", "tiny", "--max_new_tokens", "6",
                              "--batch_size", "3", "--prompt_file", str(prompt_file)]) == 0
    folder = tmp_path / "svamp" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == [
        "test_CoT_0.json", "test_CoT_0.usage.json", "test_annotation.json",
        *(name for i in range(3) for name in (f"train_CoT_{i}.json", f"train_CoT_{i}.usage.json")),
        "train_annotation.json",
    ]
    assert [len(json.loads((folder / f"train_CoT_{i}.json").read_text())) for i in range(3)] == [4, 4, 2]
    record = json.loads((folder / "train_annotation.json").read_text())
    assert record["rows"] == 10 and {"parse_rate", "accuracy"} <= set(record) and record["metric"] == "equation"
    assert "parse rate" in capsys.readouterr().out

    splits = load_data("svamp", tmp_path, llm="tiny")
    assert len(splits["train"]) + len(splits["valid"]) == 10 and len(splits["test"]) == 3

    # Batched, left-padded generation gives what each prompt alone gives, and only the continuation.
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    prompt = prompt_file.read_text().strip()
    written = json.loads((folder / "train_CoT_1.json").read_text())
    for i, row in ((4, "s4"), (5, "s5")):
        encoded = tokenizer(f"{prompt}\n\nQ: {row}\nA:", return_tensors="pt")
        ids = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
        alone = tokenizer.decode(ids[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        assert written[i - 4] == alone.split("\n\n")[0].lstrip()

    # Its cost: one request per batch (chunks of 4, 4, 2 rows in batches of 3), tokens counted with its tokenizer:
    # each prompt's, and the tokens each prompt alone generates (stopping where the batch stopped it), padding left
    # out.
    requests = json.loads((folder / "train_CoT_1.usage.json").read_text())["requests"]
    assert [(r["rows"], r["attempts"]) for r in requests] == [([0, 1, 2], 1), ([3], 1)]
    prompt_tokens = completion_tokens = 0
    for row in ("s4", "s5", "s6", "s7"):
        encoded = tokenizer(f"{prompt}\n\nQ: {row}\nA:", return_tensors="pt")
        ids = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id,
                             stop_strings=["\n\n"], tokenizer=tokenizer)
        prompt_tokens += encoded["input_ids"].shape[1]
        completion_tokens += int((ids[0, encoded["input_ids"].shape[1] :] != tokenizer.eos_token_id).sum())
    assert sum(r["prompt_tokens"] for r in requests) == prompt_tokens
    assert sum(r["completion_tokens"] for r in requests) == completion_tokens > 0
    cost = record["teacher_cost"]
    assert (cost["chunks"], cost["requests"], cost["retries"], cost["requests_without_usage"]) == (3, 5, 0, 0)


def test_hf_teacher_samples_k_continuations_per_prompt(tiny_causal_lm, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = [{"input": f"t{i}", "label": "( 1.0 + 1.0 )"} for i in range(3)]
    write_lines(tmp_path / "svamp" / "svamp_test.json", rows)
    prompt_file = tmp_path / "one-shot.txt"
    prompt_file.write_text("Q: Tom has 3 apples and eats 1. How many are left?\nA: 3 - 1 = 2. The answer is (3 - 1).\n")
    flags = ["--dataset", "svamp", "--split", "test", "--data_dir", str(tmp_path), "--teacher", "hf", "--model",
             str(tiny_causal_lm), "--max_new_tokens", "8", "--batch_size", "2", "--prompt_file", str(prompt_file),
             "--samples", "4", "--temperature", "1.0", "--top_p", "0.95"]
    assert annotate.main([*flags, "--llm_name", "a"]) == 0
    assert annotate.main([*flags, "--llm_name", "b"]) == 0
    written = json.loads((tmp_path / "svamp" / "a" / "test_CoT_0.json").read_text())
    assert len(written) == 3 and all(len(samples) == 4 for samples in written)
    assert len({text for samples in written for text in samples}) > 3, "sampling, not four greedy copies"
    assert written == json.loads((tmp_path / "svamp" / "b" / "test_CoT_0.json").read_text()), "seeded"
    record = json.loads((tmp_path / "svamp" / "a" / "test_annotation.json").read_text())
    assert (record["samples"], record["temperature"], record["top_p"], record["seed"]) == (4, 1.0, 0.95, 0)


# ---- the HTTP teacher ----


def prompt_words(prompt: str) -> int:
    """The prompt tokens FakeEndpoint reports: the prompt's words."""
    return len(prompt.split())


class FakeEndpoint:
    """An OpenAI-compatible server: answers the prompt ending `Q: s<i>\\nA:` with `... So the answer is <i+1>.` for
    even i and a wrong label for odd i (choice j > 0 of a request for n says `Because <i> #j.`). `plan[key]` scripts
    the first attempts at one row, misbehaving on purpose: an HTTP status to fail with; ('retry_after', seconds): 429 with
    that Retry-After; 'slow': answer after the client's timeout; 'drop': close the connection unanswered;
    'garbage': a 200 whose body is not JSON; 'number': a 200 with `"text": 123`; 'hang': no answer until the
    test ends; 'trickle': a whole valid answer, status line and headers included, one byte every 0.2 s; 'latin1': a
    text holding a byte that is not UTF-8; 'surrogate': a text holding the JSON escape of half a surrogate pair;
    'huge': a 50 MB text in chunked transfer; 'huge_declared': the same with its Content-Length announced;
    'no_usage': a good answer without its `usage` field. Good answers report usage as the server's tokens: the
    prompt's words (prompt_words) and the choices' words. `sent[key]` counts the bytes a 'trickle' or 'huge' answer
    got written before the client hung up. `n`: 'takes'
    (n choices), 'ignores' (one choice) or 'refuses' (400 for n > 1)."""

    def __init__(self, plan: dict[str, list] | None = None, delay: float = 0.05, n: str = "takes"):
        self.plan = {key: list(steps) for key, steps in (plan or {}).items()}
        self.delay, self.n = delay, n
        self.requests: list[tuple[str, dict, dict]] = []
        self.arrivals: dict[str, list[float]] = {}
        self.in_flight = self.max_in_flight = 0
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()
        self.released = threading.Event()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        key = re.search(r"Q: (\S+)\nA:$", prompt).group(1)
        with self.lock:
            self.requests.append((handler.path, {k.lower(): v for k, v in handler.headers.items()}, body))
            self.arrivals.setdefault(key, []).append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            step = self.plan.get(key, []).pop(0) if self.plan.get(key) else None
        try:
            time.sleep(self.delay)
            if step == "slow":
                time.sleep(1.0)
            if step == "hang":
                self.released.wait(60)
                return
            if step == "drop":
                handler.close_connection = True
                return
            if step == "garbage":
                self.send(handler, 200, b"{'choices': [oops")
                return
            if step in ("latin1", "surrogate"):
                text = b" caf\xe9. So" if step == "latin1" else b" \\ud800 So"
                self.send(handler, 200, b'{"choices": [{"index": 0, "text": "' + text + b' the answer is 1."}]}')
                return
            if step == "trickle":
                body = json.dumps({"choices": [{"index": 0, "text": " So the answer is 1."}]}).encode()
                raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                    len(body), body)
                self.write_bounded(handler, key, (raw[i : i + 1] for i in range(len(raw))), pause=0.2)
                return
            if step in ("huge", "huge_declared"):
                self.send_huge(handler, key, declared=step == "huge_declared")
                return
            if isinstance(step, tuple):
                self.send(handler, 429, {"error": {"message": "slow down"}}, {"Retry-After": str(step[1])})
                return
            if isinstance(step, int):
                self.send(handler, step, {"error": {"message": "scripted failure"}})
                return
            n = body.get("n", 1)
            if n > 1 and self.n == "refuses":
                self.send(handler, 400, {"error": {"message": "n must be 1"}})
                return
            i = int(key[1:])
            label = i + 1 if i % 2 == 0 else i + 2
            choices = []
            for j in range(n if self.n == "takes" else 1):
                text = f" Because {i}{f' #{j}' if j else ''}. So the answer is {label}.\n\nQ: what next?"
                content = 123 if step == "number" else text
                choice = {"index": j, "finish_reason": "stop", "logprobs": None}
                chat = "messages" in body
                choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
                choices.append(choice)
            answer = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"],
                      "choices": choices}
            if step != "no_usage":
                completion = sum(len(str(c.get("text", c.get("message", {}).get("content"))).split()) for c in choices)
                answer["usage"] = {"prompt_tokens": prompt_words(prompt), "completion_tokens": completion,
                                   "total_tokens": prompt_words(prompt) + completion}
            self.send(handler, 200, answer)
        except OSError:
            pass  # the client gave up (timeout) and closed the connection
        finally:
            with self.lock:
                self.in_flight -= 1

    def write_bounded(self, handler: BaseHTTPRequestHandler, key: str, parts, pause: float = 0.0) -> None:
        """Write the parts one by one, counting in sent[key], until they run out, the client hangs up or the test
        ends."""
        self.sent[key] = 0
        handler.close_connection = True
        for part in parts:
            if self.released.is_set():
                return
            try:
                handler.wfile.write(part)
                handler.wfile.flush()
            except OSError:
                return
            self.sent[key] += len(part)
            time.sleep(pause)

    def send_huge(self, handler: BaseHTTPRequestHandler, key: str, declared: bool) -> None:
        """A 50 MB answer of 64 KiB parts: chunked, or with its Content-Length announced."""
        part, count = b"a" * 65536, 800
        head, tail = b'{"choices": [{"index": 0, "text": "', b'"}]}'
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if declared:
            handler.send_header("Content-Length", str(len(head) + len(part) * count + len(tail)))
            frame = bytes
        else:
            handler.send_header("Transfer-Encoding", "chunked")

            def frame(data: bytes) -> bytes:
                return b"%x\r\n%s\r\n" % (len(data), data)

        handler.end_headers()
        parts = itertools.chain([frame(head)], (frame(part) for _ in range(count)), [frame(tail)],
                                [] if declared else [b"0\r\n\r\n"])
        self.write_bounded(handler, key, parts)

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, payload: dict | bytes, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def endpoint():
    """Start a FakeEndpoint on 127.0.0.1; yields a function (plan, delay, n) -> (endpoint, base_url)."""
    servers, fakes = [], []

    def start(plan: dict | None = None, delay: float = 0.05, n: str = "takes") -> tuple[FakeEndpoint, str]:
        fake = FakeEndpoint(plan, delay, n)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                fake.answer(self)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        fakes.append(fake)
        return fake, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for fake in fakes:
        fake.released.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def openai_flags(data_dir: Path, base_url: str, *extra: str) -> list[str]:
    return ["--dataset", "custom", "--data_dir", str(data_dir), "--teacher", "openai", "--base_url", base_url,
            "--model", "teacher-1", "--llm_name", "t1", *extra]


def test_http_teacher_concurrency_retries_and_request_schema(endpoint, tmp_path, monkeypatch, capsys):
    small_chunks(monkeypatch, "custom", 3)
    custom_data(tmp_path, n_train=12)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    fake, url = endpoint({"s3": [429], "s5": ["slow"], "s7": [503, 502]})
    start = time.time()
    status = annotate.main(openai_flags(tmp_path, url, "--concurrency", "4", "--timeout", "0.5", "--max_new_tokens", "32"))
    assert status == 0, capsys.readouterr().err
    assert time.time() - start < 10

    assert fake.max_in_flight > 1, "requests must overlap"
    assert len(fake.requests) == 12 + 4, "one retry for s3 and s5, two for s7"
    path, headers, body = fake.requests[0]
    assert path == "/v1/completions" and headers["authorization"] == "Bearer sk-test"
    assert body["model"] == "teacher-1" and body["max_tokens"] == 32 and body["temperature"] == 0
    assert body["stop"] == ["\n\n"] and body["prompt"].startswith("Q: Is the sun a star")

    folder = tmp_path / "custom" / "t1"
    first = json.loads((folder / "train_CoT_0.json").read_text())
    assert first == ["Because 0. So the answer is 1.", "Because 1. So the answer is 3.", "Because 2. So the answer is 3."]
    record = json.loads((folder / "train_annotation.json").read_text())
    assert (record["rows"], record["parse_rate"], record["accuracy"]) == (12, 1.0, 0.5)
    assert not list(folder.glob("*.tmp"))

    assert annotate.main(openai_flags(tmp_path, url, "--split", "test")) == 0
    splits = load_data("custom", tmp_path, llm="t1")
    assert sorted(splits["test"]["llm_label"]) == ["1", "3", "3"]
    assert len(splits["train"]) + len(splits["valid"]) == 12


def test_restart_skips_finished_chunks(endpoint, tmp_path, monkeypatch, capsys):
    small_chunks(monkeypatch, "custom", 2)
    custom_data(tmp_path, n_train=8)
    fake, url = endpoint({"s6": [400]})
    assert annotate.main(openai_flags(tmp_path, url, "--concurrency", "1")) == 1
    err = capsys.readouterr().err
    assert "400 Bad Request" in err and "Traceback" not in err
    folder = tmp_path / "custom" / "t1"
    assert sorted(p.name for p in folder.iterdir()) == [
        name for i in range(3) for name in (f"train_CoT_{i}.json", f"train_CoT_{i}.usage.json")]
    first_run = len(fake.requests)
    assert first_run in (7, 8), "s0..s5 answered, s6 refused (s7 may already have been sent)"

    before = (folder / "train_CoT_0.json").stat().st_mtime_ns
    assert annotate.main(openai_flags(tmp_path, url, "--concurrency", "1")) == 0
    assert len(fake.requests) == first_run + 2, "only the unfinished chunk (s6, s7) is asked again"
    assert (folder / "train_CoT_0.json").stat().st_mtime_ns == before

    assert annotate.main(openai_flags(tmp_path, "http://127.0.0.1:9/v1")) == 0, "all done: no teacher needed"
    assert json.loads((folder / "train_annotation.json").read_text())["rows"] == 8


def test_partial_train_annotation_trains_on_the_covered_rows(endpoint, tmp_path, monkeypatch):
    small_chunks(monkeypatch, "custom", 4)
    custom_data(tmp_path, n_train=16)
    _, url = endpoint()
    for split in ("train", "test"):
        assert annotate.main(openai_flags(tmp_path, url, "--split", split)) == 0
    (tmp_path / "custom" / "t1" / "train_CoT_3.json").unlink()
    splits = load_data("custom", tmp_path, llm="t1")
    assert len(splits["train"]) + len(splits["valid"]) == 12
    (tmp_path / "custom" / "t1" / "test_CoT_0.json").write_text(json.dumps(["only one"]))
    with pytest.raises(DataError, match=r"custom test: 1 teacher outputs \(--llm t1\) for 3 data rows"):
        load_data("custom", tmp_path, llm="t1")


def test_chat_endpoint_and_exhausted_retries(endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    custom_data(tmp_path, n_train=2, n_test=1)
    fake, url = endpoint()
    assert annotate.main(openai_flags(tmp_path, url, "--split", "test", "--chat")) == 0
    path, headers, body = fake.requests[0]
    assert path == "/v1/chat/completions" and body["messages"][0]["role"] == "user"
    assert "authorization" not in headers, "no key: no Authorization header"
    assert json.loads((tmp_path / "custom" / "t1" / "test_CoT_0.json").read_text()) == ["Because 0. So the answer is 1."]

    fake, url = endpoint({"s0": [503] * 5})
    assert annotate.main(openai_flags(tmp_path, url, "--llm_name", "t2", "--max_retries", "2")) == 1
    assert "no answer after 3 attempts (last: HTTP 503" in capsys.readouterr().err
    assert len([r for r in fake.requests if r[2]["prompt"].endswith("Q: s0\nA:")]) == 3


def test_dropped_connections_and_retry_after_are_retried(endpoint, tmp_path, monkeypatch, capsys):
    small_chunks(monkeypatch, "custom", 2)
    custom_data(tmp_path, n_train=4)
    fake, url = endpoint({"s0": ["drop", "drop"], "s1": [("retry_after", 1.2)], "s2": ["slow"]})
    status = annotate.main(openai_flags(tmp_path, url, "--timeout", "0.4", "--max_retries", "2"))
    assert status == 0, capsys.readouterr().err
    assert {key: len(times) for key, times in fake.arrivals.items()} == {"s0": 3, "s1": 2, "s2": 2, "s3": 1}
    waited = fake.arrivals["s1"][1] - fake.arrivals["s1"][0]
    assert waited >= 1.2, f"the server asked for 1.2 s, got {waited:.2f} s (the client's own first backoff is <= 0.5 s)"
    outputs = json.loads((tmp_path / "custom" / "t1" / "train_CoT_0.json").read_text())
    assert outputs == ["Because 0. So the answer is 1.", "Because 1. So the answer is 3."]


@pytest.mark.parametrize(
    "plan, flags, message",
    [
        ({"s1": ["garbage"]}, [], "answered with something other than JSON: \"{'choices': [oops\""),
        ({"s1": ["number"]}, [], "answered choices[0].text = 123, which is not text"),
        ({"s1": ["number"]}, ["--chat"], "answered choices[0].message.content = 123, which is not text"),
        ({"s1": [401]}, [], "answered 401 Unauthorized: scripted failure; check --model, --base_url and the API key"),
        ({"s1": ["hang"] * 2}, ["--timeout", "0.3", "--max_retries", "1"],
         "no answer after 2 attempts (last: no answer within --timeout 0.3 s)"),
        ({"s1": ["drop"] * 2}, ["--max_retries", "1"], "no answer after 2 attempts (last: "),
        ({"s1": ["trickle"] * 2}, ["--timeout", "1", "--max_retries", "1"],
         "no answer after 2 attempts (last: no answer within --timeout 1 s)"),
        ({"s1": ["latin1"]}, [], "answered with bytes that are not UTF-8 (byte 39: b'\\xe9. So th'...); the answer is "
         "refused, not stored with replacement characters"),
        ({"s1": ["surrogate"]}, [],
         'answered choices[0].text with the lone surrogate escape "\\ud800", which is not text'),
        ({"s1": ["huge"]}, ["--max_new_tokens", "16"], " bytes for one answer; "),
        ({"s1": ["huge_declared"]}, ["--max_new_tokens", "16"], "announced 52428839 bytes for one answer"),
    ],
)
def test_unusable_answers_are_one_line_and_keep_finished_chunks(endpoint, tmp_path, monkeypatch, capsys, plan, flags,
                                                                 message):
    small_chunks(monkeypatch, "custom", 1)
    custom_data(tmp_path, n_train=2)
    fake, url = endpoint(plan)
    assert annotate.main(openai_flags(tmp_path, url, "--concurrency", "1", *flags)) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert message in line and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "custom" / "t1").iterdir()) == ["train_CoT_0.json",
                                                                            "train_CoT_0.usage.json"]


def test_a_trickling_server_cannot_hold_a_request_past_the_timeout(endpoint, tmp_path, capsys):
    """--timeout bounds an attempt from sending to the answer's last byte, not the wait between bytes: an answer
    trickled a byte every 0.2 s (about 30 s in all) is given up after 1 s, retried once, and the run stops."""
    custom_data(tmp_path, n_train=1)
    fake, url = endpoint({"s0": ["trickle"] * 2}, delay=0)
    start = time.monotonic()
    assert annotate.main(openai_flags(tmp_path, url, "--timeout", "1", "--max_retries", "1")) == 1
    elapsed = time.monotonic() - start
    assert "(last: no answer within --timeout 1 s)" in capsys.readouterr().err
    assert len(fake.arrivals["s0"]) == 2 and elapsed < 4, f"two attempts of 1 s and one backoff took {elapsed:.1f} s"
    assert fake.sent["s0"] < 20, "the status line and headers were still trickling when the deadline came"


@pytest.mark.parametrize("step", ["huge", "huge_declared"])
def test_a_huge_answer_is_refused_while_it_arrives(endpoint, tmp_path, capsys, step):
    """--max_new_tokens 16 allows about 80 kB of answer: reading stops there, long before the server's 50 MB, and
    the answer is not retried (the same request would bring it again)."""
    custom_data(tmp_path, n_train=1)
    fake, url = endpoint({"s0": [step]}, delay=0)
    assert annotate.main(openai_flags(tmp_path, url, "--max_new_tokens", "16", "--max_retries", "3")) == 1
    err = capsys.readouterr().err
    limit = teachers.answer_byte_limit(16, 1, len(annotate.build_query(
        annotate.load_prompt(annotate.parse_args(openai_flags(tmp_path, url))), DATASETS["custom"], {"input": "s0"})))
    seen = f"announced {50 * 2**20 + 39} bytes" if step == "huge_declared" else f"sent more than {limit} bytes"
    assert (f"{url}/completions {seen} for one answer; {limit} bytes are the most that --max_new_tokens 16 with "
            "--samples 1 allows: is the server ignoring max_tokens?") in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while fake.sent.get("s0", 0) < 50 * 2**20 and fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fake.in_flight and fake.sent["s0"] < 20 * 2**20, f"the server wrote {fake.sent['s0']} bytes"
    assert len(fake.arrivals["s0"]) == 1
    assert not (tmp_path / "custom" / "t1").exists() or not list((tmp_path / "custom" / "t1").iterdir())


@pytest.mark.parametrize("server_n, requests_per_prompt", [("takes", 1), ("ignores", 3), ("refuses", 4)])
def test_samples_use_n_where_the_server_takes_it(endpoint, server_n, requests_per_prompt):
    from teachers import OpenAITeacher

    fake, url = endpoint(delay=0, n=server_n)
    teacher = OpenAITeacher(url, "teacher-1", False, None, 16, ["\n\n"], 1, 5.0, 0, samples=3, temperature=0.7,
                            top_p=0.9)
    done = []
    outputs = teacher(["Q: s0\nA:", "Q: s1\nA:"], done.append)
    assert done == [1, 1] and [len(samples) for samples in outputs] == [3, 3]
    assert outputs[0][0] == "Because 0. So the answer is 1." and outputs[1][0] == "Because 1. So the answer is 3."
    if server_n == "takes":
        assert outputs[0] == ["Because 0. So the answer is 1.", *(f"Because 0 #{j}. So the answer is 1." for j in (1, 2))]
    # 'refuses': the first prompt's refused n=3 costs one request more; later prompts ask without n.
    assert len(fake.requests) == 2 * requests_per_prompt - (1 if server_n == "refuses" else 0)
    body = fake.requests[-1][2]
    assert (body["temperature"], body["top_p"]) == (0.7, 0.9)


def test_ctrl_c_stops_within_seconds_and_keeps_finished_chunks(endpoint, tmp_path):
    custom_data(tmp_path, n_train=6)
    fake, url = endpoint({f"s{i}": ["hang"] for i in range(2, 6)}, delay=0)
    script = (
        "import dataclasses, sys; sys.path.insert(0, sys.argv[1]); import annotate; from data_utils import DATASETS; "
        "DATASETS['custom'] = dataclasses.replace(DATASETS['custom'], chunk_size=2); "
        "sys.exit(annotate.main(sys.argv[2:]))"
    )
    flags = openai_flags(tmp_path, url, "--concurrency", "4", "--timeout", "60", "--max_retries", "5")
    process = subprocess.Popen([sys.executable, "-c", script, str(ROOT), *flags], stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "custom" / "t1"
    try:
        deadline = time.monotonic() + 120
        # Both requests of the second chunk (s2, s3) arrived: the first chunk's two are over and it is written.
        def second_chunk_in_flight() -> bool:
            return {"s2", "s3"} <= set(fake.arrivals) and fake.in_flight == 2

        while not second_chunk_in_flight() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert second_chunk_in_flight(), "the second chunk's requests must be in flight when Ctrl-C comes"
        sent = len(fake.requests)
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert time.monotonic() - start < 5, "in-flight requests are cancelled, not waited for"
    assert process.returncode == 130 and "Traceback" not in err
    assert f"interrupted: finished chunks are kept in {folder}; run the same command to resume" in err
    assert sorted(p.name for p in folder.iterdir()) == ["train_CoT_0.json", "train_CoT_0.usage.json"]
    time.sleep(1.0)
    assert len(fake.requests) == sent, "no retries after Ctrl-C"


def test_http_teacher_samples_are_written_per_row(endpoint, tmp_path):
    custom_data(tmp_path, n_train=3, n_test=1)
    fake, url = endpoint()
    flags = openai_flags(tmp_path, url, "--samples", "2", "--temperature", "0.8", "--top_p", "0.9")
    assert annotate.main(flags) == 0
    assert len(fake.requests) == 3 and {body["n"] for _, _, body in fake.requests} == {2}
    assert {(body["temperature"], body["top_p"]) for _, _, body in fake.requests} == {(0.8, 0.9)}
    written = json.loads((tmp_path / "custom" / "t1" / "train_CoT_0.json").read_text())
    assert written[1] == ["Because 1. So the answer is 3.", "Because 1 #1. So the answer is 3."]


def completion_words(i: int) -> int:
    """The completion tokens FakeEndpoint reports for row s<i>'s one choice."""
    label = i + 1 if i % 2 == 0 else i + 2
    return len(f" Because {i}. So the answer is {label}.\n\nQ: what next?".split())


def test_http_teacher_cost_per_request_chunk_and_split(endpoint, tmp_path, monkeypatch, capsys):
    small_chunks(monkeypatch, "custom", 3)
    custom_data(tmp_path, n_train=7)
    fake, url = endpoint({"s4": [503, 429], "s6": ["no_usage"]})
    flags = openai_flags(tmp_path, url, "--concurrency", "2", "--price_prompt", "2.5", "--price_completion", "10")
    assert annotate.main(flags) == 0, capsys.readouterr().err
    folder = tmp_path / "custom" / "t1"
    prompts = {re.search(r"Q: (\S+)\nA:$", body["prompt"]).group(1): body["prompt"] for _, _, body in fake.requests}

    usage = json.loads((folder / "train_CoT_1.usage.json").read_text())
    assert usage["wall_seconds"] > 0
    by_row = {request["rows"][0]: request for request in usage["requests"]}
    assert sorted(by_row) == [0, 1, 2], "one request per row of chunk 1 (s3, s4, s5), by its position in the chunk"
    assert by_row[1]["attempts"] == 3 and by_row[0]["attempts"] == by_row[2]["attempts"] == 1
    assert by_row[1]["prompt_tokens"] == prompt_words(prompts["s4"])
    assert by_row[1]["completion_tokens"] == completion_words(4)
    assert by_row[1]["seconds"] >= by_row[0]["seconds"] > 0, "the retried request took its attempts and backoff"
    [last] = json.loads((folder / "train_CoT_2.usage.json").read_text())["requests"]
    assert (last["prompt_tokens"], last["completion_tokens"]) == (None, None), "s6 answered without usage"

    cost = json.loads((folder / "train_annotation.json").read_text())["teacher_cost"]
    counted = [f"s{i}" for i in range(6)]
    prompt_tokens = sum(prompt_words(prompts[key]) for key in counted)
    completion_tokens = sum(completion_words(i) for i in range(6))
    assert cost == {
        "chunks": 3, "chunks_without_record": 0, "requests": 7, "attempts": 9, "retries": 2,
        "requests_without_usage": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens, "request_seconds": pytest.approx(cost["request_seconds"]),
        "wall_seconds": pytest.approx(cost["wall_seconds"]), "price_prompt": 2.5, "price_completion": 10.0,
        "cost": pytest.approx((2.5 * prompt_tokens + 10 * completion_tokens) / 1e6),
    }
    out = capsys.readouterr().out
    assert (f"train teacher cost: {prompt_tokens:,} prompt + {completion_tokens:,} completion tokens in 7 requests "
            "(2 retries)") in out and "not counted: 1 request(s) without the server's usage" in out


def test_a_resumed_annotation_keeps_the_earlier_chunks_costs(endpoint, tmp_path, monkeypatch, capsys):
    small_chunks(monkeypatch, "custom", 2)
    custom_data(tmp_path, n_train=6)
    fake, url = endpoint({"s4": [400]})
    assert annotate.main(openai_flags(tmp_path, url, "--concurrency", "1")) == 1
    folder = tmp_path / "custom" / "t1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "train_CoT_0.json", "train_CoT_0.usage.json", "train_CoT_1.json", "train_CoT_1.usage.json"]
    first_run = len(fake.requests)
    assert annotate.main(openai_flags(tmp_path, url, "--concurrency", "1")) == 0
    assert len(fake.requests) == first_run + 2, "only the last chunk is asked again"
    prompts = {re.search(r"Q: (\S+)\nA:$", body["prompt"]).group(1): body["prompt"] for _, _, body in fake.requests}
    cost = json.loads((folder / "train_annotation.json").read_text())["teacher_cost"]
    assert (cost["requests"], cost["attempts"], cost["chunks_without_record"]) == (6, 6, 0)
    assert cost["prompt_tokens"] == sum(prompt_words(prompts[f"s{i}"]) for i in range(6))
    assert cost["completion_tokens"] == sum(completion_words(i) for i in range(6))
    assert "cost" not in cost, "no prices, no cost"

    # A chunk written before usage was recorded is counted apart, and its tokens are missing from the totals.
    (folder / "train_CoT_0.usage.json").unlink()
    assert annotate.main(openai_flags(tmp_path, "http://127.0.0.1:9/v1")) == 0
    cost = json.loads((folder / "train_annotation.json").read_text())["teacher_cost"]
    assert (cost["requests"], cost["chunks_without_record"]) == (4, 1)
    assert "not counted: 1 chunk(s) annotated before usage was recorded" in capsys.readouterr().out


def test_a_run_records_the_teacher_budget_of_its_rows(endpoint, tiny_t5, tmp_path, monkeypatch, capsys):
    """fraction x the train split's totals, and the cost where the annotation was priced."""
    small_chunks(monkeypatch, "custom", 4)
    custom_data(tmp_path / "data", n_train=20, n_test=2)
    _, url = endpoint(delay=0)
    for split in ("train", "test"):
        assert annotate.main(openai_flags(tmp_path / "data", url, "--split", split, "--price_prompt", "1",
                                          "--price_completion", "4")) == 0
    totals = json.loads((tmp_path / "data" / "custom" / "t1" / "train_annotation.json").read_text())["teacher_cost"]
    status = run.main([
        "--dataset", "custom", "--data_dir", str(tmp_path / "data"), "--llm", "t1", "--subsample", "0.5",
        "--from_pretrained", str(tiny_t5), "--gen_max_len", "4", "--no_log", "--max_steps", "1", "--eval_steps", "1",
        "--batch_size", "2", "--output_dir", str(tmp_path / "out"),
    ])
    assert status == 0, capsys.readouterr().err
    [path] = list((tmp_path / "out").rglob("results.json"))
    budget = json.loads(path.read_text())["teacher_budget"]
    assert budget == {"fraction": 0.5, "split_tokens": totals["total_tokens"], "tokens": 0.5 * totals["total_tokens"],
                      "split_cost": pytest.approx(totals["cost"]), "cost": pytest.approx(0.5 * totals["cost"])}
    assert totals["cost"] == pytest.approx((totals["prompt_tokens"] + 4 * totals["completion_tokens"]) / 1e6)


def test_missing_api_key_variable_is_one_line(tmp_path, capsys):
    custom_data(tmp_path)
    status = annotate.main(openai_flags(tmp_path, "http://127.0.0.1:9/v1", "--api_key_env", "DSS_NO_SUCH_KEY"))
    assert status == 1 and "--api_key_env DSS_NO_SUCH_KEY" in capsys.readouterr().err


# ---- custom datasets ----


def test_custom_dataset_loads_with_optional_valid_and_own_rationales(tmp_path):
    custom_data(tmp_path, n_train=20, rationale=True)
    splits = load_data("custom", tmp_path, llm="none")
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (18, 2, 3)
    write_lines(tmp_path / "custom" / "custom_valid.json", [{"input": "v", "label": 42, "rationale": "r"}])
    splits = load_data("custom", tmp_path, llm="dataset")
    assert (len(splits["train"]), len(splits["valid"])) == (20, 1)
    assert splits["valid"]["label"] == ["42"] and splits["train"]["llm_rationale"][0] == "one more than 0"

    write_lines(tmp_path / "custom" / "custom_valid.json", [{"input": "v", "label": "x"}])
    with pytest.raises(DataError, match="custom valid: row 1 has no 'rationale' field"):
        load_data("custom", tmp_path, llm="dataset")
    write_lines(tmp_path / "custom" / "custom_valid.json", [{"input": ["v"], "label": "x"}])
    with pytest.raises(DataError, match="row 1 has a malformed field .*'input' must be text"):
        load_data("custom", tmp_path, llm="none")


def test_custom_dataset_missing_files_say_what_to_write(tmp_path):
    (tmp_path / "custom").mkdir()
    with pytest.raises(DataError, match=r"custom_train.json: write your data as JSON lines with 'input' and 'label'"):
        load_data("custom", tmp_path, llm="none")
    custom_data(tmp_path)
    with pytest.raises(DataError, match=r"custom/t9/train_CoT_0.json: write them with annotate.py --llm_name t9"):
        load_data("custom", tmp_path, llm="t9")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "custom"], "--dataset custom has no PaLM/GPT outputs"),
        (["--dataset", "custom", "--llm", "dataset", "--label_type", "llm"], "--llm dataset has rationales but no"),
        (["--dataset", "cqa", "--custom_metric", "equation"], "--custom_metric is for --dataset custom"),
    ],
)
def test_run_flags_for_custom_datasets(flags, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(flags)
    assert message in capsys.readouterr().err


def test_run_trains_on_a_custom_dataset(tiny_t5, tmp_path, capsys):
    rows = [{"input": f"the apple tree {i}", "label": f"( {i}.0 + 1.0 )", "rationale": f"{i} plus one"} for i in range(12)]
    write_lines(tmp_path / "data" / "custom" / "custom_train.json", rows)
    write_lines(tmp_path / "data" / "custom" / "custom_test.json", rows[:2])
    status = run.main([
        "--dataset", "custom", "--data_dir", str(tmp_path / "data"), "--llm", "dataset", "--custom_metric", "equation",
        "--from_pretrained", str(tiny_t5), "--gen_max_len", "4", "--no_log", "--max_steps", "2", "--eval_steps", "1",
        "--batch_size", "2", "--output_dir", str(tmp_path / "out"),
    ])
    assert status == 0, capsys.readouterr().err
    results = list((tmp_path / "out").rglob("results.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert record["config"]["custom_metric"] == "equation" and len(record["evaluations"]) == 2
