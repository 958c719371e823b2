"""Faults injected into real runs on a local Ray instance: the run finishes and nothing is lost.

Figures from these tests are reported in docs/RELIABILITY.md.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.metrics import read_metrics
from tests.run_helpers import actor_pids, train_beside

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
SMALL = ["task.eval_size=8", "learner.groups_per_step=2", "rollout.prompts_per_call=1",
         "run.eval_sampling_steps=[]", "run.eval_every=0"]


def _actor_pids(class_name: str) -> list[int]:
    """Processes of live actors of a class of this process's Ray instance only: other Ray instances on the
    machine (a benchmark, another test run) are left alone."""
    import ray._private.ray_constants as ray_constants
    import ray._private.worker as ray_worker

    raylet = ray_worker.global_worker.node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return actor_pids([raylet], class_name)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.is_file() else []


def _inject(root: Path, plan: list[tuple[int, str]], done: list, stop: threading.Event) -> None:
    """At learner step s, SIGKILL the process of one actor of the named class (Ray restarts it)."""
    while plan and not stop.is_set():
        runs = list(root.glob("faults-*"))
        steps = _steps(runs[0]) if runs else []
        if steps and max(steps) >= plan[0][0]:
            step, cls = plan.pop(0)
            pids = _actor_pids(cls)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                done.append((step, cls))
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["object_store", "nccl"])
def test_rollout_queue_and_learner_faults_mid_run(tmp_path, transport):
    """nccl (gloo on CPU): a restarted worker and a rebuilt learner each force a new broadcast group."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        cfg = load_config("tiny_countdown", SMALL + [
            f"run.root={tmp_path}", "run.name=faults", "run.total_steps=8", "learner.checkpoint_every=2",
            "rollout.num_workers=2", "queue.max_staleness=1", f"learner.weight_transport={transport}",
            "learner.sync_timeout_s=30"])
        done: list = []
        plan = [(1, "RolloutWorker"), (3, "ReplayQueue"), (5, "LearnerRank")]
        assert train_beside(cfg, _inject, tmp_path, plan, done) == 0
    finally:
        ray.shutdown()
    assert [cls for _, cls in done] == ["RolloutWorker", "ReplayQueue", "LearnerRank"]
    run_dir = next(tmp_path.glob("faults-*"))
    records = read_metrics(run_dir / "metrics.jsonl")
    events = [r.get("event") for r in records]
    assert "learner_rebuilt" in events  # the group came back from the step-4 checkpoint
    steps = _steps(run_dir)
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9))
    # Each prompt is trained exactly once in the weights' history: the steps after the checkpoint the learner
    # was rebuilt from went with its weights, and their prompts were dispatched again (as on --resume).
    lineage = []
    for r in records:
        if r.get("event") == "learner_rebuilt":
            lineage = [s for s in lineage if s["step"] <= r["step"]]
        elif "loss" in r:
            lineage.append(r)
    trained = [p for r in lineage for p in r["prompts"]]
    assert len(lineage) == 8 and len(trained) == 8 * 2  # SMALL: 2 groups (prompts) per step
    assert len(trained) == len(set(trained)), "a prompt was trained twice across the learner rebuild"
    # ... and every prompt the final run state counts done was trained in it (or settled untrained: refused
    # as over-long, dropped as stale): none of the rolled-back steps' prompts is counted done untrained.
    from driver.ledger import RunState, position_of
    from learner.checkpoint import read_meta

    last = max((run_dir / "checkpoints").glob("step_*"), key=lambda d: int(d.name.split("_")[1]))
    state = RunState.from_dict(read_meta(last)["run_state"])
    settled = {position_of(g) for r in records if r.get("event") in ("rollout", "prompts_skipped")
               for g in r.get("rejected_ids", []) + r.get("dropped_ids", []) + r.get("group_ids", [])}
    done = set(range(state.trained_below)) | set(state.trained_above)
    assert set(trained) <= done and done <= set(trained) | settled, sorted(done - set(trained) - settled)
    # Counters add up: every group the rollouts report is either in the spill or was dropped as stale.
    from common.spill import recover

    spilled = recover(run_dir / "trajectories", "raise", keep_consumed=True)
    assert spilled.corrupt == 0
    produced = sum(r["groups"] for r in records if r.get("event") == "rollout")
    assert produced <= spilled.admitted
    for rb in spilled.groups:  # every spilled group is whole: G samples, one group id
        assert rb.num_rows == cfg.rollout.group_size


def test_a_worker_dead_for_good_is_replaced(tmp_path):
    """With its restarts used up (max_restarts 0) a killed rollout worker is dropped and a new one starts."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        cfg = load_config("tiny_countdown", SMALL + [
            f"run.root={tmp_path}", "run.name=faults", "run.total_steps=6", "rollout.num_workers=1",
            "rollout.max_restarts=0", "queue.max_staleness=1"])
        done: list = []
        assert train_beside(cfg, _inject, tmp_path, [(1, "RolloutWorker")], done) == 0
    finally:
        ray.shutdown()
    assert done == [(1, "RolloutWorker")]
    records = read_metrics(next(tmp_path.glob("faults-*")) / "metrics.jsonl")
    assert _steps(next(tmp_path.glob("faults-*")))[-1] == 6
    workers = {r["worker"] for r in records if r.get("event") == "rollout" and r["groups"]}
    assert workers == {"rollout-0", "rollout-1"}  # the replacement delivered the rest


def test_driver_killed_then_resumed_continues_where_the_checkpoint_left(tmp_path):
    args = [sys.executable, "-m", "driver", "train", "--set", f"run.root={tmp_path}", "--set", "run.name=resume",
            "--set", "run.total_steps=6", "--set", "learner.checkpoint_every=2"] + \
           [a for s in SMALL for a in ("--set", s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            runs = list(tmp_path.glob("resume-*"))
            if runs and (_steps(runs[0]) and max(_steps(runs[0])) >= 3) and list((runs[0] / "checkpoints").glob("step_*")):
                break
            assert first.poll() is None, "the first driver ended before it could be killed"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run_dir = next(tmp_path.glob("resume-*"))
    before = _steps(run_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    resumed_from = int(checkpoints[-1].name.split("_")[1])
    second = subprocess.run([sys.executable, "-m", "driver", "train", "--resume", str(run_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"resumed: step {resumed_from}, version {resumed_from}" in second.stderr
    after = _steps(run_dir)[len(before):]
    assert after == list(range(resumed_from + 1, 7))  # same step counter, nothing skipped or repeated
    # Each prompt is trained exactly once in the weights' history: the first driver's steps up to the
    # checkpoint, then the second driver's (the first driver's later steps were rolled back with the weights).
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    lineage = [r for r in steps[:len(before)] if r["step"] <= resumed_from] + steps[len(before):]
    trained = [p for r in lineage for p in r["prompts"]]
    assert len(lineage) == 6 and len(trained) == 6 * 2  # SMALL: 2 groups (prompts) per step
    assert len(trained) == len(set(trained)), "a prompt was trained twice across the kill and the resume"
    from common.spill import recover

    ids = [rb.column("group_id")[0].as_py() for d in (run_dir / "trajectories", run_dir / "trajectories" / "driver-0")
           for rb in recover(d, "raise", keep_consumed=True).groups]
    assert len(ids) == len(set(ids))  # no group id reused across the two drivers


def test_repeated_nan_steps_stop_the_run_with_a_checkpoint(tmp_path):
    import ray

    from common.model import load_pretrained, save_pretrained
    from common.tokenizers import load_tokenizer
    from driver.train import train

    base = REPO / "checkpoints" / "tiny-countdown-base"
    model = load_pretrained(base)
    with torch.no_grad():
        model.transformer.blocks[0].ff_out.weight[0, 0] = float("nan")  # corrupt weights poison every step
    save_pretrained(model, tmp_path / "poisoned")
    load_tokenizer(base).save(tmp_path / "poisoned")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        cfg = load_config("tiny_countdown", SMALL + [
            f"run.root={tmp_path}", "run.name=nan", "run.total_steps=10", f"model.path={tmp_path / 'poisoned'}",
            "learner.max_bad_steps=2"])
        assert train(cfg) == 1
    finally:
        ray.shutdown()
    run_dir = next(tmp_path.glob("nan-*"))
    skipped = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "skipped_step"]
    assert len(skipped) == 2
    assert list((run_dir / "checkpoints").glob("step_*")), "a usable checkpoint is left behind"
