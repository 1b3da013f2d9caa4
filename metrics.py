"""Accuracy for text labels and for arithmetic labels, the latter with the paper's verdicts but never `eval`.

The paper's code scores an equation by `eval`-ing both strings as Python and comparing the values in numpy arrays
(`np.array(preds) == np.array(labels)`): a string that fails to evaluate, or whose value is not a number (a tuple
such as `(175, 5)`), is wrong. Here the same Python expressions are evaluated by walking their syntax tree with
Python's own operators, so every value, error and comparison is Python's, while nothing is executed and the work is
bounded.
"""

import ast
import cmath
import math
import operator
from collections.abc import Callable, Sequence

import numpy as np

# Longer strings are refused (wrong): labels and generated answers are a few dozen characters; this bounds the work.
MAX_EQUATION_CHARS = 2000
# Integers above this many bits are refused: far past any answer (floats end at 1,024 bits), and below it arithmetic
# stays cheap.
MAX_INT_BITS = 16384
# Tuples with more items than this, nested items included, are refused (a tuple answer is wrong anyway; this bounds
# `(1,) * n` and comparisons of nested tuples).
MAX_TUPLE_ITEMS = 10_000
# --tolerant_equations: values this close count as equal (float rounding, e.g. 0.1 + 0.2 vs 0.3, is ~1e-16 relative).
REL_TOL = 1e-9
ABS_TOL = 1e-9

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_NUMBER = (bool, int, float, complex)


class NoValue(Exception):
    """The string has no value the original could compare: a syntax or arithmetic error, or a form this evaluator does
    not take (names, calls, strings, ...)."""


class TooLarge(NoValue):
    """A value past the bounds above, refused rather than computed."""


def _tuple_items(value: tuple, limit: int) -> int:
    """Items of a tuple, nested tuples' items included, counted up to just past limit (so counting is bounded too)."""
    count = len(value)
    for item in value:
        if count > limit:
            break
        if isinstance(item, tuple):
            count += _tuple_items(item, limit - count)
    return count


def _check_bounds(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TooLarge("integer too large")
    if isinstance(value, tuple) and _tuple_items(value, MAX_TUPLE_ITEMS) > MAX_TUPLE_ITEMS:
        raise TooLarge("tuple too long")
    return value


def _precheck_binary(op: type, left, right) -> None:
    """Refuse, before computing, the operations whose result would pass the bounds (huge powers, shifts, repeats)."""
    if op is ast.Pow and type(left) in (int, bool) and type(right) in (int, bool) and right > 0:
        if abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise TooLarge("power too large")
    elif op is ast.LShift and type(left) in (int, bool) and type(right) in (int, bool) and left:
        if right > MAX_INT_BITS:
            raise TooLarge("shift too large")
    elif op is ast.Mult:
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, tuple) and type(count) in (int, bool) and len(sequence) * count > MAX_TUPLE_ITEMS:
                raise TooLarge("tuple too long")


def _constant(node: ast.Constant):
    if type(node.value) in _NUMBER or node.value is None or node.value is Ellipsis:
        return node.value
    raise NoValue(f"{type(node.value).__name__} constant")


def _evaluate(root: ast.AST):
    """The value Python gives the expression tree, computed with an explicit stack (deep trees are fine) and with
    Python's short-circuits: `and`/`or` return an operand, a chained comparison stops at its first false link."""
    values: list = []
    todo: list[tuple[ast.AST, int]] = [(root, 0)]
    while todo:
        node, step = todo.pop()
        if isinstance(node, ast.Constant):
            values.append(_constant(node))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            if step == 0:
                todo += [(node, 1), (node.operand, 0)]
            else:
                values.append(_check_bounds(_UNARY[type(node.op)](values.pop())))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if step == 0:
                todo += [(node, 1), (node.right, 0), (node.left, 0)]
            else:
                right, left = values.pop(), values.pop()
                _precheck_binary(type(node.op), left, right)
                values.append(_check_bounds(_BINARY[type(node.op)](left, right)))
        elif isinstance(node, ast.BoolOp):
            # step i: values[-1] is operand i-1's value; `and` stops at a falsy one, `or` at a truthy one.
            if step > 0 and (step == len(node.values) or bool(values[-1]) == isinstance(node.op, ast.Or)):
                continue
            if step > 0:
                values.pop()
            todo += [(node, step + 1), (node.values[step], 0)]
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            # step 1: the left operand is on the stack, evaluate the first comparator; step k >= 2: the operands of
            # link k-2 are on the stack: a false link (or the last) is the result, else its right side stays.
            if step > 0:
                if step > 1:
                    right, left = values.pop(), values.pop()
                    result = _COMPARE[type(node.ops[step - 2])](left, right)
                    if not result or step - 1 == len(node.ops):
                        values.append(result)
                        continue
                    values.append(right)
                todo += [(node, step + 1), (node.comparators[step - 1], 0)]
            else:
                todo += [(node, 1), (node.left, 0)]
        elif isinstance(node, ast.Tuple) and not any(isinstance(item, ast.Starred) for item in node.elts):
            if step == 0:
                todo.append((node, 1))
                todo += [(item, 0) for item in reversed(node.elts)]
            else:
                count = len(node.elts)
                items = tuple(values[len(values) - count :]) if count else ()
                del values[len(values) - count :]
                values.append(_check_bounds(items))
        else:
            raise NoValue(f"{type(node).__name__} is not evaluated")
    return values.pop()


def equation_value(equation: str):
    """The value Python's `eval(equation)` gives (a number, bool, tuple or None), computed without executing
    anything; raises NoValue where eval would fail or where this evaluator does not go (see NoValue)."""
    if not isinstance(equation, str):
        raise NoValue("not a string")
    if len(equation) > MAX_EQUATION_CHARS:
        raise TooLarge(f"longer than {MAX_EQUATION_CHARS} characters")
    try:
        # eval() drops leading spaces and tabs, then compiles in 'eval' mode.
        tree = compile(equation.lstrip(" \t"), "<equation>", "eval", ast.PyCF_ONLY_AST, dont_inherit=True)
        return _evaluate(tree.body)
    except (SyntaxError, ValueError, ArithmeticError, TypeError) as e:
        raise NoValue(str(e)) from None
    except (RecursionError, MemoryError) as e:  # the parser's own limits on nesting, as eval meets them too
        raise NoValue(type(e).__name__) from None


def _number(equation: str) -> bool | int | float | complex | None:
    """The string's value where it is a number (bools included, as numpy counts them), else None."""
    try:
        value = equation_value(equation)
    except NoValue:
        return None
    return value if isinstance(value, _NUMBER) else None


def eval_equation(equation: str) -> float:
    """The real value of an arithmetic string as a float, NaN where it has none (an error, a tuple, a complex)."""
    value = _number(equation)
    try:
        return math.nan if value is None or isinstance(value, complex) else float(value)
    except OverflowError:
        return math.nan


def equations_match(pred: str, gold: str) -> bool:
    """The original's verdict: both sides are numbers, equal as its numpy arrays compared them.

    Its batches hold a failed row (NaN) or float golds, so numbers compare as float64 (complex128): True equals 1
    and 1.0, and ints above 2**53 are rounded; an int that fits no numpy integer makes its row a Python object,
    compared exactly. NaN, an error or a non-number (a tuple) on either side is wrong.
    """
    a, b = _number(pred), _number(gold)
    return a is not None and b is not None and bool((np.array([a, np.nan]) == np.array([b, np.nan]))[0])


def equations_match_tolerant(pred: str, gold: str) -> bool:
    """--tolerant_equations: as equations_match, but values within REL_TOL/ABS_TOL count as equal."""
    a, b = _number(pred), _number(gold)
    if a is None or b is None:
        return False
    try:
        return cmath.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    except OverflowError:  # an int past float range
        return a == b


def _accuracy(match: Callable[[str, str], bool], preds: Sequence[str], golds: Sequence[str]) -> float:
    """The share of (prediction, gold) pairs that match; 0.0 for none."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    return float(np.mean([match(p, g) for p, g in zip(preds, golds)])) if golds else 0.0


def texts_match(pred: str, gold: str) -> bool:
    """Exact string match, as the paper's numpy string arrays compared (which ignore trailing NUL characters)."""
    return pred.rstrip("\0") == gold.rstrip("\0")


def text_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Labels compared as exact strings (see texts_match)."""
    return _accuracy(texts_match, preds, golds)


def equation_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Arithmetic answers compared by value, so `(84 / 2)` matches `( 84.0 / 2.0 )` (the original's verdicts)."""
    return _accuracy(equations_match, preds, golds)


def equation_accuracy_tolerant(preds: Sequence[str], golds: Sequence[str]) -> float:
    """--tolerant_equations: as equation_accuracy, with values within REL_TOL/ABS_TOL counted as equal."""
    return _accuracy(equations_match_tolerant, preds, golds)


# The verdict on one (prediction, gold) pair behind each metric: the per-example predictions a run keeps say which
# rows its metric counted as correct.
MATCHES: dict[str, Callable[[str, str], bool]] = {
    "text": texts_match,
    "equation": equations_match,
    "equation_tolerant": equations_match_tolerant,
}

METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "text": text_accuracy,
    "equation": equation_accuracy,
    "equation_tolerant": equation_accuracy_tolerant,
}
