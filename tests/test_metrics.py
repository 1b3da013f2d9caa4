"""Accuracy metrics: the equation verdicts are the original's (Python's own evaluation is the oracle), computed
without eval, within bounded time."""

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from metrics import (
    MATCHES,
    METRICS,
    NoValue,
    TooLarge,
    equation_accuracy,
    equation_value,
    equations_match,
    equations_match_tolerant,
    eval_equation,
    text_accuracy,
)

NUMBERS = (bool, int, float, complex)


def python_value(text: str):
    """The oracle: what the original's eval_equation gets (generated or shipped strings only, never model output)."""
    try:
        return eval(compile(text, "<oracle>", "eval", dont_inherit=True), {"__builtins__": {}})
    except Exception:
        return np.nan


def original_verdict(pred: str, gold: str) -> bool:
    """The original's `np.array(preds) == np.array(labels)` for one row of a batch that also holds a failed row
    (NaN), as its batches do; non-numbers (tuples) are wrong."""
    a, b = python_value(pred), python_value(gold)
    if not (isinstance(a, NUMBERS) and isinstance(b, NUMBERS)):
        return False
    return bool((np.array([a, np.nan]) == np.array([b, np.nan]))[0])


def same_value(a, b) -> bool:
    """Equal values of the same type; floats by repr, so NaN equals NaN and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (float, complex)):
        return repr(a) == repr(b)
    return a == b


@pytest.mark.parametrize(
    "equation, value",
    [("( 84.0 / 2.0 )", 42.0), ("(84 / 2)", 42.0), ("-(3 - 5) * 2", 4), ("2 ** 3", 8), ("7 // 2", 3),
     ("7 % 4", 3), ("+1.5", 1.5), ("((1 + 2) * (3 + 4))", 21), ("1e3", 1000.0), (" 5 ", 5), ("True + 1", 2),
     ("(34 + 40) and (62 - 17)", 45), ("0 or 3", 3), ("not 0", True), ("3 < 4 <= 4", True), ("3 ^ 2", 1),
     ("(175, 5)", (175, 5)), ("1e308 * 10", math.inf), ("0 and 1 / 0", 0)],
)
def test_values_are_pythons(equation, value):
    assert same_value(equation_value(equation), value)


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('touch /tmp/pwned')", "'a'*10**9", "x + 1", "abs(-1)", "np.nan", "1 / 0", "5 // 0",
     "5 % 0", "(" * 300 + "1" + ")" * 300, "[1]", "1 if 1 else 2", "lambda: 1", "'3'", "", "   ", "1 +", "1 < (1, 2)",
     "10.0 ** 400", "1 is 1", "1 in (1,)", "(*(1,),)"],
)
def test_what_python_cannot_evaluate_or_is_not_arithmetic_has_no_value(text):
    with pytest.raises(NoValue):
        equation_value(text)


@pytest.mark.parametrize("text", ["9**9**9**9", "10**10**10", "2 ** 100000", "1 << 10**6", "(1,) * 10**9",
                                  "((1,) * 5000,) * 3", "1" * 3000])
def test_huge_values_are_refused_before_they_are_computed(text):
    start = time.perf_counter()
    with pytest.raises(TooLarge):
        equation_value(text)
    assert time.perf_counter() - start < 0.05


def test_verdicts_as_the_original_gave_them():
    assert equations_match("(84 / 2)", "( 84.0 / 2.0 )")
    assert equations_match("True", "1.0") and equations_match("2 > 1", "1")
    assert equations_match("(34 + 40) and (62 - 17)", "( 62.0 - 17.0 )")
    assert not equations_match("0.1 + 0.2", "0.3"), "the original compares exactly"
    assert not equations_match("(175, 5)", "175") and not equations_match("(1, 2)", "(1, 2)"), "tuples are wrong"
    assert not equations_match("1 / 0", "1 / 0") and not equations_match("nonsense", "nonsense")
    assert not equations_match("1e309 - 1e309", "1e309 - 1e309"), "NaN equals nothing"
    assert equations_match("1e308 * 10", "1e309")
    assert equations_match("2 ** 53 + 1", "2.0 ** 53"), "compared as float64, as in the original's arrays"
    assert equations_match("10 ** 400", "10 ** 400") and not equations_match("2 ** 64 + 1", "2.0 ** 64"), \
        "an int that fits no numpy integer is compared exactly, as a Python object"


def test_tolerant_comparison_is_opt_in():
    assert equations_match_tolerant("0.1 + 0.2", "0.3") and equations_match_tolerant("(1 / 3) * 3", "1")
    assert not equations_match_tolerant("42.0001", "42") and not equations_match_tolerant("(1, 2)", "(1, 2)")
    assert METRICS["equation_tolerant"](["0.1 + 0.2"], ["0.3"]) == 1.0
    assert METRICS["equation"](["0.1 + 0.2"], ["0.3"]) == 0.0


def test_accuracies():
    assert text_accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert text_accuracy(["a ", "a"], ["a", "a\0"]) == 0.5, "compared unstripped, as numpy compared (NULs aside)"
    assert equation_accuracy(["(1 + 1)", "3", "bad"], ["2", "( 1.5 * 2.0 )", "4"]) == pytest.approx(2 / 3)
    assert eval_equation("(84 / 2)") == 42.0 and math.isnan(eval_equation("(1, 2)"))
    with pytest.raises(ValueError):
        text_accuracy(["a"], ["a", "b"])


def test_each_metric_is_the_mean_of_its_per_row_verdicts():
    preds, golds = ["(1 + 1)", "0.1 + 0.2", "a", "bad", "3"], ["2", "0.3", "a", "4", "( 1.5 * 2.0 )"]
    assert MATCHES.keys() == METRICS.keys()
    for name, match in MATCHES.items():
        verdicts = [match(p, g) for p, g in zip(preds, golds)]
        assert np.mean(verdicts) == METRICS[name](preds, golds), name
    assert [MATCHES["text"](p, g) for p, g in zip(preds, golds)] == [False, False, True, False, False]


MALICIOUS = st.sampled_from([
    "__import__('os').system('touch /tmp/dss-pwned')", "9**9**9**9", "'a'*10**9", "(" * 1000 + ")" * 1000,
    "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()", "10**10**10", "2**2**2**2**2**2",
    "[i for i in range(10**9)]", "globals()", "exit()", "-" * 10000 + "1", "-" * 1999 + "1", "1+" * 999 + "1",
    "((2**16000)**2)", "(1,)*9999*9999", "~" * 1999 + "1", "not " * 499 + "1",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), MALICIOUS, st.builds(lambda a, b: a + b, MALICIOUS, st.text(max_size=20))))
def test_property_never_raises_never_hangs_never_executes(text):
    start = time.perf_counter()
    matched = equations_match(text, text)
    elapsed = time.perf_counter() - start
    assert isinstance(matched, bool)
    assert elapsed < 0.2, f"{text[:40]!r} took {elapsed * 1000:.1f} ms"


def test_no_side_effect_from_malicious_strings(tmp_path):
    target = tmp_path / "pwned"
    equations_match(f"__import__('os').system('touch {target}')", "0")
    equations_match(f"open('{target}', 'w')", "0")
    assert not target.exists()


# ---- the oracle: Python's own eval of generated strings ----

SPACE = st.sampled_from(["", " ", "  "])
LITERALS = st.one_of(
    st.integers(0, 20).map(str),
    st.integers(0, 10**20).map(str),
    st.floats(0, 1e6, allow_nan=False).map(repr),
    st.sampled_from(["0.1", "0.2", "0.3", "84.0", "2.0", "1e308", "1e309", "0.0", "1_000", "0x1f", "2j", "True",
                     "False", "None", "9007199254740993", "9007199254740992.0"]),
)
SMALL_EXPONENT = st.integers(-3, 8).map(lambda n: f"({n})" if n < 0 else str(n))
BINARY = ["+", "-", "*", "/", "//", "%", "&", "|", "^", ">>"]
COMPARE = ["==", "!=", "<", "<=", ">", ">="]


def _compose(inner):
    paren = st.tuples(inner, SPACE).map(lambda t: f"({t[1]}{t[0]}{t[1]})")
    return st.one_of(
        st.tuples(inner, st.sampled_from(BINARY), inner, SPACE).map(lambda t: f"{t[0]}{t[3]}{t[1]}{t[3]}{t[2]}"),
        st.tuples(paren, st.sampled_from(["**", "<<"]), SMALL_EXPONENT).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(st.sampled_from(["-", "+", "~", "not "]), inner).map(lambda t: f"{t[0]}{t[1]}"),
        st.tuples(inner, st.sampled_from([" and ", " or "]), inner).map(lambda t: "".join(t)),
        st.lists(st.tuples(st.sampled_from(COMPARE), inner), min_size=1, max_size=3).flatmap(
            lambda links: inner.map(lambda first: first + "".join(f" {op} {x}" for op, x in links))),
        st.lists(inner, max_size=3).map(lambda items: f"({', '.join(items)}{',' if len(items) == 1 else ''})"),
        paren,
    )


EXPRESSIONS = st.recursive(LITERALS, _compose, max_leaves=10)


@settings(max_examples=5500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(EXPRESSIONS, EXPRESSIONS)
def test_property_values_and_verdicts_are_pythons(pred, gold):
    """10,000 generated strings (two per example): the same value as eval, and the original's verdict on the pair."""
    for text in (pred, gold):
        try:
            value = equation_value(text)
        except TooLarge:
            reject()  # refused by the bounds: eval would have to build it
        except NoValue:
            value = np.nan
        assert same_value(value, python_value(text)), text
    assert equations_match(pred, gold) == original_verdict(pred, gold), (pred, gold)
    assert equations_match(pred, pred) == original_verdict(pred, pred), pred


def test_every_shipped_teacher_label_gets_the_originals_verdict():
    from data_utils import load_data

    if not (SHARED_DATA / "svamp").is_dir():
        pytest.skip(f"svamp data not found at {SHARED_DATA}")
    splits = load_data("svamp", SHARED_DATA, llm="palm")
    pairs = [(p, g) for split in splits.values() for p, g in zip(split["llm_label"], split["label"])]
    assert len(pairs) == 1000
    disagreements = [(p, g) for p, g in pairs if equations_match(p, g) != original_verdict(p, g)]
    assert not disagreements
    assert any(isinstance(python_value(p), tuple) for p, _ in pairs), "the shipped labels include tuples (wrong)"
