"""The CPU-sized experiment of docs/RESULTS.md: base vs diffu-GRPO vs AGRPO vs ATPO on one task.

    python -m benchmarks.rl_compare --steps 30 --seeds 0 1 2 --out docs/results
    python -m benchmarks.rl_compare --config tiny_sudoku --steps 30 --seeds 0 1 2 --out docs/results/sudoku
    python -m benchmarks.rl_compare --config tiny_sudoku --methods agrpo --set learner.lr=3e-5 --out ...  # ablation
    python -m benchmarks.rl_compare --design benchmarks/designs/estimators.json --out docs/results/estimators
    python -m benchmarks.rl_compare --join docs/results/estimators docs/results/estimators_bgpo --out docs/results/all

A design file pre-registers a comparison (``load_design``): config, steps, methods, the learning rates tried
and the tuning seeds they are tried on, and the evaluation seeds (n fixed before anything runs, apart from
the tuning seeds); its optional ``variants`` name methods of its own (name -> config overrides, e.g. a queue
setting with an algorithm's). The tool then runs every method at every lr on the tuning seeds, picks each method's lr by
its mean final held-out accuracy there (ties: the lr listed first), and runs the chosen lr on the evaluation
seeds; only those enter the table. The design's hash is part of the setup, so a changed design (another
seed added after looking) cannot write into the same --out. ``--methods`` may name a subset of the design's
methods; runs already recorded are not run again. Several invocations of one setup may run at once into one
--out (one per core): each claims a run before it trains it (``--out``/claims), so no run is made twice, and an
invocation waits for the runs another one holds before it ends. Before each run it prints how many of the
planned runs are recorded and the run time left at their mean; ``--status`` prints that, per method, without any
outcome. ``--join`` puts the evaluation runs of several
--out directories into one table and plots, training nothing (designs registered apart, e.g. a method added
later); they must agree on task, budget, evaluation seeds, sampling steps and the base's accuracy.

Every method gets the same rollout budget (steps x groups_per_step x group_size trajectories) from the
same base checkpoint and config (default configs/tiny_countdown.yaml), and is evaluated greedily on the
task's 256 held-out items at 1/4, 1/2 and 1 x the generation length in sampling steps. Writes results.json, a
markdown table (results.md: mean ± half-width of the 95% Student-t interval over seeds, and each seed) and
plots into --out.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
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
    # the field's sequence-likelihood surrogates, each with its public code's defaults (common/config/algorithm.py)
    "wd1": ["algorithm={name: wd1}"],
    "coupled_grpo": ["algorithm={name: coupled_grpo}"],
    "spg": ["algorithm={name: spg}"],
    "espo": ["algorithm={name: espo}"],
    "bgpo": ["algorithm={name: bgpo}"],
    # TraceRL: every step of the trajectory, committed tokens (rl_sdar.py's defaults: exact where committed-only is)
    "tracerl": ["algorithm={name: tracerl}"],
    "tracerl_llada": ["algorithm={name: tracerl, variant: llada, shrink: 8}"],  # rl_llada.yaml: a surrogate
    # JustGRPO decodes left to right, one token a step: the preset's sampler.steps must equal its gen_length
    "justgrpo": ["algorithm={name: justgrpo}", "sampler.remasking=sequential"],
}
DEFAULT_METHODS = ["agrpo", "atpo", "atpo_unbiased", "diffu_grpo"]
POLL_S = 30.0  # how often an invocation looks again for the runs another one holds


DESIGN_KEYS = {"config", "steps", "methods", "seeds", "tuning_seeds", "lrs"}


def load_design(path: Path) -> dict:
    """A pre-registered comparison: a JSON object with ``config``, ``steps``, ``methods``, ``lrs`` (the
    learning rates each method is tried at), ``tuning_seeds`` and ``seeds`` (the evaluation seeds; apart from
    the tuning ones), optionally ``overrides``, ``variants`` (methods of its own: name -> overrides) and ``note``.
    Its hash (``sha256``) makes it part of the setup."""
    raw = path.read_bytes()
    design = json.loads(raw)
    problems = [f"missing {', '.join(sorted(DESIGN_KEYS - set(design)))}"] if DESIGN_KEYS - set(design) else []
    if not problems:
        variants = design.get("variants", {})
        clash = sorted(set(variants) & set(METHODS))
        problems += [f"variants {clash} shadow methods of the same name; rename them"] if clash else []
        unknown = [m for m in design["methods"] if m not in METHODS and m not in variants]
        shared = sorted(set(design["seeds"]) & set(design["tuning_seeds"]))
        problems += [f"unknown method(s) {unknown}; choose from {sorted(METHODS)}"] if unknown else []
        problems += [f"seeds {shared} are both tuning and evaluation seeds; keep them apart"] if shared else []
        problems += ["lrs must name at least one learning rate"] if not design["lrs"] else []
        problems += ["several lrs need tuning_seeds to choose among them"] if len(design["lrs"]) > 1 and not design["tuning_seeds"] else []
    if problems:
        raise ValueError(f"design {path}: {'; '.join(problems)}")
    return {**design, "overrides": design.get("overrides", []), "variants": design.get("variants", {}),
            "sha256": hashlib.sha256(raw).hexdigest()[:16]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--design", type=Path, help="a pre-registered design (JSON); it fixes every option below but "
                   "--methods (a subset of its methods) and --eval-every")
    p.add_argument("--steps", type=int, help="learner steps per run (default 40)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--methods", nargs="+", help=f"default {' '.join(DEFAULT_METHODS)}; one of {sorted(METHODS)} or a "
                   "design's variants")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every n learner steps")
    p.add_argument("--config", help="default tiny_countdown")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="config override applied to every RL run (repeatable), e.g. learner.lr=3e-5")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and plots")
    p.add_argument("--report-only", action="store_true",
                   help="re-evaluate the base model and rewrite the report and plots from results.json")
    p.add_argument("--status", action="store_true", help="no runs: how far the runs in --out are, per method and "
                   "phase, showing no outcome (no accuracy, no chosen lr), so a design can be followed unread")
    p.add_argument("--join", nargs="+", type=Path, metavar="DIR",
                   help="no runs: one table and plots in --out of these --out directories' evaluation runs")
    args = p.parse_args(argv)
    if args.join:
        given = [f"--{k}" for k in ("design", "steps", "seeds", "methods", "config", "overrides")
                 if getattr(args, k) is not None] + (["--report-only"] if args.report_only else [])
        if given:
            p.error(f"--join takes only --out; {', '.join(given).replace('--overrides', '--set')} belong to the runs")
        return args
    args.lrs, args.tuning_seeds, args.design_sha, args.variants, args.design_methods = [None], [], None, {}, []
    if args.design is None:
        if args.methods and set(args.methods) - set(METHODS):
            p.error(f"--methods {sorted(set(args.methods) - set(METHODS))} unknown; choose from {sorted(METHODS)}")
        defaults = {"steps": 40, "seeds": [0, 1, 2], "methods": DEFAULT_METHODS, "config": "tiny_countdown",
                    "overrides": []}
        for key, value in defaults.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
        return args
    fixed = [f"--{k}" for k in ("steps", "seeds", "config", "overrides") if getattr(args, k) is not None]
    if fixed:
        p.error(f"{', '.join(fixed).replace('--overrides', '--set')} given with --design, which fixes them: edit "
                "a new design file instead (a registered one is not changed after looking)")
    try:
        design = load_design(args.design)
    except (OSError, ValueError) as err:
        p.error(str(err))
    if args.methods and set(args.methods) - set(design["methods"]):
        p.error(f"--methods {sorted(set(args.methods) - set(design['methods']))} are not in the design")
    args.methods, args.design_methods = args.methods or design["methods"], design["methods"]
    for key in ("steps", "seeds", "config", "overrides", "lrs", "tuning_seeds", "variants"):
        setattr(args, key, design[key])
    args.design_sha = design["sha256"]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.join:
        try:
            results = join_results([json.loads((d / "results.json").read_text()) for d in args.join], args.join)
        except (OSError, ValueError) as err:
            print(f"rl_compare: {err}", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        write_report(results, out)
        plot_all(results, out)
        return 0
    if args.status:
        path = Path(args.out) / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {"runs": []}  # a design about to start
        try:
            print("\n".join(status_lines(results, args, Path(args.out) / "claims")), flush=True)
        except BrokenPipeError:  # piped to a reader that stopped early (head)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    import ray

    from common.config import load_config
    from common.metrics import read_metrics
    from driver.evaluate import evaluate_checkpoint
    from driver.plots import load_step_profiles, plot_confusion_zones
    from driver.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config, args.overrides)  # the base decodes as the RL runs do (e.g. remasking)
    # A design whose every method decodes one way (e.g. its variants all set remasking) has its base decode so too
    # (its whole method list: an invocation running a subset evaluates the same base).
    samplers = {load_config(args.config, {**METHODS, **args.variants}[m] + args.overrides).sampler.model_dump_json()
                for m in args.design_methods}
    if len(samplers) == 1:
        base_cfg = base_cfg.model_copy(update={"sampler": type(base_cfg.sampler).model_validate_json(samplers.pop())})
    sampling_steps = [base_cfg.sampler.gen_length // 4, base_cfg.sampler.gen_length // 2, base_cfg.sampler.gen_length]
    results: dict = {"config": args.config, "overrides": args.overrides, "task": base_cfg.task.name, "steps": args.steps, "seeds": args.seeds, "sampling_steps": sampling_steps,
                     "budget_trajectories": args.steps * base_cfg.learner.groups_per_step * base_cfg.rollout.group_size,
                     "eval_items": base_cfg.task.eval_size,
                     "base": {}, "runs": []}
    if args.design_sha:
        results.update(design=str(args.design), design_sha256=args.design_sha, lrs=args.lrs,
                       tuning_seeds=args.tuning_seeds)
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

    def run(method: str, seed: int, lr: float | None, phase: str) -> str:
        """One run unless it is recorded ("done") or another live invocation holds it ("claimed"); "failed"."""
        key = (method, seed, lr, phase)
        recorded = record_run(out, results, None)
        if any(_key(r) == key for r in recorded["runs"]):
            return "done"  # recorded by an earlier or concurrent invocation of this design
        name = f"{method}-s{seed}" if lr is None else f"{method}-lr{lr:g}-s{seed}"
        claim = out / "claims" / f"{name}-{phase}"
        if not take_claim(claim):
            return "claimed"
        print(f"rl_compare: {name} ({phase}) next; "
              f"{progress(recorded, args.methods, args.lrs, args.tuning_seeds, args.seeds)}", flush=True)
        try:
            return train_one(method, seed, lr, phase, name)
        finally:
            claim.unlink(missing_ok=True)

    def train_one(method: str, seed: int, lr: float | None, phase: str, name: str) -> str:
        nonlocal results
        t0 = time.time()
        cfg = load_config(args.config, {**METHODS, **args.variants}[method] + args.overrides + ([f"learner.lr={lr}"] if lr else []) + [
            f"run.root={out / 'runs'}", f"run.name={name}", f"run.seed={seed}",
            f"task.seed={seed}", f"run.total_steps={args.steps}", f"run.eval_every={args.eval_every}",
            f"run.eval_sampling_steps={sampling_steps}"])
        if train(cfg) != 0:  # not an assert: python -O would remove the training with it
            print(f"rl_compare: the {method} run of seed {seed} failed (its log is above); stopping", file=sys.stderr)
            return "failed"
        run_dir = sorted((out / "runs").glob(f"{name}-*"))[-1]
        records = read_metrics(run_dir / "metrics.jsonl")
        step_s = [r["step_time_s"] for r in records if "step_time_s" in r]
        results = record_run(out, results, {
            "method": method, "seed": seed, "lr": lr, "phase": phase, "run_dir": str(run_dir),
            "minutes": (time.time() - t0) / 60, "learner_s_per_step": statistics.mean(step_s) if step_s else None,
            **time_shares(records),
            "curve": [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r],
            "at_steps": {str(r["eval_sampling_steps"]): r["eval_accuracy_at_steps"] for r in records
                         if "eval_sampling_steps" in r},
        })
        return "ran"

    def run_each(method: str, plan: list[tuple]) -> str:
        """The plan's runs in order: "failed" at the first failure, else "claimed" if another invocation holds one."""
        states = set()
        for seed, lr, phase in plan:
            states.add(run(method, seed, lr, phase))
            if "failed" in states:
                return "failed"
        return "claimed" if "claimed" in states else "done"

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        # Passes over the plan until every run is recorded: a run another invocation holds, or the evaluation
        # runs of a method whose tuning another still runs, wait for a later pass.
        while True:
            waiting = False
            for method in args.methods:
                if args.design_sha:  # tuning first, on its own seeds; then the chosen lr on the evaluation seeds
                    if run_each(method, [(seed, lr, "tune") for lr in args.lrs for seed in args.tuning_seeds]) == "failed":
                        return 1
                    results["chosen_lr"] = chosen_lrs(record_run(out, results, None), args.methods)
                    if method not in results["chosen_lr"]:
                        waiting = True
                        continue
                lr = results.get("chosen_lr", {}).get(method)
                state = run_each(method, [(seed, lr, "eval") for seed in args.seeds])
                if state == "failed":
                    return 1
                waiting |= state == "claimed"
            if not waiting:
                break
            time.sleep(POLL_S)
    finally:
        ray.shutdown()
    results = record_run(out, results, None)
    if args.design_sha:
        results["chosen_lr"] = chosen_lrs(results)
        results = record_run(out, results, None)  # kept in the file (--report-only starts without it)
    write_report(results, out)
    results = evaluation_runs(results)
    first = next((r["run_dir"] for r in results["runs"] if r["method"] == "agrpo"), None)
    profiles = load_step_profiles(Path(first) / "trajectories", limit=100_000) if first else None
    if profiles is not None:  # confusion zones of the first and last policy versions of one AGRPO run
        versions = profiles["policy_version"]
        for name, pick in (("before", versions == versions.min()), ("after", versions == versions.max())):
            sub = {k: v[pick] for k, v in profiles.items()}
            plot_confusion_zones(sub, out / f"confusion_zones_{name}.png",
                                 title=f"zones of confusion, policy version {int(versions[pick][0])}")
    plot_all(results, out)
    return 0


def progress(results: dict, methods: list, lrs: list, tuning_seeds: list, seeds: list) -> str:
    """How far the comparison of ``methods`` is: runs recorded of those planned (every lr on every tuning seed,
    then the evaluation seeds), and the run time left at the recorded runs' mean minutes. Run time, not wall
    clock: invocations running at once share it."""
    planned = len(methods) * (len(lrs) * len(tuning_seeds) + len(seeds))
    recorded = [r for r in results["runs"] if r["method"] in methods]
    minutes = [r["minutes"] for r in recorded if r.get("minutes")]
    line = f"{len(recorded)} of {planned} runs recorded"
    if minutes:
        left = max(planned - len(recorded), 0)
        mean = statistics.mean(minutes)
        line += f", {mean:.1f} min a run: about {left * mean / 60:.1f} h of runs left"
    return line


def status_lines(results: dict, args, claims: Path) -> list[str]:
    """A design's progress without its outcomes: runs recorded of those planned, per method its tuning and
    evaluation runs recorded, and how many runs live invocations hold now (not which: a claim names the chosen lr)."""
    lines = [progress(results, args.methods, args.lrs, args.tuning_seeds, args.seeds)]
    for method in args.methods:
        phases = [r.get("phase", "eval") for r in results["runs"] if r["method"] == method]
        tuning = f"tuning {phases.count('tune')} of {len(args.lrs) * len(args.tuning_seeds)}, " if args.tuning_seeds else ""
        lines.append(f"  {method}: {tuning}evaluation {phases.count('eval')} of {len(args.seeds)}")
    held = [c for c in claims.glob("*") if _holder(c) is not None]
    return lines + [f"  running now: {len(held)} run(s) held by live invocations"]


def _holder(claim: Path) -> int | None:
    """The live process a claim file names, or None (a dead holder's, or one cut short while it was written)."""
    text = claim.read_text().strip() if claim.is_file() else ""
    return int(text) if text.isdigit() and _alive(int(text)) else None


def take_claim(path: Path) -> bool:
    """Claims one run for this invocation (a file naming its process, checked and written under a lock); False
    while another live process holds it. A dead holder's claim, left by a killed invocation, is taken over, and so is
    one that names no process (cut short by a crash while it was written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _holder(path) not in (None, os.getpid()):
            return False
        path.write_text(str(os.getpid()))
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def start_accuracy(run: dict) -> float | None:
    """A run's held-out accuracy at step 0, before its first update, under its method's own decoding (JustGRPO's
    is sequential); None if it was not evaluated there."""
    return dict(run["curve"]).get(0)


JOIN_KEYS = ("task", "steps", "budget_trajectories", "eval_items", "sampling_steps", "seeds")


def join_results(parts: list[dict], sources: list) -> dict:
    """The evaluation runs of several comparisons as one: each part must agree with the first on
    ``JOIN_KEYS`` (the same task, budget, evaluation seeds and sampling steps) and start from the same base:
    the same base row, or (a part whose methods all decode otherwise than its preset, so its base row was
    evaluated under another decoding than its runs) runs whose step-0 held-out accuracy is the first part's
    base at the full step count. A method may come from one part only. Raises ValueError naming the first
    disagreement."""
    first = parts[0]
    full = str(first["sampling_steps"][-1])
    for part, source in zip(parts[1:], sources[1:]):
        for key in JOIN_KEYS:
            if part.get(key) != first.get(key):
                raise ValueError(f"{source} has {key} {part.get(key)}, {sources[0]} {first.get(key)}: only "
                                 "comparisons of one task, budget, seed set and base join")
        starts = {start_accuracy(r) for r in evaluation_runs(part)["runs"]}
        if part.get("base") != first.get("base") and starts != {first["base"][full]}:
            raise ValueError(f"{source} has base {part.get('base')} and its runs start at {sorted(starts, key=str)}, "
                             f"{sources[0]} base {first.get('base')}: only comparisons of one base join")
    owner: dict[str, str] = {}
    runs = []
    for part, source in zip(parts, sources):
        for run in evaluation_runs(part)["runs"]:
            if owner.setdefault(run["method"], str(source)) != str(source):
                raise ValueError(f"method {run['method']} is in {owner[run['method']]} and {source}: rename one")
            runs.append(run)
    joined = [{"dir": str(s), "config": p.get("config"), "overrides": p.get("overrides", []), "base": p.get("base"),
               "design": p.get("design"), "design_sha256": p.get("design_sha256"), "chosen_lr": p.get("chosen_lr")}
              for p, s in zip(parts, sources)]
    return {**{k: first.get(k) for k in (*JOIN_KEYS, "base")}, "joined": joined, "runs": runs}


def time_shares(records: list[dict]) -> dict[str, float]:
    """Training wall seconds (first to last learner step) and the learner's and rollout workers' idle shares
    over it: 1 - learner step seconds / wall, 1 - rollout generate seconds / (workers x wall)."""
    steps = [r for r in records if "step_time_s" in r]
    if len(steps) < 2:
        return {}
    t0, t1 = steps[0]["time"], steps[-1]["time"]
    wall = t1 - t0
    learn = sum(r["step_time_s"] for r in steps[1:])
    gen = sum(r["gen_seconds"] for r in records if r.get("event") == "rollout" and t0 < r["time"] <= t1)
    workers = statistics.mean(r["rollout_workers"] for r in steps)
    return {"train_wall_s": wall, "learner_idle": 1 - learn / wall, "rollout_idle": 1 - gen / (workers * wall)}


def _setup(results: dict) -> tuple:
    """What makes runs comparable (one budget, config, overrides and design): only such runs share a
    results.json."""
    return results.get("steps"), results.get("config"), results.get("overrides", []), results.get("design_sha256")


def _key(run: dict) -> tuple:
    return run["method"], run["seed"], run.get("lr"), run.get("phase", "eval")


def chosen_lrs(results: dict, methods=()) -> dict[str, float]:
    """Each method's lr by its mean final held-out accuracy over the tuning seeds (ties: the lr listed first);
    only methods whose every tuning run is recorded. A design with one lr and no tuning seeds runs that lr."""
    if not results["tuning_seeds"]:
        return {m: results["lrs"][0] for m in {r["method"] for r in results["runs"]} | set(methods)}
    chosen = {}
    for method in {r["method"] for r in results["runs"]}:
        means = []
        for lr in results["lrs"]:
            finals = [r["curve"][-1][1] for r in results["runs"] if _key(r)[::2] == (method, lr)
                      and r.get("phase") == "tune"]
            means.append(statistics.mean(finals) if len(finals) == len(results["tuning_seeds"]) else None)
        if None not in means:
            chosen[method] = results["lrs"][means.index(max(means))]
    return chosen


def evaluation_runs(results: dict) -> dict:
    """``results`` with only the runs that enter the table (a design's tuning runs left out)."""
    return {**results, "runs": [r for r in results["runs"] if r.get("phase", "eval") == "eval"]}


def setup_mismatch(out: Path, results: dict) -> str | None:
    """Why ``results``' setup may not write into out/results.json (one line), or None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    on_disk = _setup(json.loads(path.read_text()))
    if on_disk == _setup(results):
        return None
    steps, config, overrides, design = on_disk
    if design or results.get("design_sha256"):
        return (f"{path} holds runs of design {design or 'none'}; this one is {results.get('design_sha256') or 'none'}"
                ": a registered design is not changed after its runs started; write a new one into another --out")
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
            results["runs"] = [r for r in results["runs"] if _key(r) != _key(run)]
            results["runs"].append(run)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        return results


def accuracy_cell(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def write_report(results: dict, out: Path) -> None:
    tuning = tuning_lines(results)
    results = evaluation_runs(results)
    steps = results["sampling_steps"]
    lines = ["| model | " + " | ".join(f"{s} steps" for s in steps) + f" | per seed at {steps[-1]} | at step 0 "
             "| minutes/run | learner s/step |",
             "|---" * (len(steps) + 5) + "|",
             "| base (SFT) | " + " | ".join(f"{100 * results['base'][str(s)]:.1f}" for s in steps) + " | | | | |"]
    for method, runs in by_method(results).items():
        cells = [accuracy_cell([r["at_steps"][str(s)] for r in runs]) for s in steps]
        per_seed = ", ".join(f"{100 * r['at_steps'][str(steps[-1])]:.1f}" for r in runs)
        start = [a for a in map(start_accuracy, runs) if a is not None]
        minutes = statistics.mean(r["minutes"] for r in runs)
        step_s = [r["learner_s_per_step"] for r in runs if r.get("learner_s_per_step") is not None]
        lr = f", lr {runs[0]['lr']:g}" if runs[0].get("lr") else ""
        lines.append(f"| {method} ({len(runs)} seeds{lr}) | " + " | ".join(cells) + f" | {per_seed} | "
                     + (f"{100 * statistics.mean(start):.1f}" if start else "") + f" | {minutes:.1f} | "
                     + (f"{statistics.mean(step_s):.2f} |" if step_s else " |"))
    lines += time_lines(results)
    named = [m for m in ("agrpo", "atpo", "sync") if m in by_method(results)]  # the paper's estimator, its
    for reference in named or list(by_method(results))[:1]:  # reallocation, sync for async designs; else the first
        lines += separation_lines(results, reference)
    lines += tuning
    if results.get("overrides"):
        lines.insert(0, f"RL runs with {' '.join(results['overrides'])}\n")
    for part in reversed(results.get("joined", [])):
        other_base = part["base"] != results["base"]  # its runs start at the table's base (join_results)
        lines.insert(0, f"- {part['dir']}: config {part['config']}" + (f" with {' '.join(part['overrides'])}"
                        if part["overrides"] else "") + (f", design {part['design']} (sha256 {part['design_sha256']})"
                        if part["design"] else "") + (f"; its base row ({', '.join(f'{100 * v:.1f}' for v in part['base'].values())}) "
                        "was decoded otherwise than its runs, which start at this table's base" if other_base else "") + "\n")
    if results.get("joined"):
        lines.insert(0, "The evaluation runs of these comparisons (their tuning is in each one's results.md):\n")
    if results.get("design"):
        lines.insert(0, f"Pre-registered design {results['design']} (sha256 {results['design_sha256']}): evaluation "
                        f"seeds {results['seeds']}, tuning seeds {results['tuning_seeds']}, lrs {results['lrs']}\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def time_lines(results: dict) -> list[str]:
    """Where the time went (runs that recorded it): training wall seconds and the idle shares, mean ± 95%."""
    rows = {m: runs for m, runs in by_method(results).items() if all("train_wall_s" in r for r in runs)}
    if not rows:
        return []

    def cell(runs: list[dict], key: str, scale: float) -> str:
        mean, half = mean_ci95([scale * r[key] for r in runs])
        return f"{mean:.0f} ± {half:.0f}"

    lines = ["", "| method | training wall s | learner idle % | rollout idle % |", "|---|---|---|---|"]
    return lines + [f"| {m} | {cell(runs, 'train_wall_s', 1)} | {cell(runs, 'learner_idle', 100)} | "
                    f"{cell(runs, 'rollout_idle', 100)} |" for m, runs in rows.items()]


def tuning_lines(results: dict) -> list[str]:
    """A design's tuning runs: each method's mean final held-out accuracy per lr, the chosen one in bold."""
    if not results.get("lrs") or results["lrs"] == [None] or not results.get("tuning_seeds"):
        return []
    chosen = chosen_lrs(results)
    lines = ["", f"Tuning (seeds {results['tuning_seeds']}): mean final held-out accuracy per lr", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in results["lrs"]) + " |", "|---" * (len(results["lrs"]) + 1) + "|"]
    for method in sorted({r["method"] for r in results["runs"] if r.get("phase") == "tune"}):
        cells = []
        for lr in results["lrs"]:
            finals = [r["curve"][-1][1] for r in results["runs"] if r.get("phase") == "tune" and _key(r)[::2] == (method, lr)]
            cell = f"{100 * statistics.mean(finals):.1f} ({len(finals)})" if finals else ""
            cells.append(f"**{cell}**" if chosen.get(method) == lr else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


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
