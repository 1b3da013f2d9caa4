"""Choosing among a teacher's sampled rationales, and auditing the teacher against the gold labels.

annotate.py --samples K stores K sampled outputs per input; run.py --rationales decides which become training rows:

- first: the first sample's rationale and label only (the paper; with K = 1 exactly its data);
- all: every sample whose rationale parsed becomes an explain row of its input ("diverse reasoning");
- correct: only samples whose label matches the gold label under the dataset's metric;
- vote: the label is the majority over the samples' parsed labels (self-consistency; a tie goes to the label seen
  first), and the rationales are those agreeing with it.

The predict view stays one row per input whatever the mode (see model_utils.TaskPrefixDataCollator), so the label
loss is not reweighted by the number of rationales.
"""

import functools
from collections import Counter
from collections.abc import Callable, Sequence

from data_utils import BLANK
from metrics import METRICS

RATIONALE_MODES = ("first", "all", "correct", "vote")
Match = Callable[[str, str], bool]


def label_match(metric: str) -> Match:
    """Whether two labels are the same answer, by the dataset's own metric (exact text, or arithmetic value).
    Cached: labels repeat (three classes for NLI), and the metric is called on one pair at a time."""
    score = METRICS[metric]

    @functools.lru_cache(maxsize=1 << 16)
    def match(a: str, b: str) -> bool:
        return score([a], [b]) == 1.0

    return match


def parsed(label: str) -> bool:
    return bool(label.strip())


def vote(labels: Sequence[str], match: Match) -> tuple[str, list[bool]]:
    """(the majority label, which samples agree with it). Unparsed labels do not vote; labels the metric calls equal
    (such as `(84 / 2)` and `42`) vote together, under the first one's text; a tie goes to the label seen first.
    With no parsed label the vote is BLANK and no sample agrees."""
    firsts: list[str] = []  # one representative per answer, in order of first appearance
    counts: Counter[int] = Counter()
    answer_of: list[int | None] = []
    for label in labels:
        if not parsed(label):
            answer_of.append(None)
            continue
        index = next((i for i, first in enumerate(firsts) if match(label, first)), None)
        if index is None:
            index = len(firsts)
            firsts.append(label)
        counts[index] += 1
        answer_of.append(index)
    if not firsts:
        return BLANK, [False] * len(labels)
    winner = max(counts, key=lambda i: (counts[i], -i))
    return firsts[winner], [answer == winner for answer in answer_of]


def choose(
    rationales: Sequence[str], labels: Sequence[str], gold: str, mode: str, match: Match
) -> tuple[list[str], str]:
    """(the rationales kept for one input, its teacher label) under a --rationales mode. The teacher label is the
    first sample's (the paper's llm label), or the majority's under vote."""
    if mode == "first":
        return [rationales[0]], labels[0]
    if mode == "vote":
        label, agree = vote(labels, match)
        return [r for r, keep in zip(rationales, agree) if keep and parsed(r)], label
    if mode == "correct":
        right = [parsed(r) and parsed(label) and match(label, gold) for r, label in zip(rationales, labels)]
        return [r for r, keep in zip(rationales, right) if keep], labels[0]
    if mode == "all":
        return [r for r in rationales if parsed(r)], labels[0]
    raise ValueError(f"unknown rationale mode {mode!r}; expected one of {', '.join(RATIONALE_MODES)}")


def choose_rationales(split, mode: str, metric: str):
    """The train split with a `rationales` column (the kept ones per input) and, under vote, the voted teacher label
    as `llm_label`; it needs the `llm_rationales` and `llm_labels` columns of load_data(samples=True)."""
    match = label_match(metric)
    kept, labels = [], []
    for rationales, sample_labels, gold in zip(split["llm_rationales"], split["llm_labels"], split["label"]):
        chosen, label = choose(rationales, sample_labels, gold, mode, match)
        kept.append(chosen)
        labels.append(label)
    split = split.add_column("rationales", kept)
    if mode == "vote":
        split = split.remove_columns("llm_label").add_column("llm_label", labels)
    return split


def kept_counts(split, mode: str) -> dict:
    """What a --rationales mode kept of a split made by choose_rationales: inputs, inputs with at least one rationale,
    rationales, and teacher samples."""
    kept = split["rationales"]
    return {
        "mode": mode,
        "inputs": len(kept),
        "inputs_with_rationales": sum(bool(r) for r in kept),
        "rationales": sum(len(r) for r in kept),
        "samples": sum(len(r) for r in split["llm_rationales"]),
    }


def describe_counts(counts: dict) -> str:
    return (f"--rationales {counts['mode']}: {counts['rationales']} rationales of {counts['samples']} teacher samples "
            f"kept for training; {counts['inputs_with_rationales']} of {counts['inputs']} inputs have at least one "
            "(the others keep their predict row only)")


def audit(
    sample_labels: Sequence[Sequence[str]], golds: Sequence[str], metric: str, classes: Sequence[str] = ()
) -> dict:
    """How good the teacher is on one split: parse rate (share of samples with a label), accuracy of the first sample
    (the paper's "LLM Acc") and of the vote, agreement (mean share of an input's samples agreeing with its vote),
    unanimity, the share of inputs with at least one correct sample (what --rationales correct keeps), the share of
    correct samples, and for classification datasets the first and voted accuracy per gold class."""
    match = label_match(metric)
    rows = len(golds)
    samples = sum(len(labels) for labels in sample_labels)
    first_right, voted_right, agreement, unanimous, any_right, right = [], [], 0.0, 0, 0, 0
    for labels, gold in zip(sample_labels, golds):
        voted, agree = vote(labels, match)
        correct = [parsed(label) and match(label, gold) for label in labels]
        first_right.append(correct[0])
        voted_right.append(parsed(voted) and match(voted, gold))
        agreement += sum(agree) / len(labels)
        unanimous += all(agree)
        any_right += any(correct)
        right += sum(correct)
    record = {
        "rows": rows,
        "samples_per_row": max((len(labels) for labels in sample_labels), default=0),
        "parse_rate": sum(parsed(label) for labels in sample_labels for label in labels) / max(samples, 1),
        "accuracy": sum(first_right) / max(rows, 1),
        "voted_accuracy": sum(voted_right) / max(rows, 1),
        "agreement": agreement / max(rows, 1),
        "unanimous": unanimous / max(rows, 1),
        "any_correct": any_right / max(rows, 1),
        "correct_samples": right / max(samples, 1),
        "metric": metric,
    }
    if classes:
        per_class = {}
        for name in classes:
            members = [i for i, gold in enumerate(golds) if gold == name]
            per_class[name] = {
                "rows": len(members),
                "accuracy": sum(first_right[i] for i in members) / max(len(members), 1),
                "voted_accuracy": sum(voted_right[i] for i in members) / max(len(members), 1),
            }
        record["per_class"] = per_class
    return record


def describe_audit(split: str, record: dict) -> str:
    """The audit as a few printed lines."""
    lines = [
        f"teacher audit, {split}: {record['rows']} inputs x {record['samples_per_row']} samples; parse rate "
        f"{record['parse_rate']:.4f}; accuracy {record['accuracy']:.4f} (first sample), {record['voted_accuracy']:.4f} "
        f"(voted); agreement {record['agreement']:.4f}, unanimous {record['unanimous']:.4f}; inputs with a correct "
        f"sample {record['any_correct']:.4f}, correct samples {record['correct_samples']:.4f} ({record['metric']})"
    ]
    for name, stats in record.get("per_class", {}).items():
        lines.append(f"  {split} class {name}: {stats['rows']} inputs, accuracy {stats['accuracy']:.4f} (first), "
                     f"{stats['voted_accuracy']:.4f} (voted)")
    return "\n".join(lines)


def tokenize_kept_rationales(train, rationales: list[list[str]], tokenizer, max_length: int):
    """The tokenized train split with `kept_rationale_labels`: every kept rationale's target ids, per input (an empty
    list where none was kept), which the collator turns into that input's explain rows."""
    flat = [text for texts in rationales for text in texts]
    ids = tokenizer(text_target=flat, max_length=max_length, truncation=True)["input_ids"] if flat else []
    per_input, start = [], 0
    for texts in rationales:
        per_input.append(ids[start : start + len(texts)])
        start += len(texts)
    return train.add_column("kept_rationale_labels", per_input)
