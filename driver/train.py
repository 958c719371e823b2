"""`unmask train`: the single controller. Builds queue, learner group and rollout pool, then loops:
rollouts stream into the queue, the learner consumes batches and steps, weights go back to the pool.

Faults it survives (docs/RELIABILITY.md): a rollout actor dying mid-rollout (Ray restarts it, its
reservations are released, it gets the current weights), the queue actor dying (restarted, recovers
from its spill files), a learner rank dying (the group is rebuilt from the last checkpoint and the
batch retried), NaN/Inf steps (skipped; repeated ones stop the run with a checkpoint), and the
driver dying (`unmask train --resume RUN_DIR`).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from common.config import UnmaskConfig

log = logging.getLogger("unmask")
CONTROL_TIMEOUT_S = 60.0  # the longest the loop waits on a control call (queue, pool); no wait is unbounded
PLACEMENT_TIMEOUT_S = 120.0  # at start, how long the first rollout workers may take to be placed


class RunError(Exception):
    """A run cannot go on, for a reason the user can act on: printed as one line, exit code 1."""


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _ledger_lines(run_dir: Path) -> int:
    path = run_dir / "trajectories" / "consumed.ledger"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _truncate_ledger(run_dir: Path, lines: int) -> int:
    """Forget groups consumed after the checkpoint we resume from: their training step was lost."""
    path = run_dir / "trajectories" / "consumed.ledger"
    if not path.is_file():
        return 0
    data = path.read_bytes().split(b"\n")
    kept = b"".join(line + b"\n" for line in data[:lines] if line)
    path.write_bytes(kept)
    return max(0, len([x for x in data if x]) - lines)


def evaluate(pool, items: list, overrides: dict, label: str = "eval", skip: set[str] = frozenset(),
             timeout: float = 1800.0) -> dict:
    """Held-out accuracy, the items spread over every rollout worker (but ``skip``: not on the current weights).

    A worker that has not answered within ``timeout`` s (or died) is left out, and the accuracy is over the
    items that came back (``n`` says how many).
    """
    import ray

    workers = [pool.workers[wid] for wid in pool.active() if wid not in skip]
    if not workers:
        raise RunError("no rollout worker is placed and on the current weights to evaluate with")
    chunks = [items[i::len(workers)] for i in range(len(workers))]
    refs = [w.evaluate.remote(chunk, overrides) for w, chunk in zip(workers, chunks) if chunk]
    done, late = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    records = []
    for ref in done:
        try:
            records += ray.get(ref)
        except ray.exceptions.RayError as e:
            log.warning("%s: a worker failed (%s); its items are left out", label, type(e).__name__)
    if late:
        log.warning("%s: %d worker(s) did not answer in %.0f s; their items are left out", label, len(late), timeout)
    acc = sum(r["correct"] for r in records) / max(len(records), 1)
    reward = sum(r["reward"] for r in records) / max(len(records), 1)
    log.info("%s: accuracy %.3f (%d items), mean reward %.3f", label, acc, len(records), reward)
    return {"accuracy": acc, "reward": reward, "n": len(records), "records": records}


class Controller:
    """Owns the run's components and the loop. Each component gets only its own config section."""

    def __init__(self, cfg: UnmaskConfig, run_dir: Path, resume: bool):
        import ray

        from common.metrics import MetricsLog, RayMetrics
        from common.policy import resolve_path
        from common.tasks import get_task
        from common.tokenizers import CharTokenizer, load_tokenizer
        from common.weights import resolve_transport

        self.cfg, self.run_dir = cfg, run_dir
        from driver.trackers import build_trackers

        self.trackers = build_trackers(cfg.run, run_dir, cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", sinks=[self.trackers])
        self.ray_metrics = RayMetrics()
        self.tokenizer = load_tokenizer(resolve_path(cfg.model.path)) if cfg.model.path else CharTokenizer()
        self.task = get_task(cfg.task)
        # incarnation: how many drivers this run has had; it prefixes group ids so a resumed driver never
        # produces an id an earlier one already admitted (the queue would take it for a retried put).
        self.state = {"step": 0, "version": 0, "data_position": 0, "call_id": 0, "ledger_lines": 0, "incarnation": 0}
        self.transport = resolve_transport(cfg.learner.weight_transport, learner_gpus=cfg.learner.num_gpus_per_rank,
                                           rollout_gpus=cfg.rollout.num_gpus_per_worker, colocated=cfg.run.colocated)
        if self.transport == "nccl" and cfg.learner.num_gpus_per_rank == 0:
            log.info("weight transport nccl without GPUs: the broadcast group runs on gloo")
        # nccl: the broadcast group is learner rank 0 + these rollout workers; rebuilt when the pool changes.
        self.sync_members: tuple[str, ...] | None = None
        self.sync_group: dict = {}
        self.awaiting_weights: set[str] = set()  # joined (or restarted) workers that must not roll out yet
        self._capacity, self._capacity_checked = 0, float("-inf")  # rollout.follow_cluster
        self.failed_calls: dict[str, int] = {}  # consecutive failed rollout calls per worker
        # --- learner group (first: a resumed run's state decides what the queue may recover)
        self.learner = self._build_learner()
        self._check_run_root_shared()
        if resume and any((run_dir / "checkpoints").glob("step_*")):
            self.state.update(self.learner.load(str(run_dir / "checkpoints")).get("data_position", {}))
            self.state["incarnation"] += 1
            forgotten = _truncate_ledger(run_dir, self.state["ledger_lines"])
            log.info("resumed: step %d, version %d, data position %d (%d groups consumed after the checkpoint "
                     "are queued again)", self.state["step"], self.state["version"], self.state["data_position"],
                     forgotten)
        # --- replay queue
        from common.queue import ReplayQueue

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.queue_name = f"unmask-queue-{run_dir.name}"
        # On the driver's node (the head under `ray job submit`): its spill files and ledger are in the run
        # directory the driver reads, and a restarted queue finds them again.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = ReplayQueue.options(name=self.queue_name, max_restarts=-1, scheduling_strategy=here).remote(
            cfg.queue, cfg.learner.groups_per_step, str(run_dir / "trajectories") if cfg.queue.spill else None)
        ray.get(self.queue.set_version.remote(self.state["version"], rebase=True), timeout=CONTROL_TIMEOUT_S)
        log.info("replay queue: capacity %d groups, max_staleness %d, spill %s", cfg.queue.capacity_groups,
                 cfg.queue.max_staleness, "on" if cfg.queue.spill else "off")
        # --- rollout pool
        self.pool = self._build_pool()
        self._log_placement()
        self.update = self._sync_weights(block=True) if self._workers_need_weights() else None
        self.prompts = itertools.islice(self.task.train_items(cfg.task.seed), self.state["data_position"], None)
        self.eval_items = self.task.eval_items(cfg.task.eval_size)
        self.eval_overrides = {"temperature": cfg.run.eval_temperature, "top_k": None, "top_p": None}
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.learner_future: Future | None = None
        self.batch = None
        self.batch_info: dict = {}
        self.pending_sync: list = []

    # --- building

    def _check_run_root_shared(self) -> None:
        """Every learner rank must see the run directory (checkpoints, exports): a file the driver writes."""
        import uuid

        token, probe = uuid.uuid4().hex, self.run_dir / ".shared-probe"
        probe.write_text(token)
        try:
            blind = self.learner.check_shared(str(probe), token)
        finally:
            probe.unlink()
        if blind:
            raise RunError(f"run.root {self.cfg.run.root} is not shared with the learner node(s) ({'; '.join(blind)}): "
                           "mount one shared filesystem at the same path on the driver's and the learner nodes")

    def _log_placement(self) -> None:
        """Which node each part landed on (metrics.jsonl event ``placement``)."""
        import ray

        record = {"event": "placement", "driver": ray.get_runtime_context().get_node_id(),
                  "queue": ray.get(self.queue.node_id.remote(), timeout=CONTROL_TIMEOUT_S),
                  "learner": self.learner.node_ids(),
                  "rollout": {wid: info.get("node") for wid, info in self.pool.info.items()}}
        self.metrics.log(record)

    def _build_learner(self):
        from learner.group import LearnerGroup
        from learner.losses import build_loss

        tok = self.tokenizer
        loss_factory = functools.partial(build_loss, self.cfg.algorithm, mask_id=tok.mask_id, pad_id=tok.pad_id,
                                         eos_id=tok.eos_id)
        learner = LearnerGroup(self.cfg.learner, self.cfg.model, loss_factory=loss_factory, seed=self.cfg.run.seed,
                               ref_model=self.cfg.algorithm.beta_kl > 0)
        if self.transport != "nccl":  # nccl's group is built at the first sync, when the members are known
            learner.init_weight_sync(self.transport)
        self.sync_members = None
        log.info("learner group: %d rank(s), algorithm %s, weight transport %s", self.cfg.learner.num_ranks,
                 self.cfg.algorithm.name, self.transport)
        return learner

    def _build_pool(self):
        import ray

        from driver.pool import RolloutPool
        from driver.runtime import read_control, write_control
        from rollout.actor import RolloutWorker

        cfg = self.cfg
        # The "weights" concurrency group: nccl broadcasts are received beside a running rollout.
        worker_cls = ray.remote(concurrency_groups={"weights": 1})(RolloutWorker).options(
            num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
            resources=cfg.rollout.resources or None, max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
        seeds = itertools.count(cfg.run.seed * 7919 + self.state["call_id"])
        needs = {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": cfg.rollout.num_gpus_per_worker, **cfg.rollout.resources}
        pool = RolloutPool(lambda wid: worker_cls.remote(wid, cfg.model, cfg.sampler, cfg.task, cfg.rollout.group_size,
                                                         self.queue_name, next(seeds), cfg.rollout.max_prompt_tokens),
                           needs={k: float(v) for k, v in needs.items() if v})
        desired = read_control(self.run_dir).get("rollout_workers", cfg.rollout.num_workers)
        write_control(self.run_dir, rollout_workers=desired, stop=False)  # a resumed run forgets an old stop
        pool.resize(desired)
        pool.wait_ready(PLACEMENT_TIMEOUT_S)
        if desired and not pool.active():
            free = ray.available_resources()
            pool.shutdown()
            raise RunError(f"no rollout worker could be placed in {PLACEMENT_TIMEOUT_S:.0f} s: each needs "
                           f"{pool.needs} and the cluster has {({k: free.get(k, 0.0) for k in pool.needs})} free; "
                           "lower rollout.num_cpus_per_worker / num_gpus_per_worker or add nodes")
        log.info("rollout pool: %d worker(s)%s", pool.size,
                 f", {len(pool.pending)} waiting for resources" if pool.pending else "")
        return pool

    def _sync_weights(self, block: bool = False):
        import ray

        if self.transport == "nccl":
            return self._broadcast_weights()
        timeout = self.cfg.learner.sync_timeout_s
        if self.transport == "cuda_ipc":
            ray.get(self.pending_sync, timeout=timeout)  # one shared buffer: receivers of the last version are done
        update = self.learner.sync_weights()
        self.pending_sync = self.pool.broadcast(update)
        if block:
            ray.get(self.pending_sync, timeout=timeout)
        return update

    def _broadcast_weights(self):
        """nccl: learner rank 0 broadcasts to every active rollout worker at once, busy or not.

        The group is rebuilt whenever the pool's members changed (a worker joined, left or restarted).
        If a broadcast fails (a member died in it), the old group's receivers are let time out, members
        that do not answer on their weights thread within 10 s (dead, or still restarting) are left out
        and marked as awaiting weights, and the send is retried in a new group. Returns when every member
        holds the version staged (a worker swaps it in before its next rollout).
        """
        import uuid

        import ray

        from common.weights import WeightUpdate

        for attempt in range(1, 4):
            members = tuple(self.pool.active())
            if attempt > 1:
                members = self._responsive(members)
            if not members:  # nobody to send to; joiners get the next version
                return WeightUpdate(self.state["version"], "nccl", (), 0)
            if members != self.sync_members:
                info = self.learner.init_weight_sync("nccl", len(members))
                self.sync_group, self.sync_members = {**info, "id": uuid.uuid4().hex}, members
                log.info("weight broadcast group: learner + %d rollout worker(s) (%s)", len(members), info["backend"])
            send = self.learner.sync_weights(block=False)
            receives = [self.pool.workers[w].receive_broadcast.options(concurrency_group="weights").remote(
                {**self.sync_group, "rank": rank}) for rank, w in enumerate(members, start=1)]
            try:
                update = ray.get(send, timeout=self.cfg.learner.sync_timeout_s + 30)
                ray.get(receives, timeout=self.cfg.learner.sync_timeout_s + 30)
            except ray.exceptions.RayError as e:
                self.sync_members = None
                log.warning("weight broadcast failed (%s); rebuilding the group without members that left",
                            type(e).__name__)
                # Receivers still in the broken group hold their weights thread until its timeout.
                ray.wait(receives, num_returns=len(receives), timeout=self.cfg.learner.sync_timeout_s + 5)
                continue
            self.awaiting_weights -= set(members)
            return update
        raise RuntimeError("unmask: the nccl weight broadcast failed 3 times in a row (see the warnings above); "
                           "check the rollout workers' logs, or use learner.weight_transport=object_store")

    def _responsive(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """The members that answer on their weights thread within 10 s; the rest wait for a later version."""
        import ray

        pings = {w: self.pool.workers[w].ready.options(concurrency_group="weights").remote() for w in members}
        done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=10)
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
            self.awaiting_weights.add(w)
        return tuple(alive)

    # --- the loop

    def run(self) -> int:
        from driver.runtime import read_control

        if self.state["step"] == 0:
            self._evaluate("held-out before training")
            for steps in self.cfg.run.eval_sampling_steps:  # the base, for accuracy_vs_steps.png
                self._evaluate(f"base at {steps} sampling steps", {"steps": steps})
        t_start, steps_at_start = time.time(), self.state["step"]
        while self.state["step"] < self.cfg.run.total_steps:
            control = read_control(self.run_dir)
            if control.get("stop") and self.learner_future is None:
                log.info("stop requested (unmask stop): finishing at step %d", self.state["step"])
                break
            self._follow_scale(control)
            self._catch_up_waiting_workers()
            self._dispatch_rollouts()
            self._feed_learner()
            self._collect_rollouts()
            if self.learner_future is not None and self.learner_future.done():
                step_before = self.state["step"]
                if not self._finish_step():
                    return 1
                if self.state["step"] != step_before + 1:
                    continue  # skipped (non-finite) or rebuilt: nothing to log or checkpoint yet
                done = max(self.state["step"] - steps_at_start, 1)
                self._log_step(eta=(time.time() - t_start) / done * (self.cfg.run.total_steps - self.state["step"]))
                self._periodic()
        self._finish()
        return 0

    def _desired_workers(self, control: dict) -> int:
        """`unmask scale`'s number; with rollout.follow_cluster, at least what the live nodes hold."""
        import ray

        from driver.pool import cluster_capacity

        desired = int(control.get("rollout_workers", len(self.pool.members())))
        rollout = self.cfg.rollout
        if not rollout.follow_cluster:
            return desired
        now = time.monotonic()
        if now - self._capacity_checked > 2.0:  # one GCS query every two seconds at most
            self._capacity_checked = now
            capacity = cluster_capacity(rollout.resources, ray.cluster_resources())
            if capacity != self._capacity:
                log.info("cluster rollout capacity: %d worker(s) (nodes joined or left)", capacity)
                self._capacity = capacity
        return min(max(desired, self._capacity), rollout.max_workers or 1 << 30)

    def _follow_scale(self, control: dict) -> None:
        self.pool.resize(self._desired_workers(control))
        for wid in self.pool.poll():
            log.info("rollout worker %s joined the pool", wid)
            self._give_current_weights(wid)
        self.awaiting_weights &= set(self.pool.workers)
        self.ray_metrics.record("rollout_workers", float(self.pool.size))

    def _workers_need_weights(self) -> bool:
        """Workers load a checkpoint base themselves; a random preset base (or any trained version) is sent."""
        return self.state["version"] > 0 or self.cfg.model.path is None

    def _give_current_weights(self, wid: str) -> None:
        """A worker that joined or restarted holds the base weights; bring it to the current version."""
        if not self._workers_need_weights():
            return
        if self.transport == "nccl":  # it must join the broadcast group: rebuilt at the next sync
            self.awaiting_weights.add(wid)
            self.sync_members = None
        elif self.update is not None:  # runs before any rollout the worker gets (actor calls are ordered)
            self.pool.workers[wid].set_weights.remote(self.update)

    def _catch_up_waiting_workers(self) -> None:
        """Send the current weights now if joined/restarted workers wait for them and the learner is idle."""
        if self.awaiting_weights and self.learner_future is None:
            self.update = self._sync_weights()

    def _dispatch_rollouts(self) -> None:
        """Give idle workers prompts, as far as the queue's staleness budget admits."""
        import ray

        self.queue.set_version.remote(self.state["version"])  # idempotent; re-arms a restarted queue
        for wid in self.pool.idle():
            if wid in self.awaiting_weights:
                continue
            n = self.cfg.rollout.prompts_per_call
            try:
                while n > 0 and not ray.get(self.queue.reserve.remote(n), timeout=CONTROL_TIMEOUT_S):
                    n //= 2
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("replay queue restarting; rollouts wait for it")
                return
            if n == 0:
                return
            items = list(itertools.islice(self.prompts, n))
            self.state["data_position"] += n
            self.pool.dispatch(wid, items, self._call_tag(), n)
            self.state["call_id"] += 1

    def _call_tag(self) -> str:
        return f"{self.state['incarnation']}.{self.state['call_id']}"

    def _feed_learner(self) -> None:
        import ray

        from common.schema import table_to_trajectory

        if self.learner_future is not None:
            return
        if self.batch is None:
            try:
                table = ray.get(self.queue.get.remote(self.cfg.learner.groups_per_step, 0.2), timeout=CONTROL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return
            if table is None:
                return
            self.batch = table_to_trajectory(table, self.tokenizer.pad_id)
            self.batch_info = {
                "reward": float(self.batch.rewards_B.mean()),
                "accuracy": float(self.batch.extras["correct_B"].float().mean()),
                "staleness": float(self.state["version"] - self.batch.policy_version_B.float().mean()),
            }
        seed = self.cfg.run.seed * 100_003 + self.state["step"]
        self.learner_future = self.executor.submit(self.learner.step, self.batch, step_seed=seed)

    def _collect_rollouts(self) -> None:
        import ray

        refs = list(self.pool.busy)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.05) if refs else ([], [])
        for ref in done:
            call = self.pool.busy.pop(ref)
            try:
                result = ray.get(ref)
                self.metrics.log({"event": "rollout", **result})
                self.failed_calls.pop(call.worker_id, None)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                log.warning("rollout call %s on %s failed (%s: %s); its unfilled slots are released", call.call_id,
                            call.worker_id, type(cause).__name__, str(cause).strip().splitlines()[-1][:300])
                self.metrics.log({"event": "rollout_failed", "worker": call.worker_id, "call_id": call.call_id})
                self.queue.release_call.remote(f"{call.call_id}:", call.reserved)
                failures = self.failed_calls[call.worker_id] = self.failed_calls.get(call.worker_id, 0) + 1
                if failures > self.cfg.rollout.max_restarts and call.worker_id in self.pool.workers:
                    self.pool.drop(call.worker_id)  # restarts used up: it would fail every call from now on
                elif call.worker_id in self.pool.workers:
                    self._give_current_weights(call.worker_id)  # Ray restarted the actor with base weights

    def _finish_step(self) -> bool:
        """Take the learner's result; rebuild the group if a rank died. False if the run must stop."""
        import ray

        future, self.learner_future = self.learner_future, None
        try:
            self.out = future.result()
        except ray.exceptions.RayActorError as e:
            log.warning("a learner rank died (%s); rebuilding the group from the last checkpoint", type(e).__name__)
            self._rebuild_learner()
            return True
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RuntimeError) and "max_bad_steps" in str(e.cause):
                log.error("unmask: %s", " ".join(str(e.cause).split()))
                path = self.learner.save(str(self.run_dir / "checkpoints"), data_position=self._checkpoint_state())
                log.error("unmask: stopped; the last good weights are checkpointed in %s", path)
                return False
            raise
        self.batch = None
        if self.out.get("skipped"):
            log.warning("step skipped: non-finite loss or gradient (weights unchanged)")
            self.metrics.log({"event": "skipped_step", "step": self.state["step"]})
            # The batch is spent but the version did not move: re-base admission so rollouts refill it.
            self.queue.set_version.remote(self.state["version"], rebase=True)
            return True
        self.state["step"] += 1
        self.state["version"] = int(self.out.get("version", self.state["version"] + 1))
        t_sync = time.perf_counter()
        self.update = self._sync_weights()
        self.queue.set_version.remote(self.state["version"])
        self.sync_seconds = time.perf_counter() - t_sync
        return True

    def _rebuild_learner(self) -> None:
        """Restart the whole group (process groups are rebuilt, not patched) from the last checkpoint."""
        import ray

        self.learner.shutdown()
        self.learner = self._build_learner()
        if any((self.run_dir / "checkpoints").glob("step_*")):
            record = self.learner.load(str(self.run_dir / "checkpoints")).get("data_position", {})
            self.state.update(step=record["step"], version=record["version"])
        else:
            self.state.update(step=0, version=0)
        self.update = self._sync_weights(block=False) if self._workers_need_weights() else None
        ray.get(self.queue.set_version.remote(self.state["version"], rebase=True), timeout=CONTROL_TIMEOUT_S)
        self.metrics.log({"event": "learner_rebuilt", "step": self.state["step"], "version": self.state["version"]})
        log.info("learner group rebuilt at step %d, version %d; retrying the batch", self.state["step"],
                 self.state["version"])

    def _log_step(self, eta: float) -> None:
        import ray

        out, info = self.out, self.batch_info
        try:
            qstats = ray.get(self.queue.stats.remote(), timeout=CONTROL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # restarting: log without its stats
            qstats = {}
        record = {"step": self.state["step"], "version": self.state["version"], **info, **out,
                  "policy_version": self.state["version"], "weight_sync_seconds": self.sync_seconds,
                  **self.update.metrics, "queue_depth": qstats.get("depth", 0),
                  "dropped_stale": qstats.get("dropped_stale", 0), "rollout_workers": self.pool.size,
                  "rollout_workers_waiting": len(self.pool.pending)}
        self.metrics.log(record)
        self.ray_metrics.record("learner_step_seconds", float(out.get("step_time_s", 0.0)))
        waiting = f" (+{len(self.pool.pending)} waiting)" if self.pool.pending else ""
        log.info("step %d/%d | reward %.3f | acc %.3f | loss %+.4f | staleness %.1f | workers %d%s | ETA %s",
                 self.state["step"], self.cfg.run.total_steps, info["reward"], info["accuracy"],
                 out.get("loss", float("nan")), info["staleness"], self.pool.size, waiting, _fmt_eta(eta))

    def _checkpoint_state(self) -> dict:
        return {**self.state, "ledger_lines": _ledger_lines(self.run_dir)}

    def _periodic(self) -> None:
        step, cfg = self.state["step"], self.cfg
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.total_steps:
            self._evaluate(f"held-out at step {step}")
        if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
            self.learner.save(str(self.run_dir / "checkpoints"), data_position=self._checkpoint_state())

    def _evaluate(self, label: str, overrides: dict | None = None) -> dict:
        self._catch_up_waiting_workers()
        res = evaluate(self.pool, self.eval_items, {**self.eval_overrides, **(overrides or {})}, label=label,
                       skip=self.awaiting_weights, timeout=self.cfg.run.eval_timeout_s)
        record = {"step": self.state["step"], "eval_accuracy": res["accuracy"], "eval_reward": res["reward"]}
        if overrides:
            record = {"step": self.state["step"], "eval_sampling_steps": overrides["steps"],
                      "eval_accuracy_at_steps": res["accuracy"]}
        self.metrics.log(record)
        self.ray_metrics.record("eval_accuracy", res["accuracy"])
        return res

    def _finish(self) -> None:
        """Drain rollouts, evaluate, checkpoint, export the policy, plot."""
        import ray

        from common.metrics import read_metrics
        from driver.model_card import write_model_card
        from driver.plots import plot_run
        from driver.runtime import mark_finished

        refs = list(self.pool.busy)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=CONTROL_TIMEOUT_S) if refs else ([], [])
        for ref in refs:
            call = self.pool.busy.pop(ref)
            try:
                if ref not in done:
                    raise TimeoutError
                self.metrics.log({"event": "rollout", **ray.get(ref)})
            except (ray.exceptions.RayError, TimeoutError):
                self.queue.release_call.remote(f"{call.call_id}:", call.reserved)
        after = self._evaluate("held-out after training")
        (self.run_dir / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after["records"]))
        for steps in self.cfg.run.eval_sampling_steps:
            self._evaluate(f"held-out at {steps} sampling steps", {"steps": steps})
        self.learner.save(str(self.run_dir / "checkpoints"), data_position=self._checkpoint_state())
        self.learner.export_hf(str(self.run_dir / "policy"))
        self.tokenizer.save(self.run_dir / "policy")
        write_model_card(self.run_dir / "policy", self.cfg, read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir.name)
        plot_run(self.run_dir)
        self.trackers.log_plots(self.run_dir / "plots")
        mark_finished(self.run_dir, self.state["step"])
        log.info("done: %d steps; policy exported to %s; plots in %s", self.state["step"], self.run_dir / "policy",
                 self.run_dir / "plots")

    def close(self) -> None:
        import ray

        self.executor.shutdown(wait=False, cancel_futures=True)
        self.trackers.close()
        self.pool.shutdown()
        self.learner.shutdown()
        ray.kill(self.queue)


def train(cfg: UnmaskConfig, resume: str | None = None) -> int:
    """Build everything, run the loop, close in ``finally``. Returns the process exit code."""
    from common.threads import set_cpu_threads
    from driver.runtime import connect_ray, new_run_dir, setup_logging

    setup_logging()
    if cfg.sampler.cfg_scale > 0:
        log.error("unmask: sampler.cfg_scale > 0 cannot be trained on (the learner cannot rebuild guided "
                  "distributions); use guidance only with `unmask eval`")
        return 2
    if resume:
        run_dir = Path(resume).resolve()
        (run_dir / "finished.json").unlink(missing_ok=True)  # it runs again, to a larger total_steps
    else:
        run_dir = new_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    set_cpu_threads(cfg.run.cpu_threads)
    connect_ray(cfg.run.ray_address)
    try:
        controller = Controller(cfg, run_dir, resume=bool(resume))
        try:
            return controller.run()
        finally:
            controller.close()
    except RunError as e:
        log.error("unmask: %s", e)
        return 1
