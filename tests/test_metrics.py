"""Accuracy metrics and the safe arithmetic evaluator (no eval, no hang, no unbounded allocation)."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import equation_accuracy, equations_match, eval_equation, text_accuracy


@pytest.mark.parametrize(
    "equation, value",
    [("( 84.0 / 2.0 )", 42.0), ("(84 / 2)", 42.0), ("-(3 - 5) * 2", 4.0), ("2 ** 3", 8.0), ("7 // 2", 3.0),
     ("7 % 4", 3.0), ("+1.5", 1.5), ("((1 + 2) * (3 + 4))", 21.0), ("1e3", 1000.0), (" 5 ", 5.0)],
)
def test_arithmetic_values(equation, value):
    assert eval_equation(equation) == value


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('touch /tmp/pwned')", "9**9**9**9", "'a'*10**9", "(175, 5)", "x + 1", "abs(-1)",
     "1 / 0", "5 // 0", "5 % 0", "(" * 300 + "1" + ")" * 300, "1" + "0" * 400, "[1]", "True + 1",
     "1 if 1 else 2", "lambda: 1", "'3'", "", "   ", "1 +", "2 ** 1000", "10 ** 400", "(-8) ** 0.5", "1" * 600, "1j"],
)
def test_anything_but_plain_arithmetic_has_no_value(text):
    assert math.isnan(eval_equation(text))


def test_non_string_has_no_value():
    assert math.isnan(eval_equation(None))  # type: ignore[arg-type]


def test_equations_compare_by_value_with_float_tolerance():
    assert equations_match("(84 / 2)", "( 84.0 / 2.0 )")
    assert equations_match("0.1 + 0.2", "0.3")
    assert equations_match("(1 / 3) * 3", "1")
    assert not equations_match("42.0001", "42")
    assert not equations_match("nonsense", "nonsense"), "two missing values must not count as a match"


def test_accuracies():
    assert text_accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert equation_accuracy(["(1 + 1)", "3", "bad"], ["2", "( 1.5 * 2.0 )", "4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        text_accuracy(["a"], ["a", "b"])


MALICIOUS = st.sampled_from([
    "__import__('os').system('touch /tmp/dss-pwned')", "9**9**9**9", "'a'*10**9", "(" * 1000 + ")" * 1000,
    "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()", "10**10**10", "2**2**2**2**2**2",
    "[i for i in range(10**9)]", "globals()", "exit()", "-" * 10000 + "1",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), MALICIOUS, st.builds(lambda a, b: a + b, MALICIOUS, st.text(max_size=20))))
def test_property_never_raises_never_hangs_never_executes(text):
    start = time.perf_counter()
    value = eval_equation(text)
    elapsed = time.perf_counter() - start
    assert isinstance(value, float)
    assert math.isnan(value) or math.isfinite(value)
    assert elapsed < 0.05, f"{text[:40]!r} took {elapsed * 1000:.1f} ms"


def test_no_side_effect_from_malicious_strings(tmp_path):
    target = tmp_path / "pwned"
    eval_equation(f"__import__('os').system('touch {target}')")
    eval_equation(f"open('{target}', 'w')")
    assert not target.exists()


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.integers(-1000, 1000).map(str) | st.floats(-1e3, 1e3, allow_nan=False).map(lambda f: f"{f:.3f}"),
    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    max_leaves=12,
))
def test_property_generated_arithmetic_matches_python(expression):
    try:
        expected = float(eval(compile(expression, "<test>", "eval"), {"__builtins__": {}}))  # trusted: generated here
    except ZeroDivisionError:
        expected = math.nan
    value = eval_equation(expression)
    if math.isnan(expected) or not math.isfinite(expected):
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)
