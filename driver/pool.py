"""The rollout pool: N rollout actors, resized while the run goes on, none of them ever waited on."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("unmask")


def cluster_capacity(per_worker: dict[str, float], totals: dict[str, float]) -> int:
    """How many workers, each needing ``per_worker`` custom resources, the live nodes' ``totals`` hold."""
    needs = {k: v for k, v in per_worker.items() if v > 0}
    if not needs:
        raise ValueError("cluster capacity needs at least one positive per-worker resource")
    return min(int(totals.get(k, 0.0) // v) for k, v in needs.items())


@dataclass
class Call:
    """One dispatched rollout: which worker, which prompts, how many queue slots it reserved."""

    worker_id: str
    call_id: str  # "<driver incarnation>.<call counter>": prefixes the ids of the groups it puts
    items: list
    reserved: int


@dataclass
class RolloutPool:
    """Owns the rollout actors; ``make_worker(worker_id)`` creates one (with its own resources)."""

    make_worker: Callable[[str], Any]
    workers: dict[str, Any] = field(default_factory=dict)
    busy: dict[Any, Call] = field(default_factory=dict)  # ObjectRef -> Call
    retiring: set[str] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count())

    def resize(self, n: int) -> list[str]:
        """Add or retire workers to reach ``n``; returns the ids of new workers (they need weights)."""
        import ray

        active = self.active()
        added = []
        while len(active) < n:
            worker_id = f"rollout-{next(self._ids)}"
            self.workers[worker_id] = self.make_worker(worker_id)
            active.append(worker_id)
            added.append(worker_id)
        for worker_id in active[n:]:
            self.retiring.add(worker_id)  # finishes its current rollout, then leaves
        for worker_id in list(self.retiring):
            if not any(c.worker_id == worker_id for c in self.busy.values()):
                ray.kill(self.workers.pop(worker_id))
                self.retiring.discard(worker_id)
                log.info("rollout worker %s left the pool", worker_id)
        return added

    def drop(self, worker_id: str) -> None:
        """Forget a worker for good (Ray gave up restarting it); the next ``resize`` replaces it."""
        import ray

        actor = self.workers.pop(worker_id, None)
        self.retiring.discard(worker_id)
        if actor is not None:
            ray.kill(actor)
        log.warning("rollout worker %s is dead for good; a new one takes its place", worker_id)

    @property
    def size(self) -> int:
        return len(self.workers) - len(self.retiring)

    def active(self) -> list[str]:
        """Worker ids that are not retiring, in the order they joined."""
        return [w for w in self.workers if w not in self.retiring]

    def idle(self) -> list[str]:
        running = {c.worker_id for c in self.busy.values()}
        return [w for w in self.active() if w not in running]

    def dispatch(self, worker_id: str, items: list, call_id: str, reserved: int):
        ref = self.workers[worker_id].rollout.remote(items, call_id)
        self.busy[ref] = Call(worker_id, call_id, items, reserved)
        return ref

    def broadcast(self, update) -> list:
        """Queue a weight swap (a ``WeightUpdate``) on every worker; it runs after the worker's current rollout."""
        return [self.workers[wid].set_weights.remote(update) for wid in self.active()]

    def shutdown(self) -> None:
        import ray

        for w in self.workers.values():
            ray.kill(w)
        self.workers.clear()
        self.busy.clear()
