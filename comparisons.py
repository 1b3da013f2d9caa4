"""Paired comparisons of runs from their saved per-example test predictions, for summarize.py.

Two methods (or two run groups a user names) are compared on the seeds both ran and the test rows both scored:
the difference in accuracy with its bootstrap confidence interval, a sign-flip test over seeds and McNemar's exact
test on the pooled rows, Holm-adjusted over the comparisons of one table (stats.py holds the tests). Nothing is
re-run: the verdicts are those each run's metric gave, read from its test_predictions.jsonl. Runs that cannot be
paired are named in the notes that go with the table, never dropped silently.
"""

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

import stats

SIGNIFICANCE_LEVEL = 0.05
COMPARISON_FIELDS = ("table", "group", "comparison", "difference", "ci_low", "ci_high", "seeds", "rows", "p_seeds",
                     "p_seeds_holm", "p_rows", "p_rows_holm")
DEFINITIONS = (
    "Paired differences (accuracy of the first minus the second, in percentage points), from the runs' per-example "
    f"test predictions, on the seeds and test rows both have: {100 * stats.CONFIDENCE:g}% CI by a bootstrap over "
    f"seeds and test rows ({stats.BOOTSTRAP_SAMPLES} resamples, RNG seed {stats.BOOTSTRAP_SEED}); p seeds: "
    "two-sided sign-flip permutation test over the per-seed differences (two seeds or more); p rows: McNemar's exact "
    "test on the rows of all seeds pooled; both p-values Holm-adjusted over the comparisons of this table, "
    f"* where below {SIGNIFICANCE_LEVEL:g}."
)


def percent(fraction: float) -> str:
    """0.125 -> '12.5%', as the paper labels training-set sizes."""
    return f"{100 * fraction:g}%"


def cell_name(run: dict) -> str:
    """Where a run sits in a table: its training fraction, and its alpha for the task-prefix methods."""
    alpha = f", alpha {run['alpha']:g}" if run["alpha"] is not None else ""
    return percent(run["fraction"]) + alpha


@cache
def read_verdicts(path: Path) -> dict[int, bool]:
    """Test row index -> whether the run's metric counted its prediction correct, from a test_predictions.jsonl."""
    with open(path, encoding="utf-8") as f:
        return {row["index"]: bool(row["correct"]) for row in map(json.loads, f)}


def verdicts_of(runs: list[dict], rows: list[int]) -> np.ndarray:
    """seeds x rows verdicts (1 correct, 0 wrong) of runs, in the order given."""
    return np.array([[read_verdicts(run["predictions"])[row] for row in rows] for run in runs], dtype=float)


def common_rows(runs: list[dict]) -> list[int]:
    """The test rows every run scored."""
    return sorted(set.intersection(*(set(read_verdicts(run["predictions"])) for run in runs)))


def without_predictions(runs: list[dict], where: Callable[[dict], str]) -> list[str]:
    """A note per run that kept no per-example predictions, so it is in the accuracy table but in no comparison;
    where(run) names its place in the table, as the comparisons' notes do."""
    return [f"{run['method']} at {where(run)}, seed {run['seed']}: no per-example test predictions (a run from "
            f"before they were kept, or resumed past its selected evaluation): {run['path']}"
            for run in runs if run["predictions"] is None]


def pair_by_seed(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict], where: str
                 ) -> tuple[list[tuple[dict, dict]], list[str]]:
    """(run of a, run of b) for each seed both have with predictions, and a note per seed that has no partner."""
    seeds_a = {run["seed"]: run for run in runs_a if run["predictions"] is not None}
    seeds_b = {run["seed"]: run for run in runs_b if run["predictions"] is not None}
    notes = [f"{name} at {where}, seed {seed}: no {other} run with predictions for this seed to pair with"
             for name, mine, other, theirs in ((name_a, seeds_a, name_b, seeds_b), (name_b, seeds_b, name_a, seeds_a))
             for seed in sorted(mine.keys() - theirs.keys())]
    return [(seeds_a[seed], seeds_b[seed]) for seed in sorted(seeds_a.keys() & seeds_b.keys())], notes


def compare(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict], where: str
            ) -> tuple[dict | None, list[str]]:
    """The paired comparison of a against b at one table cell (None where no seed pairs up), and its notes."""
    pairs, notes = pair_by_seed(name_a, runs_a, name_b, runs_b, where)
    label = f"{name_a} − {name_b}"
    if not pairs:
        return None, notes + [f"{label} at {where}: no seed with predictions for both, so not compared"]
    paired = [run for pair in pairs for run in pair]
    rows = common_rows(paired)
    sizes = {len(read_verdicts(run["predictions"])) for run in paired}
    if sizes != {len(rows)}:
        notes.append(f"{label} at {where}: compared on the {len(rows)} test rows all paired runs scored (their "
                     f"files hold {', '.join(map(str, sorted(sizes)))})")
    if not rows:
        return None, notes + [f"{label} at {where}: the paired runs share no test row, so not compared"]
    correct_a, correct_b = verdicts_of([a for a, _ in pairs], rows), verdicts_of([b for _, b in pairs], rows)
    differences = correct_a - correct_b
    return {
        "group": where, "comparison": label, "seeds": [a["seed"] for a, _ in pairs], "rows": len(rows),
        "difference": stats.mean_difference(correct_a, correct_b),
        "ci": stats.bootstrap_interval(differences),
        "p_seeds": stats.sign_flip_p(differences.mean(axis=1)),
        "p_rows": stats.mcnemar_exact_p(correct_a, correct_b),
    }, notes


def adjust(comparisons: list[dict]) -> list[dict]:
    """The comparisons of one table with Holm-adjusted p-values added (p_seeds_holm, p_rows_holm)."""
    for key in ("p_seeds", "p_rows"):
        for comparison, adjusted in zip(comparisons, stats.holm([c[key] for c in comparisons]), strict=True):
            comparison[f"{key}_holm"] = adjusted
    return comparisons


def method_comparisons(by_cell: dict[tuple[str, float], list[dict]], order: list[str]
                       ) -> tuple[list[dict], list[str]]:
    """Every pair of methods at each training fraction of a table ((method, fraction) -> runs), the later method in
    `order` against the earlier, Holm-adjusted together; with the notes on runs that could not be paired."""
    runs = [run for members in by_cell.values() for run in members]
    comparisons, notes = [], without_predictions(runs, lambda run: percent(run["fraction"]))
    for fraction in sorted({fraction for _, fraction in by_cell}):
        methods = [method for method in order if (method, fraction) in by_cell]
        for i, earlier in enumerate(methods):
            for later in methods[i + 1 :]:
                result, cell_notes = compare(later, by_cell[later, fraction], earlier, by_cell[earlier, fraction],
                                             percent(fraction))
                comparisons += [result] if result else []
                notes += cell_notes
    return adjust(comparisons), notes


def group_comparisons(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict]
                      ) -> tuple[list[dict], list[str]]:
    """--compare: runs of group a against runs of group b with the same dataset, method, fraction and alpha,
    seed by seed; runs of one group with no counterpart, or several runs for one seed, are noted."""
    by_key: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: {name_a: [], name_b: []})
    for name, runs in ((name_a, runs_a), (name_b, runs_b)):
        for run in runs:
            by_key[run["dataset"], run["method"], run["fraction"], run["alpha"] or 0.0][name].append(run)
    comparisons, notes = [], without_predictions(runs_a + runs_b, lambda run: f"{run['dataset']}, {cell_name(run)}")
    for (dataset, method, _, _), members in sorted(by_key.items()):
        where = f"{dataset}, {method}, {cell_name((members[name_a] or members[name_b])[0])}"
        crowded = [name for name, runs in members.items() if len({r["seed"] for r in runs}) < len(runs)]
        if crowded:
            notes.append(f"{where}: {' and '.join(crowded)} holds runs of several settings with the same seed; "
                         "not compared (name folders that hold one setting each)")
            continue
        result, cell_notes = compare(name_a, members[name_a], name_b, members[name_b], where)
        comparisons += [result] if result else []
        notes += cell_notes
    return adjust(comparisons), notes


def p_cell(p: float | None) -> str:
    """A Holm-adjusted p-value for the table, starred where significant; – where the test does not apply."""
    if p is None:
        return "–"
    return f"{p:.3g}" + ("*" if p < SIGNIFICANCE_LEVEL else "")


def points(share: float) -> str:
    """A difference of shares in signed percentage points."""
    return f"{100 * share:+.2f}"


def markdown_table(comparisons: list[dict], group_title: str) -> str:
    """One line per comparison: difference, CI, seeds, rows and the adjusted p-values."""
    lines = [f"| {group_title} | comparison | difference (pp) | {100 * stats.CONFIDENCE:g}% CI (pp) | seeds | rows "
             "| p seeds (Holm) | p rows (Holm) |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for c in comparisons:
        low, high = c["ci"]
        lines.append(f"| {c['group']} | {c['comparison']} | {points(c['difference'])} | [{points(low)}, "
                     f"{points(high)}] | {len(c['seeds'])} | {c['rows']} | {p_cell(c['p_seeds_holm'])} | "
                     f"{p_cell(c['p_rows_holm'])} |")
    return "\n".join(lines)


def report(comparisons: list[dict], notes: list[str], group_title: str) -> str:
    """The Markdown that follows an accuracy table: definitions, the comparisons and the runs left unpaired."""
    parts = [DEFINITIONS, markdown_table(comparisons, group_title)] if comparisons else [
        "No paired comparison: no two methods have per-example predictions for a common seed."]
    if notes:
        parts.append("Not paired (left out of the comparisons above):\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def csv_rows(table: str, comparisons: list[dict]) -> list[dict]:
    """comparisons.csv rows: differences and CI bounds as shares, raw and adjusted p-values."""
    return [{
        "table": table, "group": c["group"], "comparison": c["comparison"], "difference": round(c["difference"], 6),
        "ci_low": round(c["ci"][0], 6), "ci_high": round(c["ci"][1], 6), "seeds": " ".join(map(str, c["seeds"])),
        "rows": c["rows"], **{key: "" if c[key] is None else f"{c[key]:.6g}" for key in COMPARISON_FIELDS[-4:]},
    } for c in comparisons]


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARISON_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def accuracy_band(runs: list[dict]) -> tuple[float, float] | None:
    """The bootstrap confidence interval (over seeds and test rows) of a cell's accuracy, for the plot's band;
    None unless every run of the cell kept its predictions (a band of some seeds would not match the mean)."""
    if not runs or any(run["predictions"] is None for run in runs):
        return None
    rows = common_rows(runs)
    return stats.bootstrap_interval(verdicts_of(runs, rows)) if rows else None
