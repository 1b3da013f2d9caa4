"""How good the student's own rationales are (run.py --eval_rationales): ROUGE-L F1 of each generated rationale
against the teacher's, and whether each rationale agrees with the label the student itself predicted.

Agreement is checked by a per-dataset rule (data_utils.DatasetSpec.consistency names one of CONSISTENCY_RULES):

- equation (svamp, asdiv): the rationale's last arithmetic expression evaluates to the predicted answer's value
  (both through metrics' evaluator, which executes nothing; values within its tolerance count as equal); a
  rationale with no expression holding an operator is read by its last number;
- choice (cqa): the prediction is one of the input's answer choices, and its text is named in the rationale (as
  whole words, case and spacing ignored);
- relation (esnli, anli1): the relation the rationale states, read from cue words (NLI_CUES), is the predicted one.

These are heuristics, meant to compare runs with each other and with the teacher's own rationales, scored by the
same rule (`teacher_consistency`); a dataset without a rule reports consistency as None.
"""

import re
from collections.abc import Callable, Sequence

from metrics import equations_match_tolerant

# An arithmetic expression as rationales write them: numbers (negative ones too) joined by + - * /, with any
# parentheses.
NUMBER = r"\d+(?:\.\d+)?"
OPERAND = rf"\(*\s*-?{NUMBER}\s*\)*"
EXPRESSION = re.compile(rf"{OPERAND}(?:\s*[-+*/]\s*{OPERAND})+")
LAST_NUMBER = re.compile(rf"{NUMBER}(?!.*\d)", re.DOTALL)
# A multiple-choice input's answer choices, one a line: `(a) park` (data_utils' cqa rows).
CHOICE_LINE = re.compile(r"^\([a-z]\) (.*)$", re.MULTILINE)
# Cue words of each NLI relation, in the order they are looked for: the first relation with a cue in the rationale
# is the one it states ("not necessarily" marks neutral before "not" can mark a contradiction).
NLI_CUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("neutral", ("neutral", "not necessarily", "may or may not", "might", "could be", "unknown", "not mentioned",
                 "does not mention", "doesn't mention", "does not say", "doesn't say")),
    ("contradiction", ("contradict", "contradicts", "contradiction", "cannot", "can't", "not", "no", "never",
                       "impossible")),
    ("entailment", ("entail", "entails", "entailment", "implies", "imply", "implied", "means", "therefore", "so")),
)
NLI_CUE_PATTERNS = [(relation, re.compile(r"\b(?:" + "|".join(map(re.escape, cues)) + r")\b", re.IGNORECASE))
                    for relation, cues in NLI_CUES]


def last_equation(rationale: str) -> str | None:
    """The rationale's last arithmetic expression with an operator, else its last number, else None. Unbalanced
    parentheses at the edges (a sentence's own) are dropped."""
    expressions = EXPRESSION.findall(rationale)
    if expressions:
        expression = expressions[-1].strip()
        while expression.count("(") > expression.count(")") and expression.startswith("("):
            expression = expression[1:].lstrip()
        while expression.count(")") > expression.count("(") and expression.endswith(")"):
            expression = expression[:-1].rstrip()
        return expression
    number = LAST_NUMBER.search(rationale)
    return number.group(0) if number else None


def equation_consistent(rationale: str, prediction: str, input_text: str) -> bool:
    """The rationale's last equation evaluates to the predicted answer's value (the input is not needed)."""
    expression = last_equation(rationale)
    return expression is not None and equations_match_tolerant(expression, prediction)


def words(text: str) -> str:
    return " ".join(text.lower().split())


def choice_consistent(rationale: str, prediction: str, input_text: str) -> bool:
    """The prediction is one of the input's answer choices, and the rationale names it."""
    choice = words(prediction)
    choices = {words(line) for line in CHOICE_LINE.findall(input_text)}
    return choice in choices and re.search(rf"(?<!\w){re.escape(choice)}(?!\w)", words(rationale)) is not None


def stated_relation(rationale: str) -> str | None:
    """The NLI relation the rationale states by its cue words (NLI_CUES), or None where it has none."""
    return next((relation for relation, pattern in NLI_CUE_PATTERNS if pattern.search(rationale)), None)


def relation_consistent(rationale: str, prediction: str, input_text: str) -> bool:
    """The rationale states the predicted relation (the input is not needed)."""
    return stated_relation(rationale) == prediction.strip()


# rule name -> (rationale, prediction, input text) -> whether they agree.
CONSISTENCY_RULES: dict[str, Callable[[str, str, str], bool]] = {
    "equation": equation_consistent,
    "choice": choice_consistent,
    "relation": relation_consistent,
}


def rouge_l(rationales: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each rationale against its reference (rouge-score, with its Porter stemmer)."""
    from rouge_score import rouge_scorer

    if len(rationales) != len(references):
        raise ValueError(f"{len(rationales)} rationales for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, rationale)["rougeL"].fmeasure for rationale, reference in
              zip(rationales, references)]
    return sum(scores) / len(scores) if scores else 0.0


def consistency(rule: str | None, rationales: Sequence[str], predictions: Sequence[str], inputs: Sequence[str]
                ) -> float | None:
    """The share of rationales that agree with their prediction (for their input) by the named rule; None without
    a rule."""
    if rule is None or not rationales:
        return None
    agree = CONSISTENCY_RULES[rule]
    return sum(agree(*row) for row in zip(rationales, predictions, inputs, strict=True)) / len(rationales)


def rationale_report(rule: str | None, inputs: Sequence[str], rationales: Sequence[str], predictions: Sequence[str],
                     teacher_rationales: Sequence[str], teacher_labels: Sequence[str]) -> dict:
    """results.json's `rationale_eval` for the rows' inputs: ROUGE-L F1 against the teacher's rationales, the
    student's consistency with its own labels, the teacher's with its own (the same rule's baseline), the rule and
    the rows scored."""
    return {
        "rouge_l": rouge_l(rationales, teacher_rationales),
        "consistency": consistency(rule, rationales, predictions, inputs),
        "teacher_consistency": consistency(rule, teacher_rationales, teacher_labels, inputs),
        "consistency_rule": rule,
        "rows": len(rationales),
    }
