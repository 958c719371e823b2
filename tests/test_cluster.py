"""A real multi-node Ray cluster on this machine: a head, a `learner` node and a `rollout` node, each its
own raylet started with `ray start`, the run driven through RAY_ADDRESS as on a cluster.

What one machine's other tests cannot show: the replay queue (and its spill) sits on the driver's node, the
learner and rollout actors on the nodes that carry their resources, and a run root the learner node does
not see fails at start in one line. The learner node gets its own view of the disk from a private mount
namespace (`unshare --mount`, a tmpfs over the run root): as on two machines without a shared filesystem.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.metrics import read_metrics
from tests.local_cluster import LocalCluster, cluster_env

pytestmark = [pytest.mark.ray, pytest.mark.skipif(shutil.which("ray") is None, reason="needs the ray CLI")]

RUN = ["--set", "run.total_steps=2", "--set", "task.eval_size=4", "--set", "run.eval_sampling_steps=[]",
       "--set", "learner.groups_per_step=1", "--set", "rollout.prompts_per_call=1",
       "--set", "learner.resources={learner: 1}", "--set", "rollout.resources={rollout: 1}",
       "--set", "rollout.num_cpus_per_worker=1", "--set", "learner.num_cpus_per_rank=1"]


def _train(address: str, root: Path) -> subprocess.CompletedProcess:
    env = {**cluster_env(), "RAY_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", "driver", "train", "--set", f"run.root={root}", *RUN],
                          capture_output=True, text=True, env=env, timeout=600)


def test_queue_on_the_driver_node_learner_and_rollouts_on_theirs(tmp_path):
    root = tmp_path / "runs"
    cluster = LocalCluster(tmp_path)
    try:
        proc = _train(cluster.address, root)
        nodes = cluster.nodes_by_resource()
    finally:
        cluster.stop()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = next(root.glob("tiny-countdown-*"))
    placement = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "placement")
    assert placement["queue"] == placement["driver"], "the replay queue left the driver's node"
    assert placement["learner"] == [nodes["learner"]]
    assert set(placement["rollout"].values()) == {nodes["rollout"]}
    assert len({placement["driver"], nodes["learner"], nodes["rollout"]}) == 3
    assert list((run_dir / "trajectories").glob("groups-*.arrows")), "the queue's spill is not in the run directory"
    assert (run_dir / "finished.json").is_file()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_a_run_root_the_learner_node_cannot_see_fails_at_start(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    cluster = LocalCluster(tmp_path, private_root=root)
    try:
        proc = _train(cluster.address, root)
    finally:
        cluster.stop()
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "unmask: " in line]
    assert len(errors) == 1 and f"run.root {root} is not shared with the learner node" in errors[0], proc.stderr[-3000:]
    assert not list(root.glob("*/checkpoints/step_*")), "a learner that cannot see the run root wrote no checkpoint"
