"""The default's choice of docs/results/async_design.md, applied as registered to the comparisons' results.

    python -m benchmarks.async_default docs/results/async_countdown docs/results/async_sudoku \
        --out docs/results/async_default.md

The rule was fixed before any run (async_design.md, "Decision rule for the default"); this is that rule as code,
so the choice is computed, not read off a table. Per task, a variant v qualifies when

- it is as accurate within the intervals: the Welch 95% interval of sync - v in final held-out accuracy at the
  full generation length in sampling steps reaches 0 or below, and its mean is at most +1.0 point;
- it is faster: the Welch 95% interval of sync - v in training wall seconds lies entirely above 0.

The default is the variant qualifying on every task with the lowest sum of mean wall times; a qualifying variant
of smaller ``queue.max_staleness`` within 5% of that wall time is chosen instead. Of a staleness whose plain and
``_decoupled`` variants both qualify, the decoupled one is chosen only if its mean accuracy is higher on every
task. If no variant qualifies on every task, the default stays synchronous.

The report also gives the design's metric 4 (reported, not part of the rule): each variant's policy lag, share of
groups trained at lag >= 2, and the importance weights' spread and truncated share, from the runs' metrics.jsonl.
The run directories are not committed, so that summary is kept beside results.json (``staleness.json``) and read
from there where they are gone.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

from benchmarks.compare_plots import by_method, separation
from benchmarks.rl_compare import evaluation_runs, load_design
from common.config import load_config

REFERENCE = "sync"
STALENESS = "staleness.json"  # metric 4, per variant, kept beside results.json
MAX_MEAN_LOSS = 0.01  # sync - v in accuracy (a fraction): at most +1.0 point
WALL_SLACK = 0.05  # a smaller staleness within 5% of the fastest qualifying variant's wall time is chosen


def staleness(results: dict) -> dict[str, int]:
    """Each variant's queue.max_staleness, from the design the results were made with (checked by its hash)."""
    design = load_design(Path(results["design"]))
    if design["sha256"] != results["design_sha256"]:
        raise ValueError(f"{results['design']} changed since these results were made (sha256 {design['sha256']}, "
                         f"results {results['design_sha256']}); use the design file they were made with")
    return {name: load_config(design["config"], overrides + design["overrides"]).queue.max_staleness
            for name, overrides in design["variants"].items()}


def qualification(results: dict) -> dict[str, dict]:
    """Each variant of one task against sync: the two Welch comparisons and whether it qualifies."""
    runs = by_method(evaluation_runs(results))
    full = str(results["sampling_steps"][-1])
    acc = {m: [r["at_steps"][full] for r in rs] for m, rs in runs.items()}
    wall = {m: [r["train_wall_s"] for r in rs] for m, rs in runs.items()}
    if REFERENCE not in runs:
        raise ValueError(f"{results.get('design', 'results')}: no {REFERENCE} runs to compare with")
    table = {}
    for m in runs:
        if m == REFERENCE:
            continue
        a, w = separation(acc[REFERENCE], acc[m]), separation(wall[REFERENCE], wall[m])
        accurate = a["diff_low"] <= 0 and a["diff"] <= MAX_MEAN_LOSS
        faster = w["diff_low"] > 0
        table[m] = {"accuracy": a, "wall": w, "accurate": accurate, "faster": faster, "qualifies": accurate and faster,
                    "mean_accuracy": statistics.mean(acc[m]), "mean_wall": statistics.mean(wall[m])}
    return table


def choose(tasks: dict[str, dict], tables: dict[str, dict] | None = None) -> tuple[str, str]:
    """The default variant and why, from each task's results (task name -> results.json) and, where the caller
    has them, each task's ``qualification`` table."""
    tables = tables or {t: qualification(r) for t, r in tasks.items()}
    lag = staleness(next(iter(tasks.values())))
    variants = set.intersection(*(set(t) for t in tables.values()))
    qualifying = sorted(v for v in variants if all(t[v]["qualifies"] for t in tables.values()))
    if not qualifying:
        return REFERENCE, "no variant qualifies on every task, so the default stays synchronous"
    wall = {v: sum(t[v]["mean_wall"] for t in tables.values()) for v in qualifying}
    fastest = min(qualifying, key=lambda v: (wall[v], lag[v]))
    closer = [v for v in qualifying if lag[v] < lag[fastest] and wall[v] <= (1 + WALL_SLACK) * wall[fastest]]
    pick = min(closer, key=lambda v: (lag[v], wall[v])) if closer else fastest
    why = (f"{pick} qualifies on every task" + (f" and is within {WALL_SLACK:.0%} of the fastest qualifying "
           f"variant's wall time ({fastest}) at a smaller max_staleness" if closer else
           " with the lowest summed wall time") + f" ({wall[pick]:.0f} s over the tasks)")
    twins = [v for v in qualifying if lag[v] == lag[pick]]
    plain = [v for v in twins if not v.endswith("_decoupled")]
    decoupled = [v for v in twins if v.endswith("_decoupled")]
    if plain and decoupled:
        higher = all(t[decoupled[0]]["mean_accuracy"] > t[plain[0]]["mean_accuracy"] for t in tables.values())
        pick = decoupled[0] if higher else plain[0]
        why += (f"; both {plain[0]} and {decoupled[0]} qualify and the decoupled one is "
                f"{'' if higher else 'not '}more accurate on every task, so correction "
                f"{'decoupled' if higher else 'none'}")
    return pick, why


def run_staleness(metrics: Path) -> dict[str, float]:
    """One run's staleness, from its metrics.jsonl: the mean over learner steps of the policy lag, the share of
    trained groups at lag >= 2, and the mean over stale steps of the importance weights' std and truncated share."""
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "policy_lag_mean" in r]
    if not steps:
        raise ValueError(f"{metrics} has no learner step with a policy lag; was it written by this version?")
    groups = collections.Counter()
    for r in steps:
        groups.update({k: n for k, n in r.items() if k.startswith("groups_lag_")})
    stale = [r for r in steps if "is_weight_std" in r]
    mean = lambda key, rows: statistics.mean(r[key] for r in rows) if rows else 0.0  # noqa: E731
    return {"lag_mean": mean("policy_lag_mean", steps),
            "lag2_share": sum(n for k, n in groups.items() if int(k.rsplit("_", 1)[1]) >= 2) / sum(groups.values()),
            "weight_std": mean("is_weight_std", stale), "truncated_share": mean("is_truncated_share", stale)}


def staleness_summary(out: Path, results: dict) -> dict[str, dict] | None:
    """Each variant's staleness (``run_staleness`` averaged over its evaluation seeds). Computed from the run
    directories under ``out/runs`` and written to ``out/staleness.json`` where they are all here; otherwise read
    from that file; None where neither is here."""
    runs = by_method(evaluation_runs(results))
    metrics = lambda run: out / "runs" / Path(run["run_dir"]).name / "metrics.jsonl"  # noqa: E731
    if runs and all(r.get("run_dir") and metrics(r).is_file() for rs in runs.values() for r in rs):
        per_run = {v: [run_staleness(metrics(r)) for r in rs] for v, rs in runs.items()}
        summary = {v: {k: statistics.mean(x[k] for x in rs) for k in rs[0]} | {"runs": len(rs)}
                   for v, rs in per_run.items()}
        (out / STALENESS).write_text(json.dumps(summary, indent=1) + "\n")
        return summary
    kept = out / STALENESS
    return json.loads(kept.read_text()) if kept.exists() else None


def report(tasks: dict[str, dict], dirs: dict[str, Path] | None = None) -> str:
    lines, tables = [], {t: qualification(r) for t, r in tasks.items()}
    for task, results in tasks.items():
        lines += [f"### {task}: sync minus each variant, final held-out accuracy at {results['sampling_steps'][-1]} "
                  "sampling steps (points) and training wall time (s), Welch 95% intervals", "",
                  "| variant | accuracy | as accurate | wall s | faster | qualifies |", "|---|---|---|---|---|---|"]
        for v, q in sorted(tables[task].items()):
            a, w = q["accuracy"], q["wall"]
            lines.append(f"| {v} | {100 * a['diff']:+.1f} [{100 * a['diff_low']:+.1f}, {100 * a['diff_high']:+.1f}] | "
                         f"{'yes' if q['accurate'] else 'no'} | {w['diff']:+.0f} [{w['diff_low']:+.0f}, "
                         f"{w['diff_high']:+.0f}] | {'yes' if q['faster'] else 'no'} | "
                         f"{'**yes**' if q['qualifies'] else 'no'} |")
        lines.append("")
        summary = staleness_summary(dirs[task], results) if dirs else None
        if summary is None:
            lines += [f"{task}: no staleness summary (neither the run directories nor {STALENESS} are here).", ""]
            continue
        lines += [f"{task}: staleness of the groups trained, mean over each variant's seeds of the per-step means "
                  "(importance weights pi_prox/pi_behav of the stale draws; truncated: above the cap)", "",
                  "| variant | policy lag | groups at lag >= 2 | weight std | truncated |", "|---|---|---|---|---|"]
        order = sorted(summary, key=lambda v: (v != REFERENCE, v))
        lines += [f"| {v} | {s['lag_mean']:.3f} | {100 * s['lag2_share']:.1f}% | {s['weight_std']:.3f} | "
                  f"{100 * s['truncated_share']:.2f}% |" for v, s in ((v, summary[v]) for v in order)]
        lines.append("")
    pick, why = choose(tasks, tables)
    return "\n".join(lines + [f"**Default: {pick}**: {why}."]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="rl_compare --out directories of the async designs")
    p.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = p.parse_args(argv)
    try:
        tasks, dirs = {}, {}
        for d in args.dirs:
            results = json.loads((d / "results.json").read_text())
            if not results.get("design"):
                raise ValueError(f"{d / 'results.json'} was not made from a design; give the async designs' --out")
            tasks[results["task"]] = results
            dirs[results["task"]] = d
        text = report(tasks, dirs)
    except (OSError, ValueError) as err:
        print(f"async_default: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
