"""The replay queue: whole trajectory groups between rollout actors and the learner, as a plain asyncio class
(the driver runs it as a Ray async actor, ``driver/queue_actor.py``).

Two bounds work together:
- ``capacity_groups`` bounds memory: ``put`` blocks while the queue is full (back-pressure; nothing is
  ever dropped to make room).
- The staleness budget bounds off-policyness (the AReaL / SkyRL rule): a rollout may start only while
  ``(max_staleness + version + 1) * groups_per_step - (accepted + running) >= n`` (``reserve``), where
  ``accepted`` counts every group ever admitted and ``running`` the reserved rollouts in flight. With
  ``max_staleness = 0`` exactly ``groups_per_step`` groups are produced per policy version: synchronous
  on-policy RL. A group that still arrives (or waits) beyond the budget is dropped and counted.

Each group is one RecordBatch (``common.schema``); ``get(n)`` returns n whole groups as one Table, FIFO.
Once ``put`` returns the queue owns its own copy of the group, so a producer that dies loses nothing.
With a ``spill_dir`` every admitted group is also written to disk (``common.spill``), and a queue started
on that directory resumes with exactly the admitted-but-unconsumed groups.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

import pyarrow as pa

from common.config.queue import QueueConfig
from common.schema import SCHEMA, validate_group
from common.spill import SpillWriter, recover

log = logging.getLogger(__name__)
_WAIT_BOUNDARIES_S = [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]


class _Metrics:
    """Ray dashboard metrics with a ``queue`` tag; absent (and silent) where Ray metrics are unavailable."""

    def __init__(self, name: str):
        from ray.util import metrics

        tags = {"queue": name}
        self.depth = metrics.Gauge("unmask_queue_depth", "Groups waiting in the replay queue.", tag_keys=("queue",))
        self.admitted = metrics.Counter("unmask_queue_admitted", "Groups admitted.", tag_keys=("queue",))
        self.dropped_stale = metrics.Counter(
            "unmask_queue_dropped_stale", "Groups dropped as too stale.", tag_keys=("queue",)
        )
        self.producer_wait = metrics.Histogram(
            "unmask_queue_producer_wait_s", "Seconds a put blocked on a full queue.", _WAIT_BOUNDARIES_S, ("queue",)
        )
        self.consumer_wait = metrics.Histogram(
            "unmask_queue_consumer_wait_s", "Seconds a get waited for groups.", _WAIT_BOUNDARIES_S, ("queue",)
        )
        for metric in (self.depth, self.admitted, self.dropped_stale, self.producer_wait, self.consumer_wait):
            metric.set_default_tags(tags)


def _build_metrics(name: str) -> _Metrics | None:
    try:
        return _Metrics(name)
    except Exception as err:  # metrics are telemetry: a missing metrics agent must not stop training
        log.warning("replay queue metrics disabled: %s", err)
        return None


class ReplayQueueCore:
    """The queue's logic as a plain asyncio class (``driver.queue_actor.ReplayQueue`` is it as a Ray actor)."""

    def __init__(self, cfg: QueueConfig, groups_per_step: int, spill_dir: str | None = None, name: str = "replay"):
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
        self.cfg, self.groups_per_step = cfg, groups_per_step
        self._groups: collections.deque[tuple[str, int, pa.RecordBatch]] = collections.deque()
        self._seen: set[str] = set()  # every admitted id: a retried put must not admit a group twice
        self._dropped: set[str] = set()  # ids dropped as stale at put time (their reservation is settled)
        self._rejected: set[str] = set()  # ids whose prompt the producer refused (their reservation is settled)
        self._released_calls: set[str] = set()  # call prefixes release_call settled: later puts settle nothing
        self._cond = asyncio.Condition()
        self._version = 0
        self._admit_offset = 0  # re-bases admission after a version rollback
        self._closed = False
        self._n = dict.fromkeys(
            ("admitted", "consumed", "dropped_stale", "running", "duplicates", "recovered", "spill_corrupt",
             "late_after_release"), 0
        )
        self._wait_s = {"producer": 0.0, "consumer": 0.0}
        self._spill = None
        if spill_dir is not None:
            self._recover_and_open(Path(spill_dir))
        self._metrics = _build_metrics(name)
        self._report_depth()

    # --- spill

    def _recover_and_open(self, spill_dir: Path) -> None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        rec = recover(spill_dir, self.cfg.on_corrupt_spill)
        for rb in rec.groups:
            self._groups.append((rb.column("group_id")[0].as_py(), rb.column("policy_version")[0].as_py(), rb))
        self._n.update(admitted=rec.admitted, consumed=rec.consumed, recovered=len(rec.groups),
                       spill_corrupt=rec.corrupt)
        self._seen.update(g for g, _, _ in self._groups)
        if rec.admitted or rec.corrupt:
            log.info("replay queue recovered %d unconsumed of %d admitted groups from %s (%d corrupt skipped)",
                     len(rec.groups), rec.admitted, spill_dir, rec.corrupt)
        self._spill = SpillWriter(spill_dir, rec.next_file_index, self.cfg.spill_file_bytes)

    # --- admission control

    def _capacity(self) -> int:
        budget = (self.cfg.max_staleness + self._version + 1) * self.groups_per_step
        return budget - (self._n["admitted"] - self._admit_offset + self._n["running"])

    def reserve(self, n: int = 1) -> bool:
        """True (and n rollouts counted as running) if n groups may start now under the staleness budget."""
        if n < 1:
            raise ValueError(f"reserve(n) needs n >= 1, got {n}")
        if self._closed or self._capacity() < n:
            return False
        self._n["running"] += n
        return True

    def release(self, n: int = 1) -> None:
        """Give back n reservations whose rollouts failed before ``put``."""
        if n < 1 or n > self._n["running"]:
            raise ValueError(f"release({n}) but only {self._n['running']} reservations are running")
        self._n["running"] -= n

    def reject(self, group_ids: list[str]) -> int:
        """The producer will never put these groups (their prompts were refused): settle each one's
        reservation once, however often it is reported. Returns how many were settled now."""
        n = 0
        for group_id in group_ids:
            if self._settles(group_id) and group_id not in self._rejected:
                self._rejected.add(group_id)
                n += 1
        self._n["running"] = max(0, self._n["running"] - n)
        return n

    def release_call(self, group_id_prefix: str, group_ids: list[str]) -> dict[str, list[str]]:
        """A rollout call that reserved one slot per id of ``group_ids`` failed: give back the slots its groups
        never settled. Returns those ids (``unsettled``: their prompts may be dispatched again) and the ids
        settled without a group to train (``untrained``: rejected, or dropped as stale).

        The ids start with ``group_id_prefix`` (``<call tag>:``); each put (admitted or dropped stale) and each
        rejected id already settled one reservation. The call is void from here on: a put of it that arrives
        later is not admitted and a rejection settles nothing, so each reservation is counted once.
        """
        if group_id_prefix in self._released_calls:
            return {"unsettled": [], "untrained": []}
        self._released_calls.add(group_id_prefix)
        unsettled = [g for g in group_ids if g not in self._seen | self._dropped | self._rejected]
        self._n["running"] -= min(len(unsettled), self._n["running"])
        return {"unsettled": unsettled, "untrained": [g for g in group_ids if g in self._dropped | self._rejected]}

    def _settles(self, group_id: str) -> bool:
        """Whether this group's arrival still settles a reservation (its call was not released already)."""
        tag, sep, _ = group_id.partition(":")
        return not (sep and f"{tag}:" in self._released_calls)

    def _too_stale(self, policy_version: int) -> bool:
        return policy_version < self._version - self.cfg.max_staleness

    # --- data path

    async def put(self, batch: pa.RecordBatch) -> bool:
        """Admit one group, blocking while the queue is full; False if it was dropped as too stale."""
        validate_group(batch)
        group_id = batch.column("group_id")[0].as_py()
        if "\n" in group_id:
            raise ValueError(f"group_id {group_id!r} contains a newline; the consumed-id ledger is line based")
        policy_version = batch.column("policy_version")[0].as_py()
        # Our own copy: Ray may hand us views of the producer's buffers, which must not outlive it.
        owned = pa.ipc.read_record_batch(batch.serialize(), SCHEMA)
        async with self._cond:
            start = time.monotonic()
            await self._cond.wait_for(lambda: self._closed or len(self._groups) < self.cfg.capacity_groups)
            self._record_wait("producer", time.monotonic() - start)
            if self._closed:
                raise RuntimeError("replay queue is closed")
            if not self._settles(group_id):  # its call failed and was released: void, its prompt goes out again
                self._n["late_after_release"] += 1
                return False
            self._n["running"] = max(0, self._n["running"] - 1)  # the put settles its reservation either way
            if group_id in self._seen:
                self._n["duplicates"] += 1  # a retried put of a group we already hold: idempotent
                return True
            if self._too_stale(policy_version):
                self._dropped.add(group_id)
                self._count_stale(1)
                return False
            if self._spill is not None:
                self._spill.append(owned)  # before admitting: a group we cannot persist is not taken
            self._groups.append((group_id, policy_version, owned))
            self._seen.add(group_id)
            self._n["admitted"] += 1
            if self._metrics:
                self._metrics.admitted.inc()
            self._report_depth()
            self._cond.notify_all()
        return True

    def _drop_stale_waiting(self) -> None:
        """Drop queued groups that became too stale while waiting (only if producers skip ``reserve``)."""
        stale = [g for g in self._groups if self._too_stale(g[1])]
        if not stale:
            return
        self._groups = collections.deque(g for g in self._groups if not self._too_stale(g[1]))
        if self._spill is not None:
            self._spill.mark_consumed([g[0] for g in stale])  # never recover them either
        self._count_stale(len(stale))
        self._report_depth()

    def _ready(self, n_groups: int) -> bool:
        self._drop_stale_waiting()
        return self._closed or len(self._groups) >= n_groups

    async def get(self, n_groups: int, timeout_s: float | None = None) -> pa.Table | None:
        """Exactly ``n_groups`` whole groups as one Table in admission order; None on timeout or close."""
        if not 1 <= n_groups <= self.cfg.capacity_groups:
            raise ValueError(f"get(n_groups={n_groups}) needs 1 <= n_groups <= capacity_groups "
                             f"({self.cfg.capacity_groups}), else producers block before it can be served")
        async with self._cond:
            start = time.monotonic()
            try:
                if not self._ready(n_groups):  # (wait_for with timeout 0 would time out even when ready)
                    await asyncio.wait_for(self._cond.wait_for(lambda: self._ready(n_groups)), timeout_s)
            except asyncio.TimeoutError:
                return None
            finally:
                self._record_wait("consumer", time.monotonic() - start)
            if len(self._groups) < n_groups:  # closed
                return None
            taken = [self._groups.popleft() for _ in range(n_groups)]
            if self._spill is not None:
                self._spill.mark_consumed([g[0] for g in taken])
            self._n["consumed"] += n_groups
            self._report_depth()
            self._cond.notify_all()
        return pa.Table.from_batches([g[2] for g in taken], schema=SCHEMA)

    # --- versions, stats, lifecycle

    async def set_version(self, v: int, rebase: bool = False) -> None:
        """The learner's current policy version; may free admission budget and stale-out waiting groups.

        ``rebase=True`` is for a learner that (re)starts from a checkpoint, on a resumed run or after a rank
        died: the version may go backwards, and the admission budget is re-based as if ``v *
        groups_per_step`` groups had been consumed, so groups still waiting are trained first and
        rollouts resume without a deadlock.
        """
        if v < self._version and not rebase:
            raise ValueError(f"policy version may not go backwards ({self._version} -> {v})")
        async with self._cond:
            if rebase:
                self._admit_offset = self._n["admitted"] - (v * self.groups_per_step + len(self._groups))
                log.info("replay queue: admission re-based at policy version %d (%d groups waiting)", v,
                         len(self._groups))
            self._version = v
            self._cond.notify_all()

    def version(self) -> int:
        """The learner's policy version as last set."""
        return self._version

    def stats(self) -> dict:
        """Counters and gauges (also exported as Ray metrics)."""
        return {
            "depth": len(self._groups),
            "depth_bytes": sum(g[2].nbytes for g in self._groups),
            "capacity_groups": self.cfg.capacity_groups,
            "version": self._version,
            "admission_budget": self._capacity(),
            **self._n,
            "producer_wait_s": self._wait_s["producer"],
            "consumer_wait_s": self._wait_s["consumer"],
            "spilled_bytes": self._spill.bytes_written if self._spill else 0,
            "spill_files": self._spill.files if self._spill else 0,
        }

    async def close(self) -> None:
        """Wake every waiter (blocked puts raise, gets return None) and fsync and close the spill."""
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._spill is not None:
            self._spill.close()

    def _count_stale(self, n: int) -> None:
        self._n["dropped_stale"] += n
        if self._metrics:
            self._metrics.dropped_stale.inc(n)

    def _record_wait(self, side: str, seconds: float) -> None:
        self._wait_s[side] += seconds
        if self._metrics:
            (self._metrics.producer_wait if side == "producer" else self._metrics.consumer_wait).observe(seconds)

    def _report_depth(self) -> None:
        if getattr(self, "_metrics", None):
            self._metrics.depth.set(len(self._groups))

