"""One method's held-out accuracy over RL steps under several settings, from rl_compare result dirs.

    python -m benchmarks.plot_ablation --method agrpo --out docs/results/sudoku_ablation/agrpo_settings.png \\
        "lr 1e-4=docs/results/sudoku" docs/results/sudoku_ablation/{warmup10,all_or_nothing,lr3e-4,lr3e-5}

Each argument is a result directory (holding results.json), optionally labelled ``LABEL=DIR``; unlabelled
ones are labelled by their overrides. Mean over seeds, thin lines per seed, base as a dashed line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", metavar="[LABEL=]DIR")
    p.add_argument("--method", default="agrpo")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    from benchmarks.compare_plots import plot_curves

    series, results = {}, {}
    for spec in args.dirs:
        label, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        results = json.loads((Path(path) / "results.json").read_text())
        runs = [r for r in results["runs"] if r["method"] == args.method]
        if not runs:
            raise SystemExit(f"{path}: no {args.method} runs in results.json")
        label = label or " ".join(results.get("overrides") or ["preset"])
        series[f"{label} ({len(runs)} seeds)"] = runs
    plot_curves(series, results["base"][str(results["sampling_steps"][-1])],
                f"held-out accuracy ({results.get('task')}, greedy)", Path(args.out),
                title=f"{args.method}: held-out accuracy under each setting")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
