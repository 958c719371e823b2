"""A real multi-node Ray cluster on this machine: a head, a `learner` node and a `rollout` node, each its
own raylet started with `ray start`, the run driven through RAY_ADDRESS as on a cluster.

What one machine's other tests cannot show: the replay queue (and its spill) sits on the driver's node, the
learner and rollout actors on the nodes that carry their resources, and a run root the learner node does
not see fails at start in one line. The learner node gets its own view of the disk from a private mount
namespace (`unshare --mount`, a tmpfs over the run root): as on two machines without a shared filesystem.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from common.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.skipif(shutil.which("ray") is None, reason="needs the ray CLI")]

RUN = ["--set", "run.total_steps=2", "--set", "task.eval_size=4", "--set", "run.eval_sampling_steps=[]",
       "--set", "learner.groups_per_step=1", "--set", "rollout.prompts_per_call=1",
       "--set", "learner.resources={learner: 1}", "--set", "rollout.resources={rollout: 1}",
       "--set", "rollout.num_cpus_per_worker=1", "--set", "learner.num_cpus_per_rank=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TOKEN = uuid.uuid4().hex
STARTUP_TIMEOUT_S = 600  # generous: a raylet on a loaded 2-core box took over 120 s; a crash fails at once


def _env() -> dict:
    """Token auth as on a real cluster, with a token of our own (never ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class _Cluster:
    """Three raylets on 127.0.0.1; ``private_root`` hides the run root from the learner node."""

    def __init__(self, tmp: Path, private_root: Path | None = None):
        self.port, self.procs, self.logs, self.tmp = _free_port(), [], [], tmp
        self.address = f"127.0.0.1:{self.port}"
        temp_dir = tempfile.mkdtemp(prefix="rcl", dir="/tmp")  # short: Ray's socket paths have a length limit
        # One raylet at a time, each waited for by its own log line: two starting at once, or a probe driver
        # (a new process and a Ray connection per try), took longer than any fixed wait on a loaded 2-core box.
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"])
        self._start("learner", ["--num-cpus=1", '--resources={"learner": 1}'], private_root)
        self._start("rollout", ["--num-cpus=1", '--resources={"rollout": 1}'])
        self._wait_nodes(3)  # once, to confirm they all registered

    def _start(self, name: str, args: list[str], private_root: Path | None = None) -> None:
        # Ray's fixed default agent ports collide between raylets on one machine.
        cmd = ["ray", "start", "--block", *args,
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        if name != "head":
            cmd.append(f"--address={self.address}")
        if private_root is not None:  # this node's own /…/runs: an empty tmpfs nobody else sees
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs none {private_root} && exec {subprocess.list2cmdline(cmd)}"]
        self.logs.append(self.tmp / f"{name}.log")
        log = open(self.logs[-1], "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env={**_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True))
        self._wait_started()

    def _wait_started(self) -> None:
        """Until the last `ray start` says its node runs: it prints that once the raylet is up. A crash fails
        at once; the wait itself is long (what it waits for is the machine, not a fixed 2 minutes)."""
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if "Ray runtime started" in self.logs[-1].read_text():
                return
            assert self.procs[-1].poll() is None, self.logs[-1].read_text()[-2000:]
            time.sleep(0.5)
        raise AssertionError(f"{self.logs[-1].name}: not started in {STARTUP_TIMEOUT_S} s\n"
                             + self.logs[-1].read_text()[-2000:])

    def _wait_nodes(self, n: int) -> list[dict]:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            nodes = self.nodes()
            if len(nodes) >= n:
                return nodes
            dead = [log for p, log in zip(self.procs, self.logs) if p.poll() is not None]
            assert not dead, dead[0].read_text()[-2000:]
            time.sleep(1)
        raise AssertionError(f"{n} Ray nodes did not register in {STARTUP_TIMEOUT_S} s")

    def nodes(self) -> list[dict]:
        """The alive nodes' ids and resources, asked from a separate driver process ([] while it cannot tell)."""
        script = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); print(json.dumps("
                  "[{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                                 timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a loaded machine: the caller's deadline decides
            return []
        lines = out.stdout.strip().splitlines()
        return json.loads(lines[-1]) if out.returncode == 0 and lines else []

    def nodes_by_resource(self) -> dict[str, str]:
        return {r: n["id"] for n in self._wait_nodes(3) for r in ("learner", "rollout") if r in n["resources"]}

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def _train(address: str, root: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "RAY_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", "driver", "train", "--set", f"run.root={root}", *RUN],
                          capture_output=True, text=True, env=env, timeout=600)


def test_queue_on_the_driver_node_learner_and_rollouts_on_theirs(tmp_path):
    root = tmp_path / "runs"
    cluster = _Cluster(tmp_path)
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
    cluster = _Cluster(tmp_path, private_root=root)
    try:
        proc = _train(cluster.address, root)
    finally:
        cluster.stop()
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "unmask: " in line]
    assert len(errors) == 1 and f"run.root {root} is not shared with the learner node" in errors[0], proc.stderr[-3000:]
    assert not list(root.glob("*/checkpoints/step_*")), "a learner that cannot see the run root wrote no checkpoint"
