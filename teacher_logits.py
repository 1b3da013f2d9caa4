"""Store a teacher's top-k token log-probabilities at every target token of a run's training rows, once, for
run.py --kd_logits (token-level distillation without running the teacher at training time; see logit_store.py).

    python teacher_logits.py --teacher google/flan-t5-large --top_k 20 -- --dataset cqa --from_pretrained \\
        google/t5-v1_1-base --label_type llm
    python run.py --dataset cqa --from_pretrained google/t5-v1_1-base --label_type llm --kd_weight 0.5 \\
        --kd_logits <the folder printed above>

The flags after -- are run.py's, exactly as the training run will take them: they choose the rows (dataset,
subsample, seed, labels, rationales) and the student whose tokenizer makes the views. The teacher must share the
student's family and vocabulary. An interrupted extraction resumes where it stopped when run again.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable

from cli import positive_int

# Seconds one completions request may take (a row's prompt, scored once).
SERVER_TIMEOUT_S = 600


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_ID",
                        help="the teacher: a model of the student's family and vocabulary")
    parser.add_argument("--teacher_url", metavar="URL",
                        help="score with a decoder-only teacher served by an OpenAI-compatible server that returns "
                        "prompt log-probabilities (vLLM: http://host:8000/v1); --teacher is then its model name")
    parser.add_argument("--top_k", type=positive_int, default=20, help="log-probabilities kept per target token")
    parser.add_argument("--out", help="where stores are kept (default: <data_dir>/<dataset>/teacher_logits)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="rows per teacher pass")
    parser.add_argument("--chunk_rows", type=positive_int, default=512,
                        help="rows per chunk written (an interruption loses at most one chunk's work)")
    parser.add_argument("run_flags", nargs=argparse.REMAINDER, help="-- then run.py's flags for the training run")
    args = parser.parse_args(argv)
    flags = args.run_flags[1:] if args.run_flags[:1] == ["--"] else args.run_flags
    if not flags:
        parser.error("give the training run's flags after --, e.g. -- --dataset cqa --from_pretrained <student>")
    return args, flags


def local_states(teacher) -> Callable:
    """teacher_states for logit_store.model_top_k: the local teacher, on the GPU where there is one, at a view's
    target tokens."""
    import torch

    from fast_loss import TARGET_STATES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device)
    head = teacher.get_output_embeddings().weight

    @torch.no_grad()
    def teacher_states(view: dict):
        view = {name: tensor.to(device) for name, tensor in view.items()}
        hidden, _, keeps = TARGET_STATES[teacher.config.is_encoder_decoder](teacher, [view])
        return hidden, head, keeps[0]

    return teacher_states


def server_completions(url: str) -> Callable[[dict], dict]:
    """POST a request body to <url>/completions and return the answer's JSON; a RunError naming --teacher_url
    where the server cannot be reached or refuses."""
    import httpx2

    from recovery import RunError

    client = httpx2.Client(timeout=SERVER_TIMEOUT_S)

    def complete(body: dict) -> dict:
        try:
            response = client.post(url.rstrip("/") + "/completions", json=body)
        except httpx2.HTTPError as e:
            raise RunError(f"--teacher_url {url}: {e}") from None
        if response.status_code != 200:
            raise RunError(f"--teacher_url {url}: HTTP {response.status_code} ({response.text[:200]}); the "
                           "server must accept prompt_logprobs (vLLM does)")
        return response.json()

    return complete


def main(argv: list[str] | None = None) -> int:
    args, flags = parse_args(argv)
    import run

    config = run.parse_args(flags)
    from distill import load_teacher, output_rows
    from logit_store import data_fingerprint, extract, model_top_k, served_top_k, store_key, tokenizer_digest
    from model_utils import unwrap_peft
    from recovery import RunError
    from students import load_student
    from token_cache import cached_tokenize
    from train_utils import cache_folder, ensure_data, run_splits

    try:
        if config.data.rationales != "first":
            raise RunError(f"--rationales {config.data.rationales}: a store holds one rationale per input; "
                           "use run.py --kd_teacher instead")
        ensure_data(config.data)
        family, tokenizer, student = load_student(config.student, config.training.seed)
        if args.teacher_url:
            if not family.prompt_in_output:
                raise RunError("--teacher_url serves decoder-only teachers (prompt log-probabilities); for a "
                               f"{family.name} student pass --teacher a local model")
            vocabulary = output_rows(unwrap_peft(student))
            view_top_k = served_top_k(server_completions(args.teacher_url), args.teacher, args.top_k)
        else:
            teacher = load_teacher(args.teacher, student, tokenizer, source="--teacher")
            vocabulary = output_rows(teacher)
            view_top_k = model_top_k(local_states(teacher), args.top_k, vocabulary)
        if args.top_k > vocabulary:
            raise RunError(f"--top_k {args.top_k} is more than the vocabulary ({vocabulary} tokens)")
        del student
        splits = run_splits(config, family.segment_joiner(tokenizer))
        train = cached_tokenize(cache_folder(config.output), family.tokenize, splits, tokenizer, config.training.model_type,
                                config.training.max_input_length, config.student.chat_template)["train"]
        root = Path(args.out) if args.out else Path(config.data.data_dir) / config.data.dataset / "teacher_logits"
        meta = {"teacher": args.teacher, "vocabulary": vocabulary, "data": data_fingerprint(train),
                "tokenizer": tokenizer_digest(tokenizer)}
        try:
            folder = extract(root, store_key(args.teacher, train, args.top_k, tokenizer), train, view_top_k,
                             family.make_collator(tokenizer, config.training.model_type), args.top_k, meta,
                             args.batch_size, args.chunk_rows)
        except PermissionError as e:
            raise RunError(f"cannot write the store under {root} ({e.strerror}: {e.filename}); pass --out a folder "
                           "you can write to") from None
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
