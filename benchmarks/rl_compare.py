"""The CPU-sized experiment of docs/RESULTS.md: base vs diffu-GRPO vs AGRPO vs ATPO on one task.

    python -m benchmarks.rl_compare --steps 30 --seeds 0 1 2 --out docs/results
    python -m benchmarks.rl_compare --config tiny_sudoku --steps 30 --seeds 0 1 2 --out docs/results/sudoku
    python -m benchmarks.rl_compare --config tiny_sudoku --methods agrpo --set learner.lr=3e-5 --out ...  # ablation

Every method gets the same rollout budget (steps x groups_per_step x group_size trajectories) from the
same base checkpoint and config (default configs/tiny_countdown.yaml), and is evaluated greedily on the
task's 256 held-out items at 1/4, 1/2 and 1 x the generation length in sampling steps. Writes results.json, a
markdown table (results.md: mean ± half-width of the 95% Student-t interval over seeds, and each seed) and
plots into --out.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.compare_plots import by_method, mean_ci95, plot_all, separation

# Each method is a list of config overrides. diffu_grpo is a whole section (it has no k_steps); the
# others keep the preset's algorithm fields (k_steps, draws: auto = the exact estimator of the remasking).
METHODS = {
    "agrpo": ["algorithm.name=agrpo"],
    "atpo": ["algorithm.name=atpo", "algorithm.selection=topk"],  # the paper's reallocation (biased)
    "atpo_unbiased": ["algorithm.name=atpo", "algorithm.selection=sample"],  # AGRPO in expectation
    "diffu_grpo": ["algorithm={name: diffu_grpo}"],
    # control: under low-confidence remasking scores only the committed draws (biased, low variance)
    "agrpo_committed": ["algorithm.name=agrpo", "algorithm.draws=committed"],
    # TraceRL: every step of the trajectory, committed tokens (rl_sdar.py's defaults: exact where committed-only is)
    "tracerl": ["algorithm={name: tracerl}"],
    "tracerl_llada": ["algorithm={name: tracerl, variant: llada, shrink: 8}"],  # rl_llada.yaml: a surrogate
    # JustGRPO decodes left to right, one token a step: the preset's sampler.steps must equal its gen_length
    "justgrpo": ["algorithm={name: justgrpo}", "sampler.remasking=sequential"],
}
DEFAULT_METHODS = ["agrpo", "atpo", "atpo_unbiased", "diffu_grpo"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="learner steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every n learner steps")
    p.add_argument("--config", default="tiny_countdown")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every RL run (repeatable), e.g. learner.lr=3e-5")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and plots")
    p.add_argument("--report-only", action="store_true",
                   help="re-evaluate the base model and rewrite the report and plots from results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import ray

    from common.config import load_config
    from common.metrics import read_metrics
    from driver.evaluate import evaluate_checkpoint
    from driver.plots import load_step_profiles, plot_confusion_zones
    from driver.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config, args.overrides)  # the base decodes as the RL runs do (e.g. remasking)
    sampling_steps = [base_cfg.sampler.gen_length // 4, base_cfg.sampler.gen_length // 2, base_cfg.sampler.gen_length]
    results: dict = {"config": args.config, "overrides": args.overrides, "task": base_cfg.task.name, "steps": args.steps, "seeds": args.seeds, "sampling_steps": sampling_steps,
                     "budget_trajectories": args.steps * base_cfg.learner.groups_per_step * base_cfg.rollout.group_size,
                     "eval_items": base_cfg.task.eval_size,
                     "base": {}, "runs": []}
    # Runs of earlier (or concurrent) invocations of the same setup are kept: record_run merges them from the file.
    problem = setup_mismatch(out, results)
    if args.report_only and not (out / "results.json").is_file():
        problem = f"--report-only but {out / 'results.json'} does not exist"
    if problem:
        print(f"rl_compare: {problem}", file=sys.stderr)
        return 2
    base = evaluate_checkpoint(base_cfg, sampling_steps)
    results["base"] = {str(s): base[s]["accuracy"] for s in sampling_steps}
    if args.report_only:
        results["runs"] = json.loads((out / "results.json").read_text())["runs"]
        args.methods = []
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        for method in args.methods:
            for seed in args.seeds:
                t0 = time.time()
                cfg = load_config(args.config, METHODS[method] + args.overrides + [
                    f"run.root={out / 'runs'}", f"run.name={method}-s{seed}", f"run.seed={seed}",
                    f"task.seed={seed}", f"run.total_steps={args.steps}", f"run.eval_every={args.eval_every}",
                    f"run.eval_sampling_steps={sampling_steps}"])
                if train(cfg) != 0:  # not an assert: python -O would remove the training with it
                    print(f"rl_compare: the {method} run of seed {seed} failed (its log is above); stopping",
                          file=sys.stderr)
                    return 1
                run_dir = sorted((out / "runs").glob(f"{method}-s{seed}-*"))[-1]
                records = read_metrics(run_dir / "metrics.jsonl")
                results = record_run(out, results, {
                    "method": method, "seed": seed, "run_dir": str(run_dir), "minutes": (time.time() - t0) / 60,
                    "curve": [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r],
                    "at_steps": {str(r["eval_sampling_steps"]): r["eval_accuracy_at_steps"] for r in records
                                 if "eval_sampling_steps" in r},
                })
    finally:
        ray.shutdown()
    results = record_run(out, results, None)
    write_report(results, out)
    first = next((r["run_dir"] for r in results["runs"] if r["method"] == "agrpo"), None)
    if first:  # confusion zones of the first and last policy versions of one AGRPO run
        profiles = load_step_profiles(Path(first) / "trajectories", limit=100_000)
        versions = profiles["policy_version"]
        for name, pick in (("before", versions == versions.min()), ("after", versions == versions.max())):
            sub = {k: v[pick] for k, v in profiles.items()}
            plot_confusion_zones(sub, out / f"confusion_zones_{name}.png",
                                 title=f"zones of confusion, policy version {int(versions[pick][0])}")
    plot_all(results, out)
    return 0


def _setup(results: dict) -> tuple:
    """What makes runs comparable (one budget, config and overrides): only such runs share a results.json."""
    return results.get("steps"), results.get("config"), results.get("overrides", [])


def setup_mismatch(out: Path, results: dict) -> str | None:
    """Why ``results``' setup may not write into out/results.json (one line), or None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    on_disk = _setup(json.loads(path.read_text()))
    if on_disk == _setup(results):
        return None
    steps, config, overrides = on_disk
    return (f"{path} holds runs of another setup (--steps {steps} --config {config} --set {overrides or 'none'}); "
            f"this one is --steps {results['steps']} --config {results['config']} --set {results['overrides'] or 'none'}: "
            "pass the same setup, or another --out")


def record_run(out: Path, results: dict, run: dict | None) -> dict:
    """Adds ``run`` to out/results.json (replacing an earlier run of its method and seed) and returns the
    file's results. The file holds the runs: invocations of the same setup may run at once into one --out
    (e.g. one per method on a 2-core box), and under a lock each re-reads it, so no run another wrote or
    redid is lost or overwritten with a stale copy. A file of another setup is refused (ValueError)."""
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "results.json"
        mismatch = setup_mismatch(out, results)
        if mismatch:
            raise ValueError(mismatch)
        if path.is_file():
            on_disk = json.loads(path.read_text())
            results["runs"] = on_disk["runs"]
            results["seeds"] = sorted(set(on_disk.get("seeds", [])) | set(results["seeds"]))
        if run is not None:
            results["runs"] = [r for r in results["runs"] if (r["method"], r["seed"]) != (run["method"], run["seed"])]
            results["runs"].append(run)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        return results


def _mean_ci(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def write_report(results: dict, out: Path) -> None:
    steps = results["sampling_steps"]
    lines = ["| model | " + " | ".join(f"{s} steps" for s in steps) + f" | per seed at {steps[-1]} | minutes/run |",
             "|---" * (len(steps) + 3) + "|",
             "| base (SFT) | " + " | ".join(f"{100 * results['base'][str(s)]:.1f}" for s in steps) + " | | |"]
    for method, runs in by_method(results).items():
        cells = [_mean_ci([r["at_steps"][str(s)] for r in runs]) for s in steps]
        per_seed = ", ".join(f"{100 * r['at_steps'][str(steps[-1])]:.1f}" for r in runs)
        minutes = statistics.mean(r["minutes"] for r in runs)
        lines.append(f"| {method} ({len(runs)} seeds) | " + " | ".join(cells) + f" | {per_seed} | {minutes:.1f} |")
    for reference in ("agrpo", "atpo"):  # the paper's estimator, and its reallocation against the rest
        lines += separation_lines(results, reference)
    if results.get("overrides"):
        lines.insert(0, f"RL runs with {' '.join(results['overrides'])}\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def separation_lines(results: dict, reference: str = "agrpo") -> list[str]:
    """Each other method against the reference: difference of means (points) with its Welch 95% interval and
    p-value, whether the two methods' own 95% intervals overlap, and the seeds per method that would separate
    them at the measured difference and spreads."""
    steps = results["sampling_steps"]
    runs = by_method(results)
    seeds = lambda m, s: [r["at_steps"][str(s)] for r in runs.get(m, [])]
    others = [m for m in runs if m != reference]
    if len(seeds(reference, steps[-1])) < 2 or not others:
        return []
    lines = ["", f"{reference} minus each method, points: difference [Welch 95% interval] p; "
             "whether the two 95% intervals above overlap; seeds per method that would separate them "
             "at this difference and spread", "", "| method | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for m in others:
        cells = []
        for s in steps:
            if len(seeds(m, s)) < 2:
                cells.append("")
                continue
            sep = separation(seeds(reference, s), seeds(m, s))
            need = "> 1,000 seeds" if sep["seeds_needed"] is None else f"~{sep['seeds_needed']} seeds"
            cells.append(f"{100 * sep['diff']:+.1f} [{100 * sep['diff_low']:+.1f}, {100 * sep['diff_high']:+.1f}] "
                         f"p={sep['p']:.2f}, {'overlap' if sep['overlap'] else '**separate**'}, {need}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
