"""The estimator comparison's table in docs/RESULTS.md, printed from its results rather than typed by hand.

    python -m benchmarks.estimator_table docs/results/estimators_countdown_all
    python -m benchmarks.estimator_table docs/results/estimators_sudoku

From an rl_compare --out (a design's results or a --join of several) and the per-sample gradient variance of
bench_estimator_variance (benchmarks/results/estimator_variance_methods.md): per method, the optimizer steps it
takes per batch (its config's inner_epochs), the tuned lr, held-out accuracy at each sampling-step count (mean ±
half-width of the 95% Student-t interval over the evaluation seeds), AGRPO minus it at the full step count with
its Welch 95% interval, the variance file's noise-to-signal ratio and cosine with AGRPO's mean gradient on the
same preset (its last row of that preset and method: rows appended later supersede earlier ones), and the mean
learner seconds per step. An accuracy or difference is bold where the Welch 95% interval of AGRPO minus the method
at that step count excludes 0 (the designs' reading rule). A ratio is marked "(unresolved)" where the variance
run's noise-corrected |mean|^2 is not above 0: the batch did not resolve that method's mean direction, so the
ratio is a lower bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.compare_plots import STYLE, by_method, separation
from benchmarks.rl_compare import METHODS, accuracy_cell, evaluation_runs, load_design
from common.config import load_config

REFERENCE = "agrpo"
VARIANCE = Path("benchmarks/results/estimator_variance_methods.md")
RATIO, RESOLVED = "tr Cov / \\|mean\\|^2", "\\|mean\\|^2 - tr Cov / n"  # the variance file's column names


def variance_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(preset, method) -> the cells of its last row in the variance file's tables, by column name."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-"):
            row = dict(zip(header, cells))
            if "preset" in row and "method" in row:
                rows[row["preset"], row["method"]] = row
    return rows


def _ratio(row: dict[str, str] | None) -> str:
    if row is None:
        return ""
    return f"{float(row[RATIO]):.0f}" + (" (unresolved)" if float(row[RESOLVED]) <= 0 else "")


def _lr(lr: float) -> str:
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def method_overrides(results: dict) -> dict[str, list[str]]:
    """Each method's config overrides: rl_compare's estimators and the variants of the design(s) behind the results
    (a design may name a variant of its own, e.g. BGPO under random-order rollouts)."""
    designs = [results.get("design")] + [part.get("design") for part in results.get("joined", [])]
    variants = {}
    for design in filter(None, designs):
        variants.update(load_design(Path(design))["variants"])
    return {**METHODS, **variants}


def table(results: dict, variance: dict[tuple[str, str], dict[str, str]]) -> str:
    """The markdown table of one comparison (results.json) with its preset's variance rows."""
    config = results.get("config") or results["joined"][0]["config"]
    results = evaluation_runs(results)
    steps = [str(s) for s in results["sampling_steps"]]
    runs, overrides = by_method(results), method_overrides(results)
    if REFERENCE not in runs:
        raise ValueError(f"no {REFERENCE} runs: the table compares every method with {REFERENCE}")
    unknown = [m for m in runs if m not in overrides]
    if unknown:
        raise ValueError(f"{unknown[0]} is neither one of rl_compare's estimators nor a variant of the results' design")
    accuracy = {m: {s: [r["at_steps"][s] for r in rs] for s in steps} for m, rs in runs.items()}
    lines = ["| method | optimizer steps / batch | lr (tuned) | " + " | ".join(f"{s} steps" for s in steps)
             + f" | AGRPO minus it at {steps[-1]} [Welch 95%] | tr Cov / \\|mean\\|^2 | cos vs AGRPO's mean gradient "
             "| learner s / step |", "|---" * (len(steps) + 7) + "|",
             "| base (SFT) | | | " + " | ".join(f"{100 * results['base'][s]:.1f}" for s in steps) + " | | | | |"]
    for method, rs in runs.items():
        separate = {s: None if method == REFERENCE else separation(accuracy[REFERENCE][s], accuracy[method][s])
                    for s in steps}
        apart = {s: sep is not None and (sep["diff_low"] > 0 or sep["diff_high"] < 0) for s, sep in separate.items()}
        bold = lambda text, yes: f"**{text}**" if yes else text
        cells = [bold(accuracy_cell(accuracy[method][s]), apart[s]) for s in steps]
        last = separate[steps[-1]]
        diff = "" if last is None else bold(f"{100 * last['diff']:+.1f} [{100 * last['diff_low']:+.1f}, "
                                            f"{100 * last['diff_high']:+.1f}]", apart[steps[-1]])
        algorithm = load_config(config, overrides[method]).algorithm  # a variant is read as its estimator
        row = variance.get((config, method)) or variance.get((config, algorithm.name))
        cosine = "" if row is None else row["cos vs agrpo"]
        name = STYLE.get(method, STYLE.get(algorithm.name, (None, method)))[1]
        seconds = [r["learner_s_per_step"] for r in rs if r.get("learner_s_per_step") is not None]
        lines.append(f"| {name} | {algorithm.inner_epochs} | {_lr(rs[0]['lr'])} | " + " | ".join(cells)
                     + f" | {diff} | {_ratio(row)} | {cosine} | "
                     + (f"{statistics.mean(seconds):.1f}" if seconds else "") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="an rl_compare --out directory (one design's, or a --join's)")
    p.add_argument("--variance", type=Path, default=VARIANCE, help="bench_estimator_variance's markdown")
    args = p.parse_args(argv)
    try:
        text = table(json.loads((args.out / "results.json").read_text()), variance_rows(args.variance.read_text()))
    except (OSError, ValueError) as err:
        print(f"estimator_table: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
