"""Tables and plots of a sweep: selected test accuracy per method and training fraction, mean ± std over seeds,
and paired comparisons of the methods from the runs' per-example test predictions.

    python summarize.py sweeps/cqa            # writes summary.md, summary.csv, comparisons.csv and PNGs there
    python summarize.py sweeps --compare sweeps/t5-base sweeps/t5-large     # also: one run group against another

Runs are grouped by dataset and by every setting that changes results (student model, lr, steps, ...), so
only seeds are averaged: when a folder mixes settings, each combination gets its own table and plots. Each table
says which checkpoint its figures come from (chosen on test, the paper's protocol, or on valid).
"""

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

import comparisons  # noqa: E402
from comparisons import percent  # noqa: E402

METHOD_NAMES = {
    ("standard", "gt"): "standard_finetune",
    ("standard", "llm"): "standard_distill",
    ("task_prefix", "gt"): "dss_gt",
    ("task_prefix", "llm"): "dss_llm",
}
METHOD_ORDER = list(METHOD_NAMES.values())
# Flags that change a run's result, or what it measures, besides method, seed, fraction and alpha; runs differing
# in any are not pooled.
SETTING_KEYS = (
    "from_pretrained", "max_input_length", "batch_size", "grad_steps", "lr", "optimizer_name",
    "max_steps", "eval_steps", "gen_max_len", "bf16", "select_on", "max_eval_samples", "custom_metric",
    "chat_template", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
)
# Settings that make a run a debugging one (not the paper's protocol): its table says so.
DEBUG_KEYS = ("max_eval_samples",)
FIGSIZE = (6.4, 4.8)
DPI = 100
# Figures a run records besides its accuracy, averaged over the seeds that have them: its rationale report
# (run.py --eval_rationales) and the teacher budget of its training rows (an annotate.py teacher's recorded cost).
RUN_FIGURES = ("rouge_l", "consistency", "teacher_tokens", "teacher_cost")
CSV_FIELDS = ("dataset", "setting", "method", "fraction", "alpha", "n", "mean", "std", "seeds", "select_on",
              "protocol", *RUN_FIGURES)
# The checkpoint a table's test accuracies come from, by --select_on; test-selected and valid-selected figures
# never share a table.
PROTOCOLS = {
    "test": "checkpoint chosen on test (the paper's protocol: the best test accuracy seen during training)",
    "valid": "checkpoint chosen on valid (the test accuracy at the best-valid checkpoint)",
}
BUDGET_AXES = {"tokens": ("teacher_tokens", "teacher tokens for the training rows (prompt + completion, log scale)"),
               "cost": ("teacher_cost", "teacher cost of the training rows (log scale)")}


def method_name(config: dict) -> str:
    """sweep.py's method name; a teacher other than the paper's PaLM is named, so teachers are never pooled, and so
    is a --rationales choice other than the paper's (first)."""
    name = METHOD_NAMES[config["model_type"], config["label_type"]]
    llm = config.get("llm", "palm")
    uses_teacher = config["model_type"] == "task_prefix" or config["label_type"] == "llm"
    name = f"{name} [{llm}]" if uses_teacher and llm != "palm" else name
    mode = config.get("rationales", "first")
    name = f"{name} rationales={mode}" if uses_teacher and mode != "first" else name
    beta = config.get("kd_weight", 0)
    if beta:  # token-level distillation: a row per beta, divergence, temperature and teacher
        teacher = Path(str(config.get("kd_teacher") or config.get("kd_logits")).rstrip("/")).name
        name = f"{name} kd={beta:g} {config['kd_loss']} T={config['kd_temperature']:g} [{teacher}]"
    return name


def teacher_accuracy(record: dict) -> tuple[str, float, float | None] | None:
    """(teacher, test accuracy of its first sample, of its vote where it sampled several), from the teacher audit
    that --label_type llm runs record; None for other runs."""
    test = record.get("teacher_audit", {}).get("test")
    if test is None:
        return None
    voted = test["voted_accuracy"] if test.get("samples_per_row", 1) > 1 else None
    return record["config"].get("llm", "palm"), test["accuracy"], voted


def run_figures(record: dict) -> dict[str, float | None]:
    """RUN_FIGURES of one results.json: None where the run did not record them."""
    rationales = record.get("rationale_eval") or {}
    budget = record.get("teacher_budget") or {}
    return {"rouge_l": rationales.get("rouge_l"), "consistency": rationales.get("consistency"),
            "teacher_tokens": budget.get("tokens"), "teacher_cost": budget.get("cost")}


def hashable(value):
    """A setting's value as a dict key: lists (--lora_targets) become tuples."""
    return tuple(value) if isinstance(value, list) else value


def student_name(setting: tuple) -> str:
    """The student as tables and plots name it: its folder or hub name, and its LoRA rank if any."""
    config = dict(setting)
    name = Path(str(config.get("from_pretrained", "?")).rstrip("/")).name
    return f"{name}, LoRA r={config['lora_r']}" if config.get("lora_r") else name


def load_runs(root: Path) -> list[dict]:
    """One flat row per results.json under root; unreadable or unfinished records are reported and left out."""
    runs, seen = [], set()
    for path in sorted(root.rglob("results.json")):
        try:
            record = json.loads(path.read_text())
            config = record["config"]
            accuracy = record["selected_test_accuracy"]
            predictions = (record.get("test_predictions") or {}).get("file")
            row = {
                "dataset": config["dataset"],
                "setting": tuple((key, hashable(config[key])) for key in SETTING_KEYS if key in config),
                "method": method_name(config),
                "fraction": float(config["subsample"]),
                "alpha": float(config["alpha"]) if config["model_type"] == "task_prefix" else None,
                "seed": int(config["run"]),
                "accuracy": accuracy,
                "teacher": teacher_accuracy(record),
                "path": path,
                "best_accuracy": record.get("best_test_accuracy"),
                "predictions": path.parent / predictions
                if predictions and (path.parent / predictions).is_file() else None,
                **run_figures(record),
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"note: {path} left out: not a readable run record ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if accuracy is None:
            print(f"note: {path} left out: it has no test evaluation", file=sys.stderr)
            continue
        key = tuple(row[k] for k in ("dataset", "setting", "method", "fraction", "alpha", "seed"))
        if key in seen:
            print(f"note: {path} left out: the same run (seed {row['seed']}) was already counted", file=sys.stderr)
            continue
        seen.add(key)
        runs.append(row)
    return runs


def group_runs(runs: list[dict]) -> dict[tuple[str, tuple], list[dict]]:
    """Runs by (dataset, setting): each group's runs differ only in method, fraction, alpha and seed."""
    groups: dict[tuple[str, tuple], list[dict]] = defaultdict(list)
    for run in runs:
        groups[run["dataset"], run["setting"]].append(run)
    return dict(sorted(groups.items(), key=lambda item: (item[0][0], repr(item[0][1]))))


def differing_settings(groups: dict[tuple[str, tuple], list[dict]], dataset: str) -> dict[tuple, str]:
    """A short label per setting of one dataset, naming only the flags that differ between its settings."""
    settings = [setting for (name, setting) in groups if name == dataset]
    keys = list(dict.fromkeys(key for setting in settings for key, _ in setting))
    varying = [key for key in keys if len({dict(s).get(key) for s in settings}) > 1]
    labels = {}
    for s in settings:
        parts = [f"{key}={dict(s).get(key)}" for key in varying if key not in DEBUG_KEYS]
        debug = [f"{key}={dict(s)[key]}" for key in DEBUG_KEYS if dict(s).get(key) is not None]
        labels[s] = ", ".join(parts + ([f"debug: {', '.join(debug)}"] if debug else []))
    return labels


def aggregate(runs: list[dict]) -> dict[str, float | int | list[int] | None]:
    """n, mean, sample std (None for a single seed: there is no spread to report) and the seeds; each of
    RUN_FIGURES as its mean over the runs that recorded it (None where none did), and `rationale_n`, how many
    recorded a rationale report."""
    scores = [run["accuracy"] for run in runs]
    figures = {key: [run[key] for run in runs if run.get(key) is not None] for key in RUN_FIGURES}
    return {
        "n": len(scores),
        "mean": statistics.fmean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else None,
        "seeds": sorted(run["seed"] for run in runs),
        **{key: statistics.fmean(values) if values else None for key, values in figures.items()},
        "rationale_n": len(figures["rouge_l"]),
    }


def cell_runs(runs: list[dict], alpha: float) -> dict[tuple[str, float], list[dict]]:
    """(method, fraction) -> its runs; task_prefix methods only at the chosen alpha, standard ones at any."""
    by_cell: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in runs:
        if run["alpha"] is None or math.isclose(run["alpha"], alpha):
            by_cell[run["method"], run["fraction"]].append(run)
    return dict(by_cell)


def cells(runs: list[dict], alpha: float) -> dict[tuple[str, float], dict]:
    """(method, fraction) -> seed statistics; task_prefix methods only at the chosen alpha, standard ones at any."""
    return {cell: aggregate(members) for cell, members in cell_runs(runs, alpha).items()}


def ordered_methods(names: Iterable[str]) -> list[str]:
    """The paper's order (baselines first), a named teacher after PaLM."""
    return sorted(set(names), key=lambda m: (METHOD_ORDER.index(m.split(" ")[0]), m))


def markdown_table(table: dict[tuple[str, float], dict]) -> str:
    """Methods as rows, training fractions as columns; accuracy in percent as mean ± std (n seeds)."""
    fractions = sorted({fraction for _, fraction in table})
    lines = [
        "| method | " + " | ".join(percent(f) for f in fractions) + " |",
        "|---|" + "---:|" * len(fractions),
    ]
    for method in ordered_methods(m for m, _ in table):
        row = []
        for fraction in fractions:
            stats = table.get((method, fraction))
            if stats is None:
                row.append("–")
            elif stats["std"] is None:
                row.append(f"{100 * stats['mean']:.2f} (n={stats['n']})")
            else:
                row.append(f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} (n={stats['n']})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def rationale_table(table: dict[tuple[str, float], dict]) -> str | None:
    """The methods that have a rationale report (--eval_rationales) as rows, training fractions as columns:
    ROUGE-L F1 / consistency in percent, means over the seeds that have one; None where no run has one."""
    methods = ordered_methods(m for (m, _), stats in table.items() if stats["rationale_n"])
    if not methods:
        return None
    fractions = sorted({fraction for _, fraction in table})
    lines = [
        "| method | " + " | ".join(percent(f) for f in fractions) + " |",
        "|---|" + "---:|" * len(fractions),
    ]
    for method in methods:
        row = []
        for fraction in fractions:
            stats = table.get((method, fraction)) or {}
            if not stats.get("rationale_n"):
                row.append("–")
                continue
            consistency = "–" if stats["consistency"] is None else f"{100 * stats['consistency']:.2f}"
            row.append(f"{100 * stats['rouge_l']:.2f} / {consistency} (n={stats['rationale_n']})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_budget(table: dict[tuple[str, float], dict], axis: str, title: str, path: Path) -> bool:
    """Accuracy against the teacher budget of the training rows (BUDGET_AXES: tokens or cost), one line per
    method through its fractions, error bars one std over seeds; False (nothing drawn) where no cell has one."""
    key, xlabel = BUDGET_AXES[axis]
    points = {cell: stats for cell, stats in table.items() if stats.get(key)}
    if not points:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for method in ordered_methods(m for m, _ in points):
        line = sorted((s[key], s) for (m, _), s in points.items() if m == method)
        ax.errorbar([x for x, _ in line], [100 * s["mean"] for _, s in line],
                    yerr=[100 * (s["std"] or 0.0) for _, s in line], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    save_accuracy_plot(fig, ax, xlabel, f"{title}: accuracy vs teacher {axis}", path)
    return True


def file_stem(dataset: str, label: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", f"{dataset}_{label}" if label else dataset)


def teacher_lines(runs: list[dict]) -> dict[str, tuple[float, float | None]]:
    """Teacher -> (first-sample, voted) test accuracy, from the runs that recorded a teacher audit."""
    lines = {teacher: (first, voted) for teacher, first, voted in (r["teacher"] for r in runs if r["teacher"])}
    return dict(sorted(lines.items()))


def save_accuracy_plot(fig, ax, xlabel: str, title: str, path: Path) -> None:
    """Label, title and grid the test-accuracy axes the plots share, write them to path and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_fraction(
    table: dict[tuple[str, float], dict], title: str, path: Path,
    teachers: dict[str, tuple[float, float | None]] | None = None,
    bands: dict[tuple[str, float], tuple[float, float] | None] | None = None,
) -> None:
    """Accuracy against training-set fraction, one line per method, error bars one std over seeds; with teachers, a
    dotted reference line at each teacher's test accuracy (dashed for its voted accuracy); with bands, each method's
    confidence band (from its per-example predictions) shaded where every fraction has one."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for teacher, (first, voted) in (teachers or {}).items():
        ax.axhline(100 * first, color="gray", linestyle=":", label=f"teacher [{teacher}]")
        if voted is not None:
            ax.axhline(100 * voted, color="gray", linestyle="--", label=f"teacher [{teacher}], voted")
    fractions = sorted({fraction for _, fraction in table})
    for method in ordered_methods(m for m, _ in table):
        points = sorted((f, s) for (m, f), s in table.items() if m == method)
        xs = [f for f, _ in points]
        ys = [100 * s["mean"] for _, s in points]
        errors = [100 * (s["std"] or 0.0) for _, s in points]
        line = ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        band = [(bands or {}).get((method, f)) for f in xs]
        if band and all(band):
            ax.fill_between(xs, [100 * low for low, _ in band], [100 * high for _, high in band],
                            color=line[0].get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(fractions, [percent(f) for f in fractions])
    save_accuracy_plot(fig, ax, "share of the training set used (log scale)", f"{title}: accuracy vs training data",
                       path)


def alpha_lines(runs: list[dict]) -> dict[tuple[str, float], dict[float, dict]]:
    """(method, fraction) -> alpha -> seed statistics, for the task_prefix runs swept over two alphas or more."""
    by_line: dict[tuple[str, float], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run["alpha"] is not None:
            by_line[run["method"], run["fraction"]][run["alpha"]].append(run)
    return {
        line: {alpha: aggregate(by_alpha[alpha]) for alpha in sorted(by_alpha)}
        for line, by_alpha in sorted(by_line.items())
        if len(by_alpha) > 1
    }


def plot_alpha(lines: dict[tuple[str, float], dict[float, dict]], title: str, path: Path) -> None:
    """Accuracy against alpha, one line per method and fraction, error bars one std over seeds."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for (method, fraction), by_alpha in lines.items():
        stats = list(by_alpha.values())
        ax.errorbar(
            list(by_alpha), [100 * s["mean"] for s in stats], yerr=[100 * (s["std"] or 0.0) for s in stats],
            marker="o", capsize=3, label=f"{method}, {percent(fraction)} of train",
        )
    save_accuracy_plot(fig, ax, "alpha (weight of the label loss; 1 - alpha weighs rationales)",
                       f"{title}: accuracy vs alpha", path)


def csv_rows(dataset: str, label: str, select_on: str, protocol: str, table: dict, alpha: float) -> list[dict]:
    rows = []
    order = ordered_methods(method for method, _ in table)
    for (method, fraction), stats in sorted(table.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
        rows.append({
            "dataset": dataset, "setting": label, "method": method, "fraction": fraction,
            "alpha": alpha if method.startswith("dss") else "", "n": stats["n"], "mean": round(stats["mean"], 6),
            "std": "" if stats["std"] is None else round(stats["std"], 6),
            "seeds": " ".join(map(str, stats["seeds"])), "select_on": select_on, "protocol": protocol,
            **{key: "" if stats[key] is None else round(stats[key], 6) for key in RUN_FIGURES},
        })
    return rows


def protocol_heading(protocol: str) -> str:
    return f"### Test accuracy at the {PROTOCOLS[protocol]}"


def other_protocol(runs: list[dict], select_on: str, alpha: float) -> tuple[str, dict]:
    """--both_protocols: the section's table under the protocol its runs were not selected by, where they allow it
    (valid-selected runs also recorded their best test accuracy; test-selected runs never evaluated valid)."""
    if select_on == "test":
        return (f"{protocol_heading('valid')}\n\nNot available: these runs never evaluated valid (run them with "
                "--select_on valid, which records both)."), {}
    table = cells([run | {"accuracy": run["best_accuracy"]} for run in runs], alpha)
    return (f"{protocol_heading('test')}\n\n{markdown_table(table)}\n\nNo paired comparisons under this protocol: "
            "these runs keep the per-example predictions of the checkpoint chosen on valid."), table


def section(
    dataset: str, label: str, runs: list[dict], alpha: float, out: Path, show_teacher: bool = False,
    both_protocols: bool = False, budget_axis: str = "tokens",
) -> tuple[str, list[dict], list[dict]]:
    """One setting's Markdown section, its CSV rows and its comparisons' CSV rows; its plots are drawn into out (with
    show_teacher, the teacher's test accuracy as a reference line on the fraction plot and a sentence in the
    section; with both_protocols, a second table under the other protocol where the runs allow one; where runs
    recorded their teacher budget, accuracy against it, on budget_axis)."""
    select_on = dict(runs[0]["setting"]).get("select_on", "test")
    student = student_name(runs[0]["setting"])
    title = f"{dataset}, {student} ({label})" if label else f"{dataset}, {student}"
    by_cell = cell_runs(runs, alpha)
    table = cells(runs, alpha)
    alphas = ", ".join(f"{a:g}" for a in sorted({run["alpha"] for run in runs if run["alpha"] is not None}))
    compared, notes = comparisons.method_comparisons(by_cell, ordered_methods(m for m, _ in by_cell))
    markdown = (
        f"## {title}\n\nTest accuracy (%), mean ± std over seeds (n seeds); dss_* methods at alpha={alpha:g} "
        f"(alphas run: {alphas or 'none'}).\n\n{protocol_heading(select_on)}\n\n{markdown_table(table)}\n\n"
        + comparisons.report(compared, notes, "fraction")
    )
    rows = csv_rows(dataset, label, select_on, select_on, table, alpha)
    if both_protocols:
        other_markdown, other_table = other_protocol(runs, select_on, alpha)
        markdown += "\n\n" + other_markdown
        rows += csv_rows(dataset, label, select_on, "test", other_table, alpha)
    rationales = rationale_table(table)
    if rationales:
        markdown += ("\n\nStudent rationales on test (--eval_rationales): ROUGE-L F1 against the teacher's / "
                     "consistency with the student's own labels (%), means over the seeds that have them.\n\n"
                     + rationales)
    if plot_budget(table, budget_axis, title, out / f"{file_stem(dataset, label)}_budget_{budget_axis}.png"):
        markdown += (f"\n\nAccuracy against the teacher {budget_axis} of the training rows: "
                     f"{file_stem(dataset, label)}_budget_{budget_axis}.png.")
    teachers = teacher_lines(runs) if show_teacher else {}
    if show_teacher and not teachers:
        print(f"note: {title}: no --label_type llm run recorded a teacher audit, so no teacher line", file=sys.stderr)
    for teacher, (first, voted) in teachers.items():
        markdown += f"\n\nTeacher [{teacher}] test accuracy: {100 * first:.2f}" + (
            f" (first sample), {100 * voted:.2f} (voted)" if voted is not None else "")
    stem = file_stem(dataset, label)
    if table:
        bands = {cell: comparisons.accuracy_band(members) for cell, members in by_cell.items()}
        plot_fraction(table, f"{title}\ncheckpoint chosen on {select_on}", out / f"{stem}_fraction.png", teachers,
                      bands)
    else:
        print(f"note: {title}: no runs at alpha={alpha:g}, so no fraction plot", file=sys.stderr)
    lines = alpha_lines(runs)
    if lines:
        plot_alpha(lines, title, out / f"{stem}_alpha.png")
    else:
        print(f"note: {title}: no method and fraction was run at two alphas or more, so no alpha plot", file=sys.stderr)
    return markdown, rows, comparisons.csv_rows(title, compared)


def group_section(folder_a: Path, folder_b: Path) -> tuple[str, list[dict]]:
    """--compare: the Markdown section comparing the runs under one folder with those under another (each
    finished run paired by dataset, method, fraction, alpha and seed), and its comparisons' CSV rows."""
    name_a, name_b = str(folder_a), str(folder_b)
    runs_a, runs_b = load_runs(folder_a), load_runs(folder_b)
    protocols = "; ".join(
        f"{name}: " + " and ".join(sorted({dict(run["setting"]).get("select_on", "test") for run in runs}) or ["none"])
        for name, runs in ((name_a, runs_a), (name_b, runs_b)))
    compared, notes = comparisons.group_comparisons(name_a, runs_a, name_b, runs_b)
    title = f"Comparison: {name_a} − {name_b}"
    markdown = (f"## {title}\n\nTest accuracy at each run's own selected checkpoint, chosen on {protocols}.\n\n"
                + comparisons.report(compared, notes, "dataset, method, fraction"))
    return markdown, comparisons.csv_rows(title, compared)


def summarize(runs: list[dict], out: Path, alpha: float, show_teacher: bool = False, both_protocols: bool = False,
              compare: tuple[Path, Path] | None = None, budget_axis: str = "tokens") -> str:
    """Write summary.md, summary.csv, comparisons.csv and the plots into out; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    sections, rows, compared = [], [], []
    for dataset in sorted({name for name, _ in groups}):
        for setting, label in differing_settings(groups, dataset).items():
            markdown, csv_part, compared_part = section(dataset, label, groups[dataset, setting], alpha, out,
                                                        show_teacher, both_protocols, budget_axis)
            sections.append(markdown)
            rows += csv_part
            compared += compared_part
    if compare:
        markdown, compared_part = group_section(*compare)
        sections.append(markdown)
        compared += compared_part
    markdown = "# Summary\n\n" + "\n\n".join(sections) + "\n"
    (out / "summary.md").write_text(markdown)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    comparisons.write_csv(out / "comparisons.csv", compared)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="searched recursively for results.json")
    parser.add_argument("--out", type=Path, help="where summary.md, summary.csv and the PNGs go (default: folder)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="alpha of the dss_* runs shown in the method x fraction table (others: alpha plot)")
    parser.add_argument("--teacher_line", action="store_true",
                        help="draw the teacher's test accuracy (recorded by --label_type llm runs) on fraction plots")
    parser.add_argument("--both_protocols", action="store_true",
                        help="beside each table, the same runs under the other protocol where they allow it "
                             "(--select_on valid runs also recorded the best test accuracy, the paper's figure)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FOLDER_A", "FOLDER_B"),
                        help="also compare the runs under FOLDER_A with those under FOLDER_B, paired by dataset, "
                             "method, fraction, alpha and seed (e.g. two students, or two learning rates)")
    parser.add_argument("--budget_axis", choices=sorted(BUDGET_AXES), default="tokens",
                        help="the x axis of the accuracy vs teacher budget plot, for runs on an annotate.py teacher "
                        "that recorded its cost: tokens, or cost (annotated with --price_prompt/--price_completion)")
    args = parser.parse_args(argv)
    for folder in [args.folder, *(args.compare or [])]:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    if args.compare and args.compare[0].resolve() == args.compare[1].resolve():
        parser.error("--compare needs two different folders")
    out = args.out or args.folder
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder; it is left as it is: pass a folder (new or existing) for "
                     "summary.md, summary.csv and the plots")
    runs = load_runs(args.folder)
    if not runs:
        print(f"error: no finished runs (results.json with a test evaluation) under {args.folder}", file=sys.stderr)
        return 1
    try:
        markdown = summarize(runs, out, args.alpha, args.teacher_line, args.both_protocols, args.compare,
                             args.budget_axis)
    except OSError as e:
        print(f"error: cannot write into --out {out} ({e.strerror or e}: {e.filename or out}); pass a folder you can "
              "write to", file=sys.stderr)
        return 1
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
