"""Plots of an rl_compare result (results.json) that read without the text: every figure names the task, the
budget and the number of seeds, and draws the 95% interval it is judged by.

    python -m benchmarks.compare_plots docs/results/countdown     # rewrites that directory's plots
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# One colour and name per method in every figure (tab20's colours: distinct for every estimator of one table).
STYLE = {
    "base": ("gray", "base (SFT)"),
    "agrpo": ("#1f77b4", "AGRPO"),
    "atpo": ("#ff7f0e", "ATPO (top-k)"),
    "atpo_unbiased": ("#2ca02c", "ATPO-unbiased"),
    "diffu_grpo": ("#d62728", "diffu-GRPO"),
    "agrpo_committed": ("#9467bd", "AGRPO committed-only"),
    "wd1": ("#8c564b", "wd1"),
    "coupled_grpo": ("#e377c2", "coupled-GRPO"),
    "spg": ("#7f7f7f", "SPG"),
    "espo": ("#bcbd22", "ESPO"),
    "bgpo": ("#17becf", "BGPO"),
    "tracerl": ("#aec7e8", "TraceRL"),
    "tracerl_llada": ("#ffbb78", "TraceRL (llada)"),
    "justgrpo": ("#98df8a", "JustGRPO"),
}
OTHER_COLOURS = ("#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939")
CROWDED = 5  # a figure of more methods draws no per-seed lines and a two-column legend (else unreadable)
def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its two-sided 95% Student-t confidence interval (0 for one value)."""
    from scipy import stats

    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def separation(a: list[float], b: list[float]) -> dict:
    """How far apart two methods' seeds are: the difference of means with its Welch 95% interval and p-value,
    whether their own 95% intervals overlap, and how many seeds per method would make them stop overlapping
    if the difference and the spreads stayed as measured (None: not within 1,000)."""
    from scipy import stats

    (ma, ha), (mb, hb) = mean_ci95(a), mean_ci95(b)
    welch = stats.ttest_ind(a, b, equal_var=False)
    diff_ci = welch.confidence_interval(0.95)
    spread = statistics.stdev(a) + statistics.stdev(b)
    need = next((n for n in range(2, 1001) if stats.t.ppf(0.975, n - 1) * spread / n ** 0.5 < abs(ma - mb)), None)
    return {"diff": ma - mb, "diff_low": diff_ci.low, "diff_high": diff_ci.high, "p": welch.pvalue,
            "overlap": ma - ha <= mb + hb and mb - hb <= ma + ha, "seeds_needed": need}


def _styles(methods) -> dict[str, tuple[str, str]]:
    """Colour and display name of each of a figure's methods; those STYLE does not know (a design's variants)
    take OTHER_COLOURS in turn, so no two share one."""
    others = iter(OTHER_COLOURS * len(methods))
    return {m: STYLE[m] if m in STYLE else (next(others), m) for m in methods}


def by_method(results: dict) -> dict[str, list[dict]]:
    """Each method's runs in seed order, the methods in STYLE's order (then any other)."""
    order = list(STYLE) + [r["method"] for r in results["runs"]]
    methods = sorted({r["method"] for r in results["runs"]}, key=order.index)
    return {m: sorted((r for r in results["runs"] if r["method"] == m), key=lambda r: r["seed"]) for m in methods}


def _setting(results: dict) -> str:
    task = {"countdown": "Countdown-3", "sudoku": "Sudoku 4x4"}.get(results.get("task"), results.get("task", ""))
    items = f", {results['eval_items']} held-out items" if results.get("eval_items") else ""
    return f"{task}: {results['budget_trajectories']:,} trajectories per run{items}"


def plot_curves(series: dict[str, list[dict]], base: float, ylabel: str, path: Path, title: str,
                colors: dict[str, str] | None = None) -> None:
    """Held-out accuracy over learner steps: per label the mean over its runs with its 95% band, thin lines per run."""
    from driver.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, runs in series.items():
        steps = sorted({s for r in runs for s, _ in r["curve"]})
        stats = [mean_ci95([dict(r["curve"])[s] for r in runs if s in dict(r["curve"])]) for s in steps]
        color = (colors or {}).get(label)
        line, = ax.plot(steps, [m for m, _ in stats], "o-", color=color, label=f"{label} (n={len(runs)})")
        ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], color=line.get_color(), alpha=0.12)
        for r in runs if len(series) <= CROWDED else ():
            ax.plot(*zip(*r["curve"]), color=line.get_color(), alpha=0.3, lw=0.8)
    ax.axhline(base, color="gray", ls="--", label="base (SFT)")
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, None)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=1 if len(series) <= CROWDED else 2)
    _save(plt, fig, path)


def plot_rl_curves(results: dict, path: Path) -> None:
    methods = by_method(results)
    styles = _styles(methods)
    series = {styles[m][1]: runs for m, runs in methods.items()}
    colors = {name: colour for colour, name in styles.values()}
    full = results["sampling_steps"][-1]
    seeds = ", thin lines = single seeds" if len(methods) <= CROWDED else ""
    plot_curves(series, results["base"][str(full)], f"held-out accuracy (greedy, {full} sampling steps)", path,
                f"{_setting(results)}\nmean over seeds, shaded 95% interval{seeds}", colors)


def plot_sampling_steps(results: dict, path: Path) -> None:
    """Accuracy at 1/4, 1/2 and 1x the sampling steps, mean and 95% interval per method."""
    from driver.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = results["sampling_steps"]
    ax.plot(steps, [results["base"][str(s)] for s in steps], "s--", color="gray", label="base (SFT)")
    methods = by_method(results)
    styles = _styles(methods)
    for i, (m, runs) in enumerate(methods.items()):
        stats = [mean_ci95([r["at_steps"][str(s)] for r in runs]) for s in steps]
        shift = [s * 2 ** (0.04 * (i - (len(methods) - 1) / 2)) for s in steps]  # keep the bars apart
        color, name = styles[m]
        ax.errorbar(shift, [a for a, _ in stats], yerr=[h for _, h in stats], fmt="o-", capsize=3, color=color,
                    label=f"{name} (n={len(runs)})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps at evaluation (trained at the largest)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, None)
    ax.set_title(f"{_setting(results)}\nafter RL: mean and 95% interval over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=1 if len(methods) <= CROWDED else 2)
    _save(plt, fig, path)


def plot_final(results: dict, path: Path) -> None:
    """One column per method at the full step count: each seed, the mean and its 95% interval, the base line."""
    from driver.plots import _plt

    plt = _plt()
    full = str(results["sampling_steps"][-1])
    methods = by_method(results)
    styles = _styles(methods)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.85 * len(methods) + 1.5), 4.5))
    for x, (m, runs) in enumerate(methods.items()):
        values = [r["at_steps"][full] for r in runs]
        mean, half = mean_ci95(values)
        color, _ = styles[m]
        ax.scatter([x + 0.15] * len(values), values, color=color, alpha=0.5, s=14)
        ax.errorbar([x], [mean], yerr=[half], fmt="o", capsize=6, color=color, ms=8)
        ax.annotate(f"{100 * mean:.1f}\n±{100 * half:.1f}", (x - 0.12, mean), ha="right", va="center", fontsize=8)
    ax.axhline(results["base"][full], color="gray", ls="--", label=f"base (SFT) {100 * results['base'][full]:.1f}")
    ax.set_xticks(range(len(methods)), [f"{styles[m][1].replace(' (', chr(10) + '(')}\nn={len(r)}"
                                        for m, r in methods.items()], fontsize=8)
    ax.set_xlim(-0.7, len(methods) - 0.4)
    ax.set_ylabel(f"held-out accuracy (greedy, {full} sampling steps)")
    ax.set_ylim(0, None)
    ax.set_title(f"{_setting(results)}\nend of RL: seeds (dots), mean and 95% interval (bars)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    _save(plt, fig, path)


def plot_all(results: dict, out: Path) -> list[Path]:
    paths = [out / "accuracy_vs_rl_step.png", out / "accuracy_vs_sampling_steps.png", out / "final_accuracy.png"]
    for plot, path in zip((plot_rl_curves, plot_sampling_steps, plot_final), paths):
        plot(results, path)
    return paths


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="rl_compare --out directories (each holds results.json)")
    for d in p.parse_args(argv).dirs:
        for path in plot_all(json.loads((Path(d) / "results.json").read_text()), Path(d)):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
