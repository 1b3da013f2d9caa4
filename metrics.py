"""Accuracy for text labels and for arithmetic labels, with arithmetic evaluated safely (never `eval`)."""

import ast
import math
import operator
from collections.abc import Callable, Sequence

import numpy as np

# Longer strings are not equations a student or teacher writes for these datasets; refusing them bounds time.
MAX_EQUATION_CHARS = 500
# Bounds on `a ** b`: enough for squares and cubes in word problems, far from anything that allocates or hangs.
MAX_POWER_BASE = 1e6
MAX_POWER_EXPONENT = 64
# Values this close count as equal: float rounding (e.g. 0.1 + 0.2 vs 0.3) is ~1e-16 relative, while two
# different answers to a word problem differ by far more.
REL_TOL = 1e-9
ABS_TOL = 1e-9

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _NotArithmetic(Exception):
    pass


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        if type(node.op) in _BINARY:
            return _BINARY[type(node.op)](left, right)
        if isinstance(node.op, ast.Pow) and abs(left) <= MAX_POWER_BASE and abs(right) <= MAX_POWER_EXPONENT:
            return left**right
    raise _NotArithmetic


def eval_equation(equation: str) -> float:
    """Value of an arithmetic string such as `( 84.0 / 2.0 )`, or NaN if it is anything but plain arithmetic.

    Only numbers, parentheses, unary +/-, + - * / // % and bounded ** are allowed; everything is computed in
    floats, so no input can build huge integers. Never raises.
    """
    if not isinstance(equation, str) or len(equation) > MAX_EQUATION_CHARS:
        return math.nan
    try:
        value = _value(ast.parse(equation.strip(), mode="eval").body)
    except (_NotArithmetic, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError, TypeError):
        return math.nan
    if isinstance(value, complex) or not math.isfinite(value):
        return math.nan
    return value


def equations_match(pred: str, gold: str) -> bool:
    """True when both sides evaluate and agree within REL_TOL/ABS_TOL; a side with no value is wrong."""
    a, b = eval_equation(pred), eval_equation(gold)
    if math.isnan(a) or math.isnan(b):
        return False
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def text_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Exact string match, as in the paper."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    return float(np.mean([p == g for p, g in zip(preds, golds)])) if golds else 0.0


def equation_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Arithmetic answers compared by value, so `(84 / 2)` matches `( 84.0 / 2.0 )`."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    return float(np.mean([equations_match(p, g) for p, g in zip(preds, golds)])) if golds else 0.0


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "text": text_accuracy,
    "equation": equation_accuracy,
}
