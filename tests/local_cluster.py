"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own raylet started with
`ray start`, driven through RAY_ADDRESS as on a cluster (tests/test_cluster.py, benchmarks/soak.py).

A node's raylet is the process group of its `ray start --block`: stopping a node kills that group (the raylet,
its workers and their actors), as when a machine leaves; starting it again adds a fresh node with the same
resources, as when the autoscaler brings one back.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

STARTUP_TIMEOUT_S = 600  # generous: a raylet on a loaded 2-core box took over 120 s; a crash fails at once
_TOKEN = uuid.uuid4().hex

# The default layout: the driver's node (head), a learner node and a rollout node, one CPU each.
DEFAULT_NODES = {
    "head": ["--num-cpus=1"],
    "learner": ["--num-cpus=1", '--resources={"learner": 1}'],
    "rollout": ["--num-cpus=1", '--resources={"rollout": 1}'],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict:
    """Token auth as on a real cluster, with a token of our own (never ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class LocalCluster:
    """Raylets on 127.0.0.1, one per entry of ``nodes`` (name -> `ray start` args; the first is the head);
    ``private_root`` hides that folder from the learner node (its own tmpfs there)."""

    def __init__(self, tmp: Path, nodes: dict[str, list[str]] | None = None, private_root: Path | None = None):
        self.port, self.tmp, self.private_root = _free_port(), tmp, private_root
        self.address = f"127.0.0.1:{self.port}"
        self.specs = dict(nodes or DEFAULT_NODES)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.temp_dir = tempfile.mkdtemp(prefix="rcl", dir="/tmp")  # short: Ray's socket paths have a length limit
        # One raylet at a time, each waited for by its own log line: two starting at once, or a probe driver
        # (a new process and a Ray connection per try), took longer than any fixed wait on a loaded 2-core box.
        try:
            for name in self.specs:
                self.start_node(name)
            self.wait_nodes(len(self.specs))  # once, to confirm they all registered
        except BaseException:  # a node that fails to start must not leave the started ones running
            self.stop()
            raise

    def start_node(self, name: str) -> None:
        head = name == next(iter(self.specs))
        # Ray's fixed default agent ports collide between raylets on one machine.
        cmd = ["ray", "start", "--block", *self.specs[name],
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={self.temp_dir}"]
        else:
            cmd.append(f"--address={self.address}")
        if name == "learner" and self.private_root is not None:  # this node's own view: an empty tmpfs
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs none {self.private_root} && exec {subprocess.list2cmdline(cmd)}"]
        self.logs[name] = self.tmp / f"{name}.log"
        started_before = self._started(name)  # a restarted node appends to its log
        log = open(self.logs[name], "a")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**cluster_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self._wait_started(name, started_before)

    def stop_node(self, name: str) -> None:
        """The node leaves: its raylet, workers and actors are killed."""
        from tests.run_helpers import descendants

        proc = self.procs[name]
        for pid, _ in descendants([proc.pid]):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

    def _started(self, name: str) -> int:
        log = self.logs[name]
        return log.read_text().count("Ray runtime started") if log.is_file() else 0

    def _wait_started(self, name: str, before: int) -> None:
        """Until `ray start` says its node runs (it prints that once the raylet is up). A crash fails at
        once; the wait itself is long (what it waits for is the machine, not a fixed 2 minutes)."""
        deadline, log, proc = time.time() + STARTUP_TIMEOUT_S, self.logs[name], self.procs[name]
        while time.time() < deadline:
            if self._started(name) > before:
                return
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        raise AssertionError(f"{log.name}: not started in {STARTUP_TIMEOUT_S} s\n" + log.read_text()[-2000:])

    def wait_nodes(self, n: int) -> list[dict]:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            nodes = self.nodes()
            if len(nodes) >= n:
                return nodes
            dead = [self.logs[k] for k, p in self.procs.items() if p.poll() is not None]
            assert not dead, dead[0].read_text()[-2000:]
            time.sleep(1)
        raise AssertionError(f"{n} Ray nodes did not register in {STARTUP_TIMEOUT_S} s")

    def nodes(self) -> list[dict]:
        """The alive nodes' ids and resources, asked from a separate driver process ([] while it cannot tell)."""
        script = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); print(json.dumps("
                  "[{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cluster_env(),
                                 timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a loaded machine: the caller's deadline decides
            return []
        lines = out.stdout.strip().splitlines()
        return json.loads(lines[-1]) if out.returncode == 0 and lines else []

    def nodes_by_resource(self) -> dict[str, str]:
        return {r: n["id"] for n in self.wait_nodes(len(self.specs)) for r in ("learner", "rollout")
                if r in n["resources"]}

    def raylet_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def stop(self) -> None:
        from tests.run_helpers import descendants

        below = descendants(self.raylet_pids())
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        for pid, _ in below:  # workers in sessions of their own outlive their raylet's group
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
