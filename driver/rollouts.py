"""The rollout side of the driver's loop: prompts go to idle workers as far as the replay queue's staleness
budget admits, finished calls are taken, and a failed call's reservations go back to the queue with its
prompts that produced no group handed out again (docs/RELIABILITY.md, rollout actor faults)."""
from __future__ import annotations

import logging

from driver.components import CONTROL_TIMEOUT_S

log = logging.getLogger("unmask")


class Rollouts:
    """Dispatches, collects and releases rollout calls over ``pool``; the ledger learns which prompts are done."""

    def __init__(self, rollout, pool, queue, ledger, weights, metrics):
        self.rollout, self.pool, self.queue, self.ledger = rollout, pool, queue, ledger
        self.weights, self.metrics = weights, metrics
        self.failed_calls: dict[str, int] = {}  # consecutive failed rollout calls per worker

    def dispatch(self) -> None:
        """Give idle workers prompts, as far as the queue's staleness budget admits."""
        import ray

        self.queue.set_version.remote(self.ledger.state.version)  # idempotent; re-arms a restarted queue
        for wid in self.pool.idle():
            if wid in self.weights.awaiting:
                continue
            n = self.rollout.prompts_per_call
            try:
                while n > 0 and not ray.get(self.queue.reserve.remote(n), timeout=CONTROL_TIMEOUT_S):
                    n //= 2
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("replay queue restarting; rollouts wait for it")
                return
            if n == 0:
                return
            self.pool.dispatch(wid, *self.ledger.take(n), n)

    def collect(self, ref, in_batch: set[int]) -> None:
        """Take a finished call: its rollout event, the prompts it settled untrained; a failed one is released
        (``in_batch``: the positions of the learner's pending batch, not handed out again)."""
        import ray

        call = self.pool.busy.pop(ref)
        version = self.ledger.state.version
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            log.warning("rollout call %s on %s failed (%s: %s); its unfilled slots are released", call.call_id,
                        call.worker_id, type(cause).__name__, str(cause).strip().splitlines()[-1][:300])
            self.metrics.log({"event": "rollout_failed", "worker": call.worker_id, "call_id": call.call_id})
            self._release(call, in_batch)
            failures = self.failed_calls[call.worker_id] = self.failed_calls.get(call.worker_id, 0) + 1
            if failures > self.rollout.max_restarts and call.worker_id in self.pool.workers:
                self.pool.drop(call.worker_id)  # restarts used up: it would fail every call from now on
            elif call.worker_id in self.pool.workers:
                self.weights.bring_up(call.worker_id, version)  # Ray restarted it with base weights
            return
        self.metrics.log({"event": "rollout", **result})
        self.failed_calls.pop(call.worker_id, None)
        self.ledger.settle(result.get("rejected_ids", []) + result.get("dropped_ids", []))
        if self.pool.restarted(call.worker_id, result.get("pid")):  # died between calls: base weights now
            log.warning("rollout worker %s was restarted by Ray; it gets the current weights", call.worker_id)
            self.weights.bring_up(call.worker_id, version)

    def _release(self, call, in_batch: set[int]) -> None:
        """A failed call: its unfilled reservations go back to the queue, and its prompts that produced no group
        are handed out again (its refused or stale-dropped ones are done)."""
        import ray

        ids = [f"{call.call_id}:{item.id}" for item in call.items]
        try:
            released = ray.get(self.queue.release_call.remote(f"{call.call_id}:", ids), timeout=CONTROL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # A restarted queue holds no reservations; which of this call's groups it recovered is not known
            # here, so its prompts count as done (each trained at most once) rather than risk a second training.
            log.warning("replay queue restarting; the %d prompt(s) of failed call %s are not dispatched again",
                        len(ids), call.call_id)
            self.metrics.log({"event": "prompts_skipped", "group_ids": ids})
            self.ledger.settle(ids)
            return
        self.ledger.settle(released["untrained"])
        self.ledger.give_back(call.items, ids, released["unsettled"], in_batch)

    def drain(self, in_batch: set[int], timeout: float = CONTROL_TIMEOUT_S) -> None:
        """Let the calls in flight finish (within ``timeout``); release the slots of the rest."""
        import ray

        refs = list(self.pool.busy)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        for ref in refs:
            if ref in done:
                self.collect(ref, in_batch)
            else:
                call = self.pool.busy.pop(ref)  # the run ends: its prompts are not dispatched again
                self.queue.release_call.remote(f"{call.call_id}:", [f"{call.call_id}:{item.id}" for item in call.items])
