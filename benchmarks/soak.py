"""A chaos soak: the default run on a local multi-raylet cluster while faults from docs/RELIABILITY.md's
table hit it at random times; at the end, nothing lost, nothing trained twice.

    python -m benchmarks.soak --minutes 30 --seed 0 --out benchmarks/results/soak
    python -m benchmarks.soak --minutes 30 --no-faults --run-seed 1 --out benchmarks/results/soak/reference/seed1
    python -m benchmarks.soak --report-only --out benchmarks/results/soak   # the soak's report against the references

The cluster (tests/local_cluster.py): the driver's node (head, the replay queue), a learner node and two
rollout nodes; the run is the default preset (`tiny_countdown`, synchronous AGRPO) as the long run of
docs/RESULTS.md ran it (`run.total_steps=480`, held-out every 20 steps), its rollout pool following the
cluster (one worker per rollout node), a checkpoint every 5 steps. Faults are drawn with the seed: waits
between them exponential (mean ``--mean-gap-s``, clipped to 60-300 s), the kind uniform over

    rollout_actor  SIGKILL of a RolloutWorker process (Ray restarts it)
    queue          SIGKILL of the ReplayQueue process (Ray restarts it; it recovers its spill)
    learner_rank   SIGKILL of a LearnerRank process (the group is rebuilt from the last checkpoint)
    rollout_node   a whole rollout node's raylet killed; the node comes back 30 s later
    driver         SIGKILL of the driver's process group, then `unmask train --resume RUN_DIR`

each waiting for the run to make a learner step after the previous fault (learner and driver faults also
for a first checkpoint). After ``--minutes`` the run is ended with `unmask stop`. Checked, from the run
directory alone: every prompt position trained exactly once in the weights' history (steps rolled back by a
rebuild or a resume dropped), the final run state's done set equal to what was trained plus what was settled
untrained, no group id twice and every group whole in the spills of every driver, steps without gap, and
the held-out curve against fault-free runs. Writes report.md and report.json to ``--out``; exit 1 when a check
fails.

The fault-free reference (fixed 2026-12-06 before any reference run; the soak itself ran with run seed 0,
whose fault-free start it shares, so the references use other run seeds): the same tool with ``--no-faults``
on the same cluster and settings for the same 30 minutes, run seeds 1, 2 and 3, in ``--out``/reference/seed*/.
At every held-out step evaluated by the soak and by all references (m steps; step 0, the shared base, left
out), the soak must lie within the simultaneous 95% prediction interval of one more run: the references'
mean ± t(1 - 0.025/m, df) x s x sqrt(1 + 1/n) (Bonferroni over the m steps), s the within-step standard
deviation pooled over the steps (n references, df = m x (n - 1)).
The soak and its references must run the same commit (the preset's decoding changed to top_prob on 2026-12-06,
after the committed soak and references, which ran random-order decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("rollout_actor", "queue", "learner_rank", "rollout_node", "driver")
ACTOR_OF = {"rollout_actor": "RolloutWorker", "queue": "ReplayQueue", "learner_rank": "LearnerRank"}
NODES = {
    "head": ["--num-cpus=1"],
    "learner": ["--num-cpus=1", '--resources={"learner": 1}'],
    "rollout-a": ["--num-cpus=1", '--resources={"rollout": 1}'],
    "rollout-b": ["--num-cpus=1", '--resources={"rollout": 1}'],
}
RUN = ["run.name=soak", "run.total_steps=480", "run.eval_every=20", "run.eval_sampling_steps=[]",
       "learner.checkpoint_every=5", "learner.resources={learner: 1}", "rollout.resources={rollout: 1}",
       "rollout.follow_cluster=true", "rollout.max_workers=2", "rollout.num_cpus_per_worker=1",
       "learner.num_cpus_per_rank=1"]


def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "driver", *args], cwd=REPO, env=env, start_new_session=True, **kw)


def _records(run_dir: Path) -> list[dict]:
    from common.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in _records(run_dir) if "loss" in r), default=0)


def _actor_pid(cluster, class_name: str) -> int | None:
    """A live actor process of a class (Ray titles them ``ray::<Class>``) under this cluster's raylets."""
    from tests.run_helpers import actor_pids

    pids = actor_pids(cluster.raylet_pids(), class_name)
    return pids[0] if pids else None


class Soak:
    def __init__(self, args, tmp: Path):
        from tests.local_cluster import LocalCluster, cluster_env

        self.args, self.rng = args, random.Random(args.seed)
        self.root = tmp / "runs"
        self.log = open(args.out / "driver.log", "w")
        self.cluster = LocalCluster(tmp, NODES)
        self.env = {**cluster_env(), "RAY_ADDRESS": self.cluster.address, "PYTHONUNBUFFERED": "1"}
        self.faults: list[dict] = []
        self.drivers: list[int] = []

    def start(self) -> None:
        seed = [f"run.seed={self.args.run_seed}", f"task.seed={self.args.run_seed}"]
        sets = [a for s in [f"run.root={self.root}", *RUN, *seed] for a in ("--set", s)]
        self.driver = _cli(["train", *sets], self.env, stdout=self.log, stderr=subprocess.STDOUT)
        while not list(self.root.glob("soak-*/metrics.jsonl")):
            self._check_driver()
            time.sleep(1)
        self.run_dir = next(self.root.glob("soak-*"))

    def _check_driver(self) -> None:
        if self.driver.poll() is not None:
            raise RuntimeError(f"the driver ended with exit code {self.driver.returncode}; see {self.log.name}")

    def _wait_step(self, after: int, timeout_s: float = 900) -> None:
        """Until the run logs a learner step past ``after``."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            self._check_driver()
            if _last_step(self.run_dir) > after:
                return
            time.sleep(1)
        raise RuntimeError(f"no learner step past {after} within {timeout_s:.0f} s of a fault")

    def inject(self, kind: str) -> dict:
        step, t_fault = _last_step(self.run_dir), time.time()
        fault = {"t_s": round(t_fault - self.t0), "kind": kind, "step": step}
        if kind in ACTOR_OF:
            pid = _actor_pid(self.cluster, ACTOR_OF[kind])
            if pid is None:
                return {**fault, "injected": False}
            os.kill(pid, signal.SIGKILL)
        elif kind == "rollout_node":
            self.cluster.stop_node("rollout-b")
            time.sleep(30)
            self.cluster.start_node("rollout-b")
        else:  # the driver, then a resume
            os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait()
            self.drivers.append(step)
            self.driver = _cli(["train", "--resume", str(self.run_dir)], self.env, stdout=self.log,
                               stderr=subprocess.STDOUT)
        fault["injected"] = True
        self._wait_step(step)
        fault["recovered_in_s"] = round(time.time() - t_fault)  # until a learner step past the fault's
        return fault

    def run(self) -> None:
        self.t0 = time.time()
        self.start()
        self._wait_step(0)
        while True:
            gap = min(300.0, max(60.0, self.rng.expovariate(1.0 / self.args.mean_gap_s)))
            kind = self.rng.choice(KINDS)
            if self.args.no_faults or time.time() + gap - self.t0 > self.args.minutes * 60:
                break
            deadline = time.time() + gap
            while time.time() < deadline:
                self._check_driver()
                time.sleep(1)
            if kind in ("learner_rank", "driver"):  # both go back to a checkpoint: wait for a first one
                while not list((self.run_dir / "checkpoints").glob("step_*")):
                    self._check_driver()
                    time.sleep(1)
            self.faults.append(self.inject(kind))
            print(f"[{self.faults[-1]['t_s']:5d} s] {kind} at step {self.faults[-1]['step']}: "
                  f"recovered in {self.faults[-1].get('recovered_in_s')} s", flush=True)
        while time.time() - self.t0 < self.args.minutes * 60:  # (all of it with --no-faults)
            self._check_driver()
            time.sleep(1)
        subprocess.run([sys.executable, "-m", "driver", "stop", str(self.run_dir)], cwd=REPO, env=self.env, check=True)
        self.exit_code = self.driver.wait(timeout=1800)
        self.wall_s = time.time() - self.t0

    def close(self) -> None:
        if getattr(self, "driver", None) is not None and self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGKILL)
        self.cluster.stop()
        self.log.close()


def check(run_dir: Path, group_size: int) -> dict:
    """What the run directory says about loss and duplication (the checks of tests/test_reliability.py, for
    any number of learner rebuilds and driver resumes)."""
    from common.spill import recover
    from driver.ledger import RunState, position_of
    from learner.checkpoint import read_meta

    records = _records(run_dir)
    lineage: list[dict] = []
    for r in records:
        if "loss" in r:  # a step k after a rebuild or a resume rolls back every step >= k with the weights
            lineage = [s for s in lineage if s["step"] < r["step"]] + [r]
    trained = [p for r in lineage for p in r["prompts"]]
    steps = [r["step"] for r in lineage]
    last = max((run_dir / "checkpoints").glob("step_*"), key=lambda d: int(d.name.split("_")[1]))
    state = RunState.from_dict(read_meta(last)["run_state"])
    settled = {position_of(g) for r in records  # refused, dropped as stale, skipped at a queue restart
               for g in r.get("rejected_ids", []) + r.get("dropped_ids", [])
               + (r["group_ids"] if r.get("event") == "prompts_skipped" else [])}
    done = set(range(state.trained_below)) | set(state.trained_above)
    ids, whole, groups = [], True, 0
    for d in [run_dir / "trajectories", *sorted((run_dir / "trajectories").glob("driver-*"))]:
        rec = recover(d, "raise", keep_consumed=True)
        groups += len(rec.groups)
        for rb in rec.groups:
            ids.append(rb.column("group_id")[0].as_py())
            whole &= rb.num_rows == group_size and len(set(rb.column("group_id").to_pylist())) == 1
    # A held-out number over part of the items (a worker died during it: eval_missing) is over another
    # subset, so it is listed but not compared.
    evals = {r["step"]: round(100 * r["eval_accuracy"], 1) for r in records
             if "eval_accuracy" in r and not r.get("eval_missing")}
    partial = {r["step"]: f"{100 * r['eval_accuracy']:.1f} over {r['eval_n']} items" for r in records
               if "eval_accuracy" in r and r.get("eval_missing")}
    return {
        "steps": len(steps), "steps_without_gap": steps == list(range(1, len(steps) + 1)),
        "prompts_trained": len(trained), "prompts_trained_twice": len(trained) - len(set(trained)),
        "done_not_trained_nor_settled": len(done - set(trained) - settled),
        "trained_not_done": len(set(trained) - done),
        "groups_produced": sum(r["groups"] for r in records if r.get("event") == "rollout"),
        "groups_spilled": groups, "group_ids_repeated": len(ids) - len(set(ids)), "groups_whole": whole,
        "learner_rebuilds": sum(r.get("event") == "learner_rebuilt" for r in records),
        "held_out": evals, "held_out_partial": partial,
    }


def reference_runs(out: Path) -> list[dict[int, float]]:
    """Held-out accuracy per step of each fault-free reference run under ``out``/reference/seed*/."""
    return [{int(k): v for k, v in json.loads(p.read_text())["checks"]["held_out"].items()}
            for p in sorted((out / "reference").glob("seed*/report.json"))]


def reference_band(curves: list[dict[int, float]], steps: list[int]) -> tuple[dict[int, float], float]:
    """(mean per step, half-width): the simultaneous 95% prediction interval of one more run at every step,
    Bonferroni over ``steps``, the standard deviation pooled over them (see the module's docstring)."""
    import statistics

    from scipy import stats

    n = len(curves)
    means = {s: statistics.mean(c[s] for c in curves) for s in steps}
    pooled = statistics.mean(statistics.variance([c[s] for c in curves]) for s in steps) ** 0.5
    quantile = 1 - 0.025 / len(steps)
    return means, stats.t.ppf(quantile, len(steps) * (n - 1)) * pooled * (1 + 1 / n) ** 0.5


def report(out: Path, soak: dict, checks: dict) -> bool:
    faulty = bool(soak.get("faults")) or not soak.get("no_faults", False)
    curves = reference_runs(out) if faulty else []
    steps = sorted(s for s in checks["held_out"] if s > 0 and all(s in c for c in curves))
    compared = faulty and len(curves) >= 2 and bool(steps)
    means, width = reference_band(curves, steps) if compared else ({}, 0.0)
    within = compared and all(abs(checks["held_out"][s] - means[s]) <= width for s in steps)
    ok = (soak["exit_code"] == 0 and checks["prompts_trained_twice"] == 0 and checks["group_ids_repeated"] == 0
          and checks["done_not_trained_nor_settled"] == 0 and checks["trained_not_done"] == 0
          and checks["groups_whole"] and checks["steps_without_gap"]
          and checks["groups_produced"] <= checks["groups_spilled"]
          and all(f["injected"] for f in soak["faults"]) and (within or not faulty))
    if not faulty:
        held_out = ["Fault-free reference run: held-out accuracy (%, greedy, 16 steps, all 256 items)", "",
                    "| step | accuracy |", "|---|---|", *[f"| {s} | {a:.1f} |" for s, a in sorted(checks["held_out"].items())]]
    elif not compared:
        held_out = [f"Held-out accuracy not compared: {len(curves)} fault-free reference run(s) under "
                    f"{out / 'reference'} (at least 2 needed; `--no-faults --run-seed N`). **FAIL** until they exist."]
    else:
        held_out = [
            f"Held-out accuracy (%, greedy, 16 steps, all 256 items) against {len(curves)} fault-free runs of the same "
            f"tool, cluster and settings (`--no-faults`, run seeds in reference/). Tolerance: the simultaneous 95% "
            f"prediction interval of one more run at all {len(steps)} steps (Bonferroni; spread pooled over the "
            f"steps), ±{width:.1f} points around their mean; "
            f"{'every' if within else 'NOT every'} step is within it. Evaluations a fault cut short (not compared): "
            f"{checks['held_out_partial'] or 'none'}.", "",
            "| step | soak | fault-free mean | fault-free runs | difference |", "|---|---|---|---|---|",
            *[f"| {s} | {checks['held_out'][s]:.1f} | {means[s]:.1f} | {', '.join(f'{c[s]:.1f}' for c in curves)} | "
              f"{checks['held_out'][s] - means[s]:+.1f} |" for s in steps]]
    lines = [
        "# Chaos soak" if faulty else "# Soak reference (no faults)", "",
        f"`{soak['command']}` ({soak['machine']}, commit {soak.get('commit', '?')})", "",
        f"Wall {soak['wall_s'] / 60:.1f} min, {checks['steps']} learner steps, exit code {soak['exit_code']}; "
        f"{len(soak['faults'])} faults injected, {sum(f.get('injected', False) for f in soak['faults'])} hit a "
        f"live target and the run stepped again after each. **{'PASS' if ok else 'FAIL'}**.", "",
        *(["| t (s) | fault | at step | recovered in (s) |", "|---|---|---|---|",
           *[f"| {f['t_s']} | {f['kind']} | {f['step']} | {f.get('recovered_in_s', 'not injected')} |"
             for f in soak["faults"]], ""] if faulty else []),
        "| check | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in checks.items() if not k.startswith("held_out")], "",
        *held_out,
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({**soak, "checks": checks, "pass": ok}, indent=1))
    print("\n".join(lines))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0, help="draws the faults' times and kinds")
    p.add_argument("--mean-gap-s", type=float, default=150.0)
    p.add_argument("--no-faults", action="store_true", help="a fault-free reference run (same cluster and settings)")
    p.add_argument("--run-seed", type=int, default=0, help="the run's own seed (run.seed and task.seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --out's report from its report.json (e.g. once the reference runs exist)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        record = json.loads((args.out / "report.json").read_text())
        checks = record.pop("checks")
        checks["held_out"] = {int(k): v for k, v in checks["held_out"].items()}
        record = {k: v for k, v in record.items() if k not in ("pass", "seed_spread_20")}
        return 0 if report(args.out, record, checks) else 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed soak still stops its cluster
    import platform

    from common.config import load_config

    with tempfile.TemporaryDirectory(prefix="soak") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.run()
        finally:
            soak.close()
        checks = check(soak.run_dir, load_config("tiny_countdown").rollout.group_size)
        shutil.copy(soak.run_dir / "metrics.jsonl", args.out / "metrics.jsonl")
        record = {"command": "python -m benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "seed": args.seed,
                  "run_seed": args.run_seed, "no_faults": args.no_faults,
                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip(),
                  "wall_s": soak.wall_s, "exit_code": soak.exit_code, "faults": soak.faults,
                  "driver_resumes_at_steps": soak.drivers}
        return 0 if report(args.out, record, checks) else 1


if __name__ == "__main__":
    sys.exit(main())
