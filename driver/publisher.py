"""The weight publisher: brings the rollout pool to the learner's current weights, whatever the transport.

One ``publish()`` per policy version. object_store / cuda_ipc: rank 0 packs the weights once and every
active worker swaps them in before its next rollout (with ``rollout.prefetch_weights``, copied into a double
buffer beside the running rollout first, so the swap itself is a device copy). nccl: rank 0 broadcasts to a group of the active
workers, received beside running rollouts; the group is rebuilt when the members change, every member is
pinged on its weights thread first, and a broadcast that fails is retried without the members that left.

One policy for every transport when a worker is slow or dead: it is left out (a warning), the others get
the version, and it is brought back with the current version once it answers (``awaiting`` until then:
no rollouts or evaluation items). Workers that joined or restarted hold base weights and are awaiting until
their ``set_weights`` has returned. Every ``set_weights`` is looked at (``poll``, without waiting): one that
failed (say the update's owner, a learner rank, died before the worker read it) leaves its worker awaiting
a catch-up publish, instead of rolling out on weights whose groups the queue would drop as stale forever.
"""
from __future__ import annotations

import logging
import uuid

log = logging.getLogger("unmask")
PING_TIMEOUT_S = 10.0


class WeightPublisher:
    """Owns transport state: the nccl group and its members, the workers awaiting weights, the last update."""

    def __init__(self, learner, pool, transport: str, *, sync_timeout_s: float, base_is_shipped: bool,
                 prefetch: bool = False):
        self.pool, self.transport, self.sync_timeout_s = pool, transport, sync_timeout_s
        self.prefetch = prefetch and transport != "nccl"  # rollout.prefetch_weights (nccl stages on its own)
        self.base_is_shipped = base_is_shipped  # workers load the checkpoint base themselves
        self.awaiting: set[str] = set()
        self.update = None
        self._pending: dict = {}  # worker id -> its last set_weights call not yet looked at
        self.attach(learner)

    def attach(self, learner) -> None:
        """Use ``learner`` (a new or rebuilt group); an nccl group is built at the next publish."""
        self.learner = learner
        self._members: tuple[str, ...] | None = None
        self._group: dict = {}
        if self.transport != "nccl":
            learner.init_weight_sync(self.transport)

    def needed(self, version: int) -> bool:
        """Workers start from the checkpoint base; a random preset base or any trained version is sent."""
        return version > 0 or not self.base_is_shipped

    def publish(self, version: int, block: bool = False):
        """Send ``version``; returns its ``WeightUpdate`` (metrics inside). ``block`` waits for every receiver."""
        import ray

        if self.transport == "nccl":
            self.update = self._broadcast(version)
            return self.update
        self.poll()  # failures of the last version's calls are reported, not dropped unread
        if self.transport == "cuda_ipc":  # one shared buffer: receivers of the last version must be done
            self._settle()
        self.update = self.learner.sync_weights()
        self._pending = self.pool.broadcast(self.update, prefetch=self.prefetch and self.update.lora_scales is None)
        self.awaiting.clear()  # set_weights runs before any later call on each worker (a late one's too)
        if block:
            self._settle()
        return self.update

    def _settle(self) -> None:
        """Wait for the receivers of the last send; one that failed or has not answered in ``sync_timeout_s``
        is left out (awaiting, a warning) instead of ending the run: its set_weights calls run in order, so the
        next send (the next version, or a catch-up publish) brings it back before its next rollout."""
        import ray

        refs = list(self._pending.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.sync_timeout_s) if refs else ([], [])
        for wid, ref in self._pending.items():
            if ref in done:
                try:
                    ray.get(ref)
                    continue
                except ray.exceptions.RayError as e:
                    why = f"failed: {type(e).__name__}"
            else:
                why = f"no answer in {self.sync_timeout_s:.0f} s"
            log.warning("rollout worker %s did not take the weights (%s); left out until it has the current version",
                        wid, why)
            if wid in self.pool.workers:
                self.awaiting.add(wid)
        self._pending = {}

    def bring_up(self, worker_id: str, version: int) -> None:
        """A worker joined or restarted with base weights: it gets the current version before rolling out."""
        if not self.needed(version):
            return
        self.awaiting.add(worker_id)  # until its set_weights returns (``poll``)
        if self.transport == "nccl" or self.update is None:  # joins the group at the next publish
            self._members = None
        else:
            self._pending[worker_id] = self.pool.workers[worker_id].set_weights.remote(self.update)

    def poll(self) -> None:
        """Look at the finished set_weights calls without waiting: a joiner that took the weights may roll out;
        a worker whose call failed is awaiting (a warning) until the next publish reaches it."""
        import ray

        if not self._pending:
            return
        done, _ = ray.wait(list(self._pending.values()), num_returns=len(self._pending), timeout=0)
        for wid, ref in [(w, r) for w, r in self._pending.items() if r in done]:
            del self._pending[wid]
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                log.warning("rollout worker %s did not take the weights (failed: %s); left out until the next publish",
                            wid, type(e).__name__)
                if wid in self.pool.workers:
                    self.awaiting.add(wid)
                continue
            self.awaiting.discard(wid)

    def needs_catch_up(self) -> bool:
        """Whether a worker waits for weights that no call in flight is bringing (a publish would)."""
        self.poll()
        return bool(self.awaiting - set(self._pending))

    def forget(self, worker_ids) -> None:
        self.awaiting &= set(worker_ids)

    def _broadcast(self, version: int):
        """nccl: learner rank 0 to every responsive active worker at once; up to three tries."""
        import ray

        from common.weights import WeightUpdate

        for _ in range(3):
            members = self._responsive(tuple(self.pool.active()))
            if not members:  # nobody to send to; joiners get the next version
                return WeightUpdate(version, "nccl", (), 0)
            if members != self._members:
                info = self.learner.init_weight_sync("nccl", len(members))
                self._group, self._members = {**info, "id": uuid.uuid4().hex}, members
                log.info("weight broadcast group: learner + %d rollout worker(s) (%s)", len(members), info["backend"])
            send = self.learner.sync_weights(block=False)
            receives = [self.pool.workers[w].receive_broadcast.options(concurrency_group="weights").remote(
                {**self._group, "rank": rank}) for rank, w in enumerate(members, start=1)]
            try:
                update = ray.get(send, timeout=self.sync_timeout_s + 30)
                ray.get(receives, timeout=self.sync_timeout_s + 30)
            except ray.exceptions.RayError as e:
                self._members = None
                log.warning("weight broadcast failed (%s); rebuilding the group without members that left",
                            type(e).__name__)
                # Receivers still in the broken group hold their weights thread until its timeout.
                ray.wait(receives, num_returns=len(receives), timeout=self.sync_timeout_s + 5)
                continue
            self.awaiting -= set(members)
            return update
        raise RuntimeError("the nccl weight broadcast failed 3 times in a row (see the warnings above); check the "
                           "rollout workers' logs, or use learner.weight_transport=object_store")

    def _responsive(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """The members that answer on their weights thread within 10 s; the rest wait for a later version."""
        import ray

        pings = {w: self.pool.workers[w].ready.options(concurrency_group="weights").remote() for w in members}
        done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        alive = []
        for w, ref in pings.items():
            try:
                if ref in done:
                    ray.get(ref)
                    alive.append(w)
                    continue
            except ray.exceptions.RayError:
                pass
            log.warning("rollout worker %s does not answer; it gets the weights once it is back", w)
            self.awaiting.add(w)
        return tuple(alive)
