"""The rollout pool: N rollout actors, resized while the run goes on, none of them ever waited on."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("unmask")


def cluster_capacity(per_worker: dict[str, float], totals: dict[str, float]) -> int:
    """How many workers, each needing ``per_worker`` custom resources, the live nodes' ``totals`` hold."""
    needs = {k: v for k, v in per_worker.items() if v > 0}
    if not needs:
        raise ValueError("cluster capacity needs at least one positive per-worker resource")
    return min(int(totals.get(k, 0.0) // v) for k, v in needs.items())


class ClusterFollower:
    """The number of rollout workers to run: `unmask scale`'s, and with ``rollout.follow_cluster`` at least what
    the live nodes hold (one GCS query every two seconds at most)."""

    def __init__(self, rollout):
        self.rollout = rollout
        self.capacity, self._checked = 0, float("-inf")

    def desired(self, requested: int) -> int:
        import ray

        if not self.rollout.follow_cluster:
            return requested
        now = time.monotonic()
        if now - self._checked > 2.0:
            self._checked = now
            capacity = cluster_capacity(self.rollout.resources, ray.cluster_resources())
            if capacity != self.capacity:
                log.info("cluster rollout capacity: %d worker(s) (nodes joined or left)", capacity)
                self.capacity = capacity
        return min(max(requested, self.capacity), self.rollout.max_workers or 1 << 30)


@dataclass
class Call:
    """One dispatched rollout: which worker, which prompts, how many queue slots it reserved."""

    worker_id: str
    call_id: str  # "<driver incarnation>.<call counter>": prefixes the ids of the groups it puts
    items: list
    reserved: int


@dataclass
class RolloutPool:
    """Owns the rollout actors; ``make_worker(worker_id)`` creates one (with its own resources).

    A new worker is *pending* until Ray has placed it and its ``ready`` call answered: pending workers get no
    rollouts, weights or evaluation items, so one the cluster cannot place never blocks the run; it joins
    when ``poll`` sees it ready. ``needs`` is what one worker asks Ray for (reported while one waits).
    """

    make_worker: Callable[[str], Any]
    needs: dict[str, float] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    busy: dict[Any, Call] = field(default_factory=dict)  # ObjectRef -> Call
    retiring: set[str] = field(default_factory=set)
    pending: dict[str, tuple[Any, float]] = field(default_factory=dict)  # worker id -> (ready ref, since)
    info: dict[str, dict] = field(default_factory=dict)  # worker id -> its ready() answer (host, node, device)
    _reported: set[str] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count())

    def resize(self, n: int) -> None:
        """Add (pending) or retire workers so that ``n`` are members; retired ones leave once idle."""
        import ray

        members = self.members()
        while len(members) < n:
            worker_id = f"rollout-{next(self._ids)}"
            self.workers[worker_id] = actor = self.make_worker(worker_id)
            self.pending[worker_id] = (actor.ready.remote(), time.monotonic())
            members.append(worker_id)
            log.info("rollout worker %s requested (%s)", worker_id, _fmt(self.needs))
        for worker_id in members[n:]:
            self.retiring.add(worker_id)  # finishes its current rollout, then leaves
        for worker_id in list(self.retiring):
            if not any(c.worker_id == worker_id for c in self.busy.values()):
                ray.kill(self.workers.pop(worker_id))
                self.retiring.discard(worker_id)
                self.pending.pop(worker_id, None)
                log.info("rollout worker %s left the pool", worker_id)

    def poll(self, report_after_s: float = 10.0) -> list[str]:
        """Workers that became ready since the last call (they need weights); reports ones Ray cannot place."""
        import ray

        if not self.pending:
            return []
        refs = {ref: wid for wid, (ref, _) in self.pending.items()}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        joined = []
        for ref in done:
            wid = refs[ref]
            del self.pending[wid]
            try:
                self.info[wid] = ray.get(ref, timeout=0)
                joined.append(wid)
            except ray.exceptions.RayError as e:
                log.warning("rollout worker %s failed to start (%s); a new one takes its place", wid, type(e).__name__)
                self.drop(wid)
        now = time.monotonic()
        for wid, (_, since) in self.pending.items():
            if wid not in self._reported and now - since > report_after_s:
                self._reported.add(wid)
                log.warning("rollout worker %s cannot be placed yet: %s; it joins when they free up (or lower the "
                            "pool with `unmask scale RUN --rollout-workers N`)", wid, self.shortfall())
        return joined

    def shortfall(self) -> str:
        """What one worker needs against what the cluster has free, for a message."""
        import ray

        free = ray.available_resources()
        return f"it needs {_fmt(self.needs)} and the cluster has {_fmt({k: free.get(k, 0.0) for k in self.needs})} free"

    def wait_ready(self, timeout: float) -> list[str]:
        """Block up to ``timeout`` s for the pending workers (at start); returns those that joined."""
        import ray

        refs = [ref for ref, _ in self.pending.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return self.poll(report_after_s=0.0)

    def restarted(self, worker_id: str, pid: int | None) -> bool:
        """True (once) when a call came back from another process than the one that answered ``ready``: Ray
        restarted the actor between calls, so it holds base weights."""
        info = self.info.get(worker_id)
        if info is None or pid is None or info.get("pid") == pid:
            return False
        self.info[worker_id] = {**info, "pid": pid}
        return True

    def drop(self, worker_id: str) -> None:
        """Forget a worker for good (Ray gave up restarting it); the next ``resize`` replaces it."""
        import ray

        actor = self.workers.pop(worker_id, None)
        self.retiring.discard(worker_id)
        self.pending.pop(worker_id, None)
        if actor is not None:
            ray.kill(actor)
        log.warning("rollout worker %s is dead for good; a new one takes its place", worker_id)

    @property
    def size(self) -> int:
        """Members placed and running (pending ones not counted)."""
        return len(self.active())

    def members(self) -> list[str]:
        """Worker ids that are not retiring, placed or pending, in the order they joined."""
        return [w for w in self.workers if w not in self.retiring]

    def active(self) -> list[str]:
        """Members that are placed and answered ``ready``: the ones that get rollouts, weights and eval items."""
        return [w for w in self.members() if w not in self.pending]

    def idle(self) -> list[str]:
        running = {c.worker_id for c in self.busy.values()}
        return [w for w in self.active() if w not in running]

    def dispatch(self, worker_id: str, items: list, call_id: str, reserved: int):
        ref = self.workers[worker_id].rollout.remote(items, call_id)
        self.busy[ref] = Call(worker_id, call_id, items, reserved)
        return ref

    def broadcast(self, update, prefetch: bool = False) -> dict:
        """Queue a weight swap (a ``WeightUpdate``) on every worker; it runs after the worker's current rollout.
        With ``prefetch`` each worker first copies the update into its double buffer on its weights thread,
        beside that rollout, so the swap is a device copy. Returns worker id -> the set_weights call's ref."""
        if prefetch:  # never raises; its result is not waited for
            for wid in self.active():
                self.workers[wid].prefetch_weights.options(concurrency_group="weights").remote(update)
        return {wid: self.workers[wid].set_weights.remote(update) for wid in self.active()}

    def shutdown(self) -> None:
        import ray

        for w in self.workers.values():
            ray.kill(w)
        self.workers.clear()
        self.busy.clear()
        self.pending.clear()


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "no resources"
