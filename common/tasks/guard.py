"""Reward timeouts that hold in any thread: the reward runs in a child process that is killed when late.

Why a process: math-verify's own timeout is ``signal.alarm``, which works only on the main thread, and a
Python thread cannot be interrupted at all (sympy's big-integer work holds the GIL inside C). A rollout
actor with concurrency groups calls rewards from worker threads, so there the old MATH reward ran with no
timeout. Here the reward runs in a long-lived child (``python -m common.tasks.reward_server``) fed one request at
a time over pipes as length-prefixed JSON (no pickle: nothing the child sends back is executed). When the
answer is late the child is killed (SIGKILL), the completion scores zero with component ``timed_out`` = 1 (also when the child dies on it),
and a fresh child starts importing at once so the next call finds it ready. Start-up (imports) is never
counted against a reward's timeout.

One child per process, one request at a time (a lock): rewards are milliseconds, rollouts seconds.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config.task import TaskConfig

log = logging.getLogger("unmask")

STARTUP_TIMEOUT_S = 300.0  # imports on a loaded machine (sympy + math-verify take seconds)
HEADER = 8


class RewardProcessError(RuntimeError):
    """The reward child failed on its own (a bug in a reward, or it died), not by timing out."""


def frame(payload: dict) -> bytes:
    """One length-prefixed JSON message (the pipes' only format, both ways)."""
    data = json.dumps(payload).encode()
    return len(data).to_bytes(HEADER, "big") + data


class _Child:
    """One child process and the framing on its pipes."""

    def __init__(self, preload: tuple[str, ...]):
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the `common` package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen([sys.executable, "-m", "common.tasks.reward_server", *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.ready = False

    def send(self, payload: dict) -> None:
        self.proc.stdin.write(frame(payload))
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict | None:
        """The next frame, or None when ``deadline`` (time.monotonic) passes first."""
        fd = self.proc.stdout.fileno()
        buf = b""
        need = HEADER
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                raise RewardProcessError(f"reward process exited with code {self.proc.wait()}")
            buf += chunk
            if len(buf) == HEADER and need == HEADER:
                need = HEADER + int.from_bytes(buf, "big")
        return json.loads(buf[HEADER:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class RewardGuard:
    """Runs ``task.compute_reward`` in a child process with a per-call timeout."""

    def __init__(self):
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._pid = os.getpid()
        self._preload: tuple[str, ...] = ()

    def _ensure_child(self, preload: tuple[str, ...]) -> _Child:
        if self._pid != os.getpid():  # forked: the child belongs to the parent process
            self._child, self._pid = None, os.getpid()
        if self._child is not None and (self._child.proc.poll() is not None or not set(preload) <= set(self._preload)):
            self._child.kill()
            self._child = None
        if self._child is None:
            self._preload = tuple(sorted(set(self._preload) | set(preload)))
            self._child = _Child(self._preload)
        child = self._child
        if not child.ready:
            if child.receive(time.monotonic() + STARTUP_TIMEOUT_S) is None:
                child.kill()
                self._child = None
                raise RewardProcessError(f"reward process did not start within {STARTUP_TIMEOUT_S:.0f}s")
            child.ready = True
        return child

    def reward(self, cfg: "TaskConfig", completion: str, item: dict, timeout_s: float,
               preload: tuple[str, ...] = ()) -> dict | None:
        """The reward computed in the child (``total``, ``correct``, ``components``; ``item`` as a dict), or None
        when it took longer than ``timeout_s`` or the child died on this completion (a C-level crash or the OOM
        killer in the parser: the text's doing, like a timeout)."""
        with self._lock:
            child = self._ensure_child(preload)
            try:
                child.send({"cfg": cfg.model_dump(mode="json"), "completion": completion, "item": item})
                out = child.receive(time.monotonic() + timeout_s)
            except (BrokenPipeError, RewardProcessError) as e:
                log.warning("reward process died on a completion (%s); scoring it as timed out", e)
                out = None
            if out is None:
                child.kill()
                self._child = _Child(self._preload)  # importing while the caller moves on
                return None
            if "error" in out:
                raise RewardProcessError(f"reward raised in the reward process:\n{out['error']}")
            return out

    def close(self) -> None:
        """Stop the child; the next call starts a new one with only the imports it asks for."""
        with self._lock:
            if self._child is not None:
                self._child.kill()
                self._child = None
            self._preload = ()


GUARD = RewardGuard()
