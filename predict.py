"""Label new inputs with a trained student (a run's best/ folder, or a LoRA adapter folder such as best/adapter),
optionally with its rationales. Seq2seq and decoder-only students alike.

    python predict.py --model ckpts/<config>/0/best "Where would you find a bus? Answer Choices: ..."
    python predict.py --model ckpts/<config>/0/best --rationale --json --file questions.jsonl

Inputs come from the arguments, from --file (one input per line, or JSON lines with an "input" field for inputs
spanning lines), or from stdin. They get the task prefixes used in training: `predict: ` for the label and
`explain: ` for the rationale; --no_prefix is for models trained with --model_type standard. Decoder-only students
get the prompts they were trained on (see views.py); pass --chat_template if the run did.
"""

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from cli import first_line, positive_int
from config import GEN_MAX_LEN
from data_utils import json_rows
from views import EXPLAIN_PREFIX, PREDICT_PREFIX

# An input longer than this many characters per token kept (--max_input_length) is cut before it is tokenised.
CHARACTERS_PER_TOKEN = 64
LAST_WORD = re.compile(r"\s+\S*\Z")


class InputError(Exception):
    """Inputs that cannot be read; the message says which file/line and what was expected."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="*", help="inputs to label (default: --file, else stdin)")
    add("--model", required=True, help="a saved student: a run's best/ folder (model and tokenizer), or a LoRA "
        "adapter folder (best/adapter)")
    add("--chat_template", action="store_true", help="decoder-only students trained with --chat_template")
    add("--file", help="read inputs from this file: plain lines, or JSON lines with an \"input\" field")
    add("--rationale", action="store_true", help="also generate each input's rationale (task_prefix models)")
    add("--json", action="store_true", help="print JSON lines {input, label[, rationale]} instead of text")
    add("--no_prefix", action="store_true", help="feed inputs without `predict: ` (models trained with standard)")
    add("--batch_size", type=positive_int, default=16, help="inputs generated together")
    add("--max_new_tokens", type=positive_int, default=GEN_MAX_LEN - 1, help="tokens generated per label or "
        "rationale; a run's evaluation generates its --gen_max_len minus 1 (the start token)")
    add("--max_input_length", type=positive_int, default=1024, help="input tokens kept (truncation), as in run.py")
    args = parser.parse_args(argv)
    if args.no_prefix and args.rationale:
        parser.error("--rationale needs a task_prefix model, which reads prefixed inputs: drop --no_prefix")
    if args.file and args.inputs:
        parser.error("give inputs either as arguments or with --file, not both")
    return args


def parse_lines(lines: list[str], source: str, as_json: bool) -> list[str]:
    """Inputs from lines: plain text (blank lines skipped) or JSON objects with a string "input" field."""
    if not as_json:
        return [line for line in lines if line.strip()]
    inputs = []
    for number, row in json_rows(lines, InputError, source):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise InputError(f"{source}:{number}: expected a JSON object with a string \"input\" field")
        inputs.append(row["input"])
    return inputs


def read_inputs(args: argparse.Namespace) -> list[str]:
    """The inputs from the arguments, --file or stdin; JSON lines when the file is .jsonl/.json or starts with `{`."""
    if args.inputs:
        return [text for text in args.inputs if text.strip()]
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else e
            raise InputError(f"cannot read --file {args.file} ({reason})") from None
        source = args.file
    else:
        if sys.stdin.isatty():
            print("reading inputs from stdin, one per line; end with Ctrl-D", file=sys.stderr)
        source = "<stdin>"
        try:
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"{source}: byte {e.start} is not UTF-8 text; pipe in UTF-8 text, one input per "
                             "line") from None
    first = next((line for line in lines if line.strip()), "")
    as_json = Path(source).suffix in (".jsonl", ".json") or first.lstrip().startswith("{")
    return parse_lines(lines, source, as_json)


def load_model(directory: str):
    """Tokenizer and model of a saved student (either family, full or LoRA adapter), on the GPU when there is one.
    A T5 tokenizer gives the token ids that training and evaluation gave (views.original_t5_pretokenization)."""
    import torch
    from transformers.utils import logging

    from students import load_saved, quiet_tied_weight_notices
    from views import original_t5_pretokenization

    logging.disable_progress_bar()  # stdout/stderr carry predictions and errors only
    quiet_tied_weight_notices()
    _, tokenizer, model = load_saved(directory)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return original_t5_pretokenization(tokenizer), model


def generate(tokenizer, model, texts: list[str], args: argparse.Namespace) -> list[str]:
    """Greedy decoding with the family's settings, decoded as evaluation records it (special tokens skipped)."""
    import torch

    from students import causal_generate, family_of

    family = family_of(model.config)
    if family.prompt_in_output:
        return causal_generate(tokenizer, model, texts, args.max_input_length, args.max_new_tokens, args.chat_template)
    batch = tokenizer(texts, max_length=args.max_input_length, truncation=True, padding=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model.generate(
            **batch.to(model.device), max_new_tokens=args.max_new_tokens, num_beams=1, do_sample=False,
            **family.generation,
        )
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def cut_for_tokenizer(tokenizer, text: str, max_tokens: int) -> str | None:
    """The text, or where it is longer than CHARACTERS_PER_TOKEN x max_tokens characters, a prefix of it whose
    tokens begin with the same max_tokens tokens as the whole text's; None where no such prefix was found.

    Tokenising a huge line whole only to keep its first tokens would cost memory and time out of all proportion.
    The prefix ends where a word ends before the budget, and it is taken only if the tokens lying before its last
    word already number max_tokens: tokenizers split text at whitespace before anything else (SentencePiece's
    Metaspace, byte-level BPE's pre-tokenising patterns), so no token before a word reaches past it, and those
    tokens are the whole text's too. None: the budget holds no word boundary, or too few tokens (mostly whitespace or invisible characters).
    A tokenizer without offsets (not a fast one) gets the whole text."""
    budget = CHARACTERS_PER_TOKEN * max_tokens
    if len(text) <= budget or not getattr(tokenizer, "is_fast", False):
        return text
    last_word = LAST_WORD.search(text[: budget + 1])
    prefix = text[: last_word.start()] if last_word else ""
    before_last_word = LAST_WORD.search(prefix)
    if before_last_word is None:
        return None
    offsets = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    stable = sum(1 for _, end in offsets if end <= before_last_word.start())
    return prefix if stable >= max_tokens else None


def bounded_texts(tokenizer, prefix: str, inputs: list[str], first_number: int, max_tokens: int) -> list[str]:
    """prefix + each input, cut where far longer than max_tokens (cut_for_tokenizer); an input that cannot be cut
    safely is an InputError naming it by its number (first_number for the first)."""
    texts = []
    for number, text in enumerate(inputs, first_number):
        cut = cut_for_tokenizer(tokenizer, prefix + text, max_tokens)
        if cut is None:
            raise InputError(f"input {number} ({len(text)} characters, starting {text[:40]!r}) is too long to read: "
                             f"its first {CHARACTERS_PER_TOKEN * max_tokens} characters hold no word boundary or "
                             f"fewer than the {max_tokens} tokens --max_input_length keeps (mostly whitespace or "
                             "invisible characters?); shorten it to the part the model should read")
        texts.append(cut)
    return texts


def predictions(tokenizer, model, inputs: list[str], args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """{input, label[, rationale]} per input, generated batch by batch so output streams."""
    label_prefix = "" if args.no_prefix else PREDICT_PREFIX
    for start in range(0, len(inputs), args.batch_size):
        chunk = inputs[start : start + args.batch_size]
        labels = generate(tokenizer, model, bounded_texts(tokenizer, label_prefix, chunk, start + 1,
                                                          args.max_input_length), args)
        rationales = []
        if args.rationale:
            rationales = generate(tokenizer, model, bounded_texts(tokenizer, EXPLAIN_PREFIX, chunk, start + 1,
                                                                  args.max_input_length), args)
        for i, text in enumerate(chunk):
            row = {"input": text, "label": labels[i]}
            if rationales:
                row["rationale"] = rationales[i]
            yield row


def format_row(row: dict[str, str], as_json: bool) -> str:
    """A JSON line, or `label` / `label<TAB>rationale` with whitespace runs made single spaces (one line each)."""
    if as_json:
        return json.dumps(row, ensure_ascii=False)
    return "\t".join(" ".join(row[key].split()) for key in ("label", "rationale") if key in row)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not any((Path(args.model) / name).is_file() for name in ("config.json", "adapter_config.json")):
        print(f"error: --model {args.model} is not a saved model folder (no config.json or adapter_config.json); "
              "pass a run's best/ folder, e.g. ckpts/<config>/<run>/best", file=sys.stderr)
        return 1
    try:
        inputs = read_inputs(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not inputs:
        print("error: no inputs: pass them as arguments, with --file, or on stdin (one per line)", file=sys.stderr)
        return 1
    from recovery import RunError, check_tokenizer

    try:
        tokenizer, model = load_model(args.model)
    except Exception as e:  # noqa: BLE001 - OSError, or the weight loaders' own errors for truncated files
        print(f"error: could not load --model {args.model} ({first_line(e)}); save it again or pick another "
              "checkpoint", file=sys.stderr)
        return 1
    try:
        check_tokenizer(tokenizer, f"--model {args.model}")
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        for row in predictions(tokenizer, model, inputs, args):
            print(format_row(row, args.json), flush=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
