"""The whole system on a local Ray instance: a short RL run, scaled mid-run, metrics read back."""
import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from common.config import load_config
from common.metrics import read_metrics
from tests.run_helpers import train_beside

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def _scale_during_run(root: Path, seen: list, stop: threading.Event) -> None:
    """After the first step ask for 2 rollout workers; once the new one has delivered and a step has run on
    both, for 1 again; once
    two steps have run on the shrunk pool, `unmask stop`. The run's length follows what happened (on a
    loaded 2-core box the new worker can take many steps to start), not a fixed step count."""
    from driver.cli import main

    while not stop.is_set() and len(seen) < 3:
        runs = list(root.glob("e2e-*/metrics.jsonl"))
        records = read_metrics(runs[0]) if runs else []
        steps = [r for r in records if "loss" in r]
        workers = {r["worker"] for r in records if r.get("event") == "rollout"}
        if not seen and steps:
            main(["scale", str(runs[0].parent), "--rollout-workers", "2"])
            seen.append(("up", 2))
        elif len(seen) == 1 and len(workers) >= 2 and any(r["rollout_workers"] == 2 for r in steps):
            main(["scale", str(runs[0].parent), "--rollout-workers", "1"])
            seen.append(("down", steps[-1]["step"]))
        elif len(seen) == 2 and [r["rollout_workers"] for r in steps if r["step"] > seen[1][1]][-2:] == [1, 1]:
            main(["stop", str(runs[0].parent)])
            seen.append(("stopped", steps[-1]["step"]))
        time.sleep(0.2)


def test_tiny_run_end_to_end_with_scaling_and_metrics(tmp_path):
    import ray

    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=port)
    try:
        cfg = load_config("tiny_countdown", [
            f"run.root={tmp_path}", "run.name=e2e", "run.total_steps=60", "run.eval_sampling_steps=[4]",
            "task.eval_size=16", "learner.groups_per_step=2", "rollout.prompts_per_call=1",
            "rollout.num_workers=1", "learner.checkpoint_every=3", "queue.max_staleness=1",
        ])
        seen: list = []
        assert train_beside(cfg, _scale_during_run, tmp_path, seen) == 0
        last = max(r["step"] for r in read_metrics(next(tmp_path.glob("e2e-*")) / "metrics.jsonl") if "loss" in r)
        # Metrics the driver records reach Ray's Prometheus export (scraped while the driver lives).
        final_version = re.compile(rf"ray_unmask_policy_version\{{[^}}]*\}} {last}(\.0)?\n")
        text, deadline = "", time.time() + 60
        while time.time() < deadline and not final_version.search(text):
            time.sleep(2)
            text = _scrape(port)
    finally:
        ray.shutdown()

    for name in ("ray_unmask_policy_version", "ray_unmask_loss", "ray_unmask_reward"):
        assert name in text, f"{name} missing from the Prometheus export"
    assert final_version.search(text), f"policy version {last} never reached the Prometheus export"

    run_dir = next(tmp_path.glob("e2e-*"))
    for rel in ("config.yaml", "metrics.jsonl", "eval_after.jsonl", "policy/config.json", "policy/README.md",
                "policy/model.safetensors", "plots/reward_accuracy.png", "plots/confusion_zones.png",
                "plots/accuracy_vs_steps.png"):
        assert (run_dir / rel).is_file(), rel
    assert len(list((run_dir / "checkpoints").glob("step_*"))) >= 1
    assert list((run_dir / "trajectories").glob("groups-*.arrows"))
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "version" in r and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, last + 1))
    assert last <= seen[2][1] + 1 < 60, "`unmask stop` ends the run after the step in flight"
    assert all(r["staleness"] <= 1 for r in steps)
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == last
    # The pool followed `unmask scale`: up to 2 workers, then back to 1, and the run still finished.
    assert [kind for kind, _ in seen] == ["up", "down", "stopped"], f"the pool never grew and shrank: {seen}"
    sizes = [r["rollout_workers"] for r in steps]
    assert 2 in sizes and sizes[-1] == 1
    down_at = seen[1][1]
    assert all(r["rollout_workers"] == 1 for r in steps if r["step"] > down_at + 1)  # the retired worker left
    # The exported policy loads with the public loader.
    from common.model import load_pretrained

    assert load_pretrained(run_dir / "policy") is not None
    json.loads((run_dir / "eval_after.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-adapters"])
def test_broadcast_transport_follows_the_pool(tmp_path, lora):
    """weight_transport nccl (its gloo twin on CPU): workers receive beside running rollouts, a worker that
    joins mid-run waits for the current version before it rolls out, and the group follows 1 -> 2 -> 1.
    With LoRA over the checkpoint base only the adapters travel and each worker merges them."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        cfg = load_config("tiny_countdown", [
            f"run.root={tmp_path}", "run.name=e2e", "run.total_steps=60", "run.eval_every=0",
            "run.eval_sampling_steps=[]", "task.eval_size=8", "learner.groups_per_step=2",
            "rollout.prompts_per_call=1", "rollout.num_workers=1", "queue.max_staleness=1",
            "learner.weight_transport=nccl", "learner.sync_bucket_mb=1", "learner.checkpoint_every=0",
        ] + (["learner.lora.enabled=true", "learner.lora.r=4", "learner.lr=1e-3", "queue.max_staleness=0"]
             if lora else []))
        seen: list = []
        assert train_beside(cfg, _scale_during_run, tmp_path, seen) == 0
    finally:
        ray.shutdown()

    run_dir = next(tmp_path.glob("e2e-*"))
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) < 60
    assert all("sync/nccl_seconds" in r for r in steps), "the broadcast transport did not carry the weights"
    full_gbytes = 878_976 * 4 / 1e9  # the tiny model in fp32
    sent = [r["sync/gbytes"] for r in steps]
    if lora:
        assert all(g < full_gbytes / 4 for g in sent), sent
        # On-policy batches: the workers' merged weights are the learner's, so its recomputed log-probs
        # equal the behaviour log-probs (a worker still on the base weights would be off by ~1e-2).
        # Measured: ~1e-7 per token with the merge, 1e-2 to 1e-1 with the workers left on the base weights.
        drift = [r["abs_log_ratio_sum"] / r["scored_tokens"] for r in steps]
        assert max(drift) < 1e-5, drift
    else:
        assert sent == pytest.approx([full_gbytes] * len(sent), rel=0.01)
    assert [kind for kind, _ in seen] == ["up", "down", "stopped"], f"the pool never grew and shrank: {seen}"
    rollouts = [r for r in records if r.get("event") == "rollout" and r["groups"]]
    joined = [r for r in rollouts if r["worker"] == "rollout-1"]
    assert joined and min(r["version"] for r in joined) >= 1, "a worker rolled out before it got the weights"
    # Versions a worker uses never go backwards: every swap happened between its rollouts.
    for worker in {r["worker"] for r in rollouts}:
        versions = [r["version"] for r in rollouts if r["worker"] == worker]
        assert versions == sorted(versions)
    assert all(r["staleness"] <= 1 for r in steps)


def test_pool_follows_nodes_joining_and_leaving(tmp_path):
    """rollout.follow_cluster: a node carrying the rollout resource joins mid-run (as the autoscaler would
    add it) and the pool grows onto it; the node leaves and the pool shrinks back; `unmask stop` ends it."""
    from ray.cluster_utils import Cluster

    from driver.cli import main
    from driver.train import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"rollout": 1}})
    events: list = []
    result: dict = {}
    try:
        cfg = load_config("tiny_countdown", [
            f"run.root={tmp_path}", "run.name=e2e", "run.total_steps=1000", "run.eval_every=0",
            "run.eval_sampling_steps=[]", "task.eval_size=8", "learner.groups_per_step=2",
            "rollout.prompts_per_call=1", "rollout.num_workers=1", "queue.max_staleness=1",
            "rollout.follow_cluster=true", "rollout.resources={rollout: 1}", f"run.ray_address={cluster.address}",
        ])
        # The run goes on a thread: Ray's node management (the "autoscaler" here) needs the main thread.
        runner = threading.Thread(target=lambda: result.update(code=train(cfg)), daemon=True)
        runner.start()
        node, deadline = None, time.time() + 600
        while runner.is_alive() and time.time() < deadline:
            runs = list(tmp_path.glob("e2e-*/metrics.jsonl"))
            records = read_metrics(runs[0]) if runs else []
            steps = [r for r in records if "loss" in r]
            workers = {r["worker"] for r in records if r.get("event") == "rollout" and r["groups"]}
            if node is None and steps:
                node = cluster.add_node(num_cpus=1, resources={"rollout": 1})
                events.append(("added", len(steps)))
            elif len(events) == 1 and "rollout-1" in workers:
                cluster.remove_node(node)
                events.append(("removed", len(steps)))
            elif len(events) == 2 and [r["rollout_workers"] for r in steps[-2:]] == [1, 1]:
                main(["stop", str(runs[0].parent)])  # shrunk and still stepping: enough seen
                events.append(("stopped", steps[-1]["step"]))
            time.sleep(0.2)
        if len(events) < 3 and runs:
            main(["stop", str(runs[0].parent)])
        runner.join(timeout=300)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()

    assert result.get("code") == 0
    assert [kind for kind, _ in events] == ["added", "removed", "stopped"], events
    records = read_metrics(next(tmp_path.glob("e2e-*")) / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert len(steps) <= events[2][1] + 1  # `unmask stop` ends the run after the step in flight
    sizes = [r["rollout_workers"] for r in steps]
    assert 2 in sizes and sizes[-1] == 1, sizes
    assert any("eval_accuracy" in r for r in records if r.get("step") == len(steps))  # the final eval ran


def _ask_for_an_unplaceable_worker(root: Path, seen: list, stop: threading.Event) -> None:
    """After the first step ask for 3 workers on 2 CPUs (the learner holds 1, each worker 0.5): two are
    placed, the third cannot be. Once it has waited 12 s (it is reported after 10) and three steps have gone on
    beside it, `unmask stop` (steps counted too: on a loaded machine 12 s held fewer than three)."""
    from driver.cli import main

    while not stop.is_set() and len(seen) < 2:
        runs = list(root.glob("e2e-*/metrics.jsonl"))
        steps = [r for r in read_metrics(runs[0]) if "loss" in r] if runs else []
        if not seen and steps:
            main(["scale", str(runs[0].parent), "--rollout-workers", "3"])
            seen.append(("up", steps[-1]["step"], time.monotonic()))
        elif (seen and time.monotonic() - seen[0][2] > 12
              and sum(r.get("rollout_workers_waiting") == 1 for r in steps) >= 3):
            main(["stop", str(runs[0].parent)])
            seen.append(("stopped", steps[-1]["step"], time.monotonic()))
        time.sleep(0.2)


def test_a_worker_that_cannot_be_placed_never_blocks_steps_stop_or_shutdown(tmp_path, caplog):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config("tiny_countdown", [
            f"run.root={tmp_path}", "run.name=e2e", "run.total_steps=200", "run.eval_sampling_steps=[]",
            "task.eval_size=8", "learner.groups_per_step=2", "rollout.prompts_per_call=1",
        ])
        seen: list = []
        assert train_beside(cfg, _ask_for_an_unplaceable_worker, tmp_path, seen) == 0
    finally:
        ray.shutdown()
    assert [kind for kind, *_ in seen] == ["up", "stopped"], seen
    run_dir = next(tmp_path.glob("e2e-*"))
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) <= seen[1][1] + 1
    beside = [r for r in steps if r.get("rollout_workers_waiting") == 1]
    assert len(beside) >= 3, "steps did not go on beside the worker that waits for resources"
    assert max(r["rollout_workers"] for r in steps) == 2
    assert "rollout-2 cannot be placed yet: it needs CPU 0.5" in caplog.text
    assert (run_dir / "finished.json").is_file() and (run_dir / "policy" / "config.json").is_file()
