"""Step one of distilling step-by-step: ask a teacher LLM for chain-of-thought rationales, few-shot.

    python annotate.py --dataset svamp --split train --teacher hf --model ./Llama-3.1-8B
    python annotate.py --dataset cqa --split test --teacher openai --base_url http://localhost:8000/v1 --model NAME

Writes <data_dir>/<dataset>/<llm_name>/<split>_CoT_<i>.json in the chunked layout of PaLM's outputs, so that
`run.py --dataset <dataset> --llm <llm_name>` trains on them. Finished chunks are kept: run again to resume.
With --samples K > 1 (and --temperature > 0) each chunk holds a list of K outputs per row; run.py --rationales
chooses among them. <split>_annotation.json holds the teacher audit (rationales.audit) and what the teacher cost
(teacher_cost.py: tokens, time, retries; priced with --price_prompt/--price_completion).
"""

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from cli import folder_name, fraction, non_negative_int, positive_float, positive_int, write_json_atomic
from data_utils import (
    BLANK,
    DATASETS,
    DataError,
    DatasetSpec,
    chunk_path,
    read_json_list,
    read_rows,
    samples_per_row,
)
from metrics import METRICS
from rationales import audit, describe_audit
from teacher_cost import describe_totals, split_totals, write_chunk_usage
from teachers import HFTeacher, OpenAITeacher, Teacher, TeacherError

PROMPTS = Path(__file__).resolve().parent / "prompts"
# llm/ holds PaLM's outputs; the others are run.py --llm keywords, so a folder of that name could not be used.
RESERVED_NAMES = ("llm", "palm", "gpt", "none", "dataset")
EXEMPLAR_SEPARATOR = "\n\n"


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(DATASETS), help="which dataset (custom: your own, see README)")
    add("--split", default="train", choices=["train", "valid", "test"], help="which split to annotate")
    add("--teacher", required=True, choices=["hf", "openai"],
        help="hf: a causal LM run here through transformers; openai: an OpenAI-compatible HTTP endpoint")
    add("--model", required=True,
        help="hf: local model directory or hub id; openai: the model name the endpoint serves")
    add("--llm_name", help="output folder beside llm/ (default: the model's basename); run.py --llm <llm_name> uses it")
    add("--data_dir", default="./datasets", help="the data folder (as for run.py)")
    add("--prompt_file", help="few-shot exemplars separated by blank lines (default: prompts/<dataset>.txt)")
    add("--max_new_tokens", type=positive_int, default=128, help="tokens generated per example")
    add("--stop", action="append",
        help="stop sequence, repeatable; \\n means a newline (default: a blank line, the end of an exemplar; "
        "--stop '' for none)")
    add("--samples", type=positive_int, default=1,
        help="continuations per input (K); K > 1 needs --temperature > 0 and writes K outputs per row")
    add("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 is greedy decoding")
    add("--top_p", type=fraction, default=1.0, help="nucleus sampling: keep the smallest token set with this mass")
    add("--seed", type=int, default=0, help="hf: seed of the sampling (a resumed run samples its new chunks afresh)")
    add("--custom_metric", choices=sorted(METRICS), help="--dataset custom: how the teacher's accuracy is scored")
    add("--batch_size", type=positive_int, default=8, help="hf: prompts generated together")
    add("--base_url", help="openai: the endpoint, e.g. http://localhost:8000/v1 or https://api.openai.com/v1")
    add("--chat", action="store_true", help="openai: use /v1/chat/completions instead of /v1/completions")
    add("--api_key_env", help="openai: environment variable holding the API key (default: OPENAI_API_KEY, if set)")
    add("--concurrency", type=positive_int, default=8, help="openai: requests in flight at once")
    add("--timeout", type=positive_float, default=120.0,
        help="openai: seconds one attempt at a request may take, from sending it to the answer's last byte")
    add("--max_retries", type=non_negative_int, default=5,
        help="openai: retries of a failed request (429, 5xx, timeout, dropped connection), with exponential backoff "
        "from 0.5 s or after the server's Retry-After")
    add("--price_prompt", type=non_negative_float, help="price per million prompt tokens: <split>_annotation.json "
        "then records the split's cost (in the prices' currency)")
    add("--price_completion", type=non_negative_float, help="price per million completion tokens")
    args = parser.parse_args(argv)

    spec = DATASETS[args.dataset]
    if args.split not in spec.splits:
        parser.error(f"{args.dataset} has no {args.split} split (run.py carves valid from train)")
    sources = spec.sources.get(args.split, (args.dataset,))
    if args.dataset not in sources:
        parser.error(f"{args.dataset} {args.split} is made of {', '.join(sources)}: annotate that dataset instead")
    if args.custom_metric and spec.from_paper:
        parser.error(f"--custom_metric is for --dataset custom; {args.dataset} is scored as in the paper")
    if args.samples > 1 and args.temperature == 0:
        parser.error(f"--samples {args.samples} with --temperature 0 would give {args.samples} identical greedy "
                     "outputs: pass --temperature > 0 (e.g. 0.7)")
    if args.teacher == "openai" and not args.base_url:
        parser.error("--teacher openai needs --base_url (e.g. http://localhost:8000/v1)")
    if args.llm_name is None:
        args.llm_name = re.sub(r"[^\w.-]+", "-", Path(args.model.rstrip("/")).name).strip("-.") or "teacher"
    if not folder_name(args.llm_name) or args.llm_name.lower() in RESERVED_NAMES:
        parser.error(f"--llm_name {args.llm_name!r}: choose a folder name (letters, digits, . _ -) other than "
                     f"{', '.join(RESERVED_NAMES)}; llm/ holds PaLM's outputs and the rest are run.py keywords")
    stops = ["\n\n"] if args.stop is None else args.stop
    args.stop = [stop.replace("\\n", "\n") for stop in stops if stop]
    return args


def answer_slot(spec: DatasetSpec) -> str:
    """The text that ends a query and starts an exemplar's answer, e.g. '\\nA:'."""
    return spec.query.rsplit("}", 1)[1]


def exemplar_labels(prompt: str, spec: DatasetSpec) -> list[str]:
    """The label the dataset's parser reads from each exemplar's answer; BLANK where it reads none."""
    labels = []
    for exemplar in prompt.strip().split(EXEMPLAR_SEPARATOR):
        parts = exemplar.split(answer_slot(spec), 1)
        labels.append(spec.parse(parts[1].strip())[1] if len(parts) == 2 else BLANK)
    return labels


def load_prompt(args: argparse.Namespace) -> str:
    """The few-shot exemplars; refused unless every exemplar's answer parses, since the teacher copies their form."""
    spec = DATASETS[args.dataset]
    path = Path(args.prompt_file) if args.prompt_file else PROMPTS / f"{args.dataset}.txt"
    if not path.is_file():
        raise DataError(f"prompt file {path} not found")
    prompt = path.read_text(encoding="utf-8").strip()
    bad = [i for i, label in enumerate(exemplar_labels(prompt, spec), 1) if not label.strip()]
    if bad:
        raise DataError(f"prompt file {path}: exemplar(s) {', '.join(map(str, bad))} (separated by blank lines) "
                        f"have no answer the {args.dataset} parser reads; follow the format of "
                        f"prompts/{args.dataset}.txt")
    return prompt


def build_query(prompt: str, spec: DatasetSpec, row: dict) -> str:
    return prompt + EXEMPLAR_SEPARATOR + spec.query.format_map(row)


def make_teacher(args: argparse.Namespace) -> Teacher:
    sampling = {"samples": args.samples, "temperature": args.temperature, "top_p": args.top_p}
    if args.teacher == "hf":
        return HFTeacher(args.model, args.batch_size, args.max_new_tokens, args.stop, **sampling, seed=args.seed)
    key_env = args.api_key_env or "OPENAI_API_KEY"
    api_key = os.environ.get(key_env)
    if args.api_key_env and not api_key:
        raise TeacherError(f"--api_key_env {key_env}: that environment variable is not set")
    return OpenAITeacher(args.base_url, args.model, args.chat, api_key, args.max_new_tokens, args.stop,
                         args.concurrency, args.timeout, args.max_retries, **sampling)


def read_finished_chunk(path: Path, expected: int, samples: int) -> list[list[str]] | None:
    """A chunk written earlier (K outputs per row), or None if there is none yet; one of the wrong size or with another
    number of samples per row is refused, not redone."""
    if not path.is_file():
        return None
    outputs = read_json_list(path)
    if len(outputs) != expected:
        raise DataError(f"{path} holds {len(outputs)} outputs where {expected} were expected (the data changed?); "
                        "delete it, or the whole folder, to annotate it again")
    found = len(outputs[0]) if outputs and isinstance(outputs[0], list) else 1
    if found != samples:
        raise DataError(f"{path} holds {found} sample(s) per row where --samples {samples} asks for {samples}; "
                        "pass the --samples of that run to resume it, or another --llm_name for a new annotation")
    return samples_per_row(outputs)


def chunk_layout(outputs: list[list[str]], samples: int) -> list[str] | list[list[str]]:
    """What a chunk file holds: PaLM's one string per row for K = 1 (the layout of the paper's files), else the list
    of K strings per row."""
    return [output[0] for output in outputs] if samples == 1 else outputs


def output_folder(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / args.dataset / args.llm_name


def check_same_sampling(args: argparse.Namespace) -> None:
    """Refuse to add chunks sampled otherwise to a split whose earlier run recorded its sampling settings."""
    path = output_folder(args) / f"{args.split}_annotation.json"
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON; delete it (annotate.py writes it again at the end)") from None
    for key in ("samples", "temperature", "top_p"):
        if key in earlier and earlier[key] != getattr(args, key):
            raise DataError(f"{path}: this split was annotated with --{key} {earlier[key]}, not {getattr(args, key)}; "
                            "pass the same sampling flags, or another --llm_name for a new annotation")


def chunk_paths(args: argparse.Namespace, rows: int) -> list[Path]:
    chunks = math.ceil(rows / DATASETS[args.dataset].chunk_size)
    return [chunk_path(Path(args.data_dir), args.dataset, args.llm_name, args.split, i) for i in range(chunks)]


def annotate(args: argparse.Namespace, prompt: str, rows: list[dict]) -> list[list[str]]:
    """Every row's teacher outputs (K per row), chunk by chunk; finished chunks are read back, missing ones generated,
    each written after its usage record (teacher_cost.py).
    Queries are built one chunk at a time: the few-shot prompt repeated over a whole split would not fit memory."""
    spec = DATASETS[args.dataset]
    chunks = [rows[start : start + spec.chunk_size] for start in range(0, len(rows), spec.chunk_size)]
    paths = chunk_paths(args, len(rows))
    check_same_sampling(args)
    finished = [read_finished_chunk(path, len(chunk), args.samples) for path, chunk in zip(paths, chunks)]
    todo = [i for i, outputs in enumerate(finished) if outputs is None]
    if todo:
        teacher = make_teacher(args)
        output_folder(args).mkdir(parents=True, exist_ok=True)
        done = len(rows) - sum(len(chunks[i]) for i in todo)
        with tqdm(total=len(rows), initial=done, unit="ex", desc=f"{args.dataset} {args.split}") as bar:
            for i in todo:
                began = time.perf_counter()
                finished[i] = teacher([build_query(prompt, spec, row) for row in chunks[i]], bar.update)
                write_chunk_usage(paths[i], teacher.requests, time.perf_counter() - began)
                write_json_atomic(paths[i], chunk_layout(finished[i], args.samples), indent=None)
    return [output for outputs in finished for output in outputs]


def score(args: argparse.Namespace, outputs: list[list[str]], golds: list[str]) -> dict:
    """The teacher audit: how often its outputs parse, how often their labels are right (an unparsed one is wrong),
    first sample and voted, and how well its samples agree."""
    spec = DATASETS[args.dataset]
    labels = [[spec.parse(output)[1] for output in samples] for samples in outputs]
    return audit(labels, golds, args.custom_metric or spec.metric, spec.classes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.dataset]
    folder = output_folder(args)
    try:
        prompt = load_prompt(args)
        rows = read_rows(Path(args.data_dir), args.dataset, args.split, eos="</s>")  # refuses an empty file
        outputs = annotate(args, prompt, rows)
    except (DataError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished chunks are kept in {folder}; run the same command to resume", file=sys.stderr)
        return 130
    scores = score(args, outputs, [row["label"] for row in rows])
    cost = split_totals(chunk_paths(args, len(rows)), args.price_prompt, args.price_completion)
    record = {
        **scores,
        "dataset": args.dataset, "split": args.split, "teacher": args.teacher, "model": args.model,
        "llm_name": args.llm_name, "prompt_file": args.prompt_file or f"prompts/{args.dataset}.txt",
        "max_new_tokens": args.max_new_tokens, "stop": args.stop, "chunk_size": spec.chunk_size,
        "chunks": cost["chunks"],
        "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
        **({"seed": args.seed} if args.teacher == "hf" else {}),
        "teacher_cost": cost,
    }
    write_json_atomic(folder / f"{args.split}_annotation.json", record, indent=2)
    print(describe_audit(args.split, scores))
    print(describe_totals(args.split, cost))
    print(f"{len(outputs)} inputs x {args.samples} outputs in {folder}: parse rate {scores['parse_rate']:.4f}, "
          f"teacher accuracy {scores['accuracy']:.4f} ({scores['metric']}); train on them with run.py --dataset "
          f"{args.dataset} --llm {args.llm_name}" + (" --rationales all|correct|vote" if args.samples > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
