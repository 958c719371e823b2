"""`unmask train`: the single controller. Builds the learner group, the replay queue, the rollout pool and
the weight publisher, then loops: rollouts stream into the queue, the learner consumes batches and steps,
weights go back to the pool. The loop waits on rollouts and the learner step together (``ray.wait``).

Faults it survives (docs/RELIABILITY.md): a rollout actor dying mid-rollout (Ray restarts it, its
reservations are released, it gets the current weights), the queue actor dying (restarted, recovers
from its spill files), a learner rank dying (the group is rebuilt from the last checkpoint and the
batch retried), NaN/Inf steps (skipped; repeated ones stop the run with a checkpoint), and the
driver dying (`unmask train --resume RUN_DIR`: each prompt is still trained exactly once).
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from common.config import UnmaskConfig
from driver.runtime import RunError

log = logging.getLogger("unmask")
CONTROL_TIMEOUT_S = 60.0  # the longest the loop waits on a control call (queue, pool); no wait is unbounded
PLACEMENT_TIMEOUT_S = 120.0  # at start, how long the first rollout workers may take to be placed
LOOP_WAIT_S = 0.2  # one loop turn waits this long for a rollout or the learner step to finish


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Controller:
    """Owns the run's components and the loop. Each component gets only its own config section."""

    def __init__(self, cfg: UnmaskConfig, run_dir: Path, resume: bool):
        self.cfg, self.run_dir = cfg, run_dir
        self.trackers = self.learner = self.queue = self.pool = None  # what close() shuts down, once built
        try:
            self._build(resume)
        except BaseException:
            self.close()  # a partly built run shuts down what it started (learner ranks, queue, workers)
            raise

    def _build(self, resume: bool) -> None:
        from common.metrics import MetricsLog, RayMetrics
        from common.policy import resolve_path
        from common.tasks import get_task
        from common.tokenizers import CharTokenizer, load_tokenizer
        from common.weights import resolve_transport
        from driver.publisher import WeightPublisher
        from driver.ledger import PromptStream, RunState
        from driver.trackers import build_trackers

        cfg, run_dir = self.cfg, self.run_dir
        # --- run directory, metrics, task
        self.trackers = build_trackers(cfg.run, run_dir, cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", sinks=[self.trackers])
        self.ray_metrics = RayMetrics()
        self.tokenizer = load_tokenizer(resolve_path(cfg.model.path)) if cfg.model.path else CharTokenizer()
        self.task = get_task(cfg.task)
        self.state = RunState()
        self.transport = resolve_transport(cfg.learner.weight_transport, learner_gpus=cfg.learner.num_gpus_per_rank,
                                           rollout_gpus=cfg.rollout.num_gpus_per_worker)
        # --- learner group (first: a resumed run's state decides which prompts are left to train)
        self.learner = self._build_learner()
        self._check_run_root_shared()
        if resume:
            self._resume()
        # --- replay queue, rollout pool, weights
        self.queue = self._build_queue()
        self.pool = self._build_pool()
        self.weights = WeightPublisher(self.learner, self.pool, self.transport, sync_timeout_s=cfg.learner.sync_timeout_s,
                                       base_is_shipped=cfg.model.path is not None)
        if self.weights.needed(self.state.version):
            self.weights.publish(self.state.version, block=True)
        self._log_placement()
        self.prompts = PromptStream(self.task.train_items(cfg.task.seed), self.state)
        self.eval_items = self.task.eval_items(cfg.task.eval_size)
        self.eval_overrides = {"temperature": cfg.run.eval_temperature, "top_k": None, "top_p": None}
        self.step_refs: list = []  # the learner step in flight (one ref per rank)
        self.batch, self.batch_info, self.batch_positions = None, {}, []
        self.failed_calls: dict[str, int] = {}  # consecutive failed rollout calls per worker
        self._capacity, self._capacity_checked = 0, float("-inf")  # rollout.follow_cluster

    # --- building

    def _build_learner(self):
        from learner.group import LearnerGroup
        from learner.losses import build_loss

        tok = self.tokenizer
        loss_factory = functools.partial(build_loss, self.cfg.algorithm, mask_id=tok.mask_id, pad_id=tok.pad_id,
                                         eos_id=tok.eos_id)
        learner = LearnerGroup(self.cfg.learner, self.cfg.model, loss_factory=loss_factory, seed=self.cfg.run.seed,
                               ref_model=self.cfg.algorithm.beta_kl > 0)
        log.info("learner group: %d rank(s), algorithm %s, weight transport %s%s", self.cfg.learner.num_ranks,
                 self.cfg.algorithm.name, self.transport,
                 " (on gloo: no GPUs)" if self.transport == "nccl" and self.cfg.learner.num_gpus_per_rank == 0 else "")
        return learner

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

    def _resume(self) -> None:
        """Restore weights, optimizer and run state from the last checkpoint; start from a fresh queue.

        The dead driver's queued and in-flight groups are not recovered: the prompts they answer are not in
        the restored state's trained set, so they are dispatched again (to the restored weights) and each
        prompt is trained exactly once. Its spill files move to ``trajectories/driver-<n>/`` (plots read them).
        """
        from driver.ledger import RunState

        record = self.learner.load(str(self.run_dir / "checkpoints"))
        if "run_state" not in record:
            raise RunError(f"{self.run_dir}: the checkpoint has no run state (written by an older Unmask); "
                           "start a new run from its exported policy")
        self.state = RunState.from_dict(record["run_state"])
        self.state.incarnation += 1
        spill = self.run_dir / "trajectories"
        old = spill / f"driver-{self.state.incarnation - 1}"
        old.mkdir(parents=True, exist_ok=True)
        for path in list(spill.iterdir()):
            if path.is_file():
                path.rename(old / path.name)
        log.info("resumed: step %d, version %d; %d prompt(s) trained so far, the rest are dispatched again",
                 self.state.step, self.state.version, self.state.trained_below + len(self.state.trained_above))

    def _build_queue(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from common.queue import ReplayQueue

        cfg = self.cfg
        self.queue_name = f"unmask-queue-{self.run_dir.name}"
        # On the driver's node (the head under `ray job submit`): its spill files and ledger are in the run
        # directory the driver reads, and a restarted queue finds them again.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        queue = ReplayQueue.options(name=self.queue_name, max_restarts=-1, scheduling_strategy=here).remote(
            cfg.queue, cfg.learner.groups_per_step, str(self.run_dir / "trajectories") if cfg.queue.spill else None)
        ray.get(queue.set_version.remote(self.state.version, rebase=True), timeout=CONTROL_TIMEOUT_S)
        log.info("replay queue: capacity %d groups, max_staleness %d, spill %s", cfg.queue.capacity_groups,
                 cfg.queue.max_staleness, "on" if cfg.queue.spill else "off")
        return queue

    def _build_pool(self):
        import itertools

        import ray

        from driver.pool import RolloutPool
        from driver.runtime import read_control, write_control
        from rollout.actor import RolloutWorker

        cfg = self.cfg
        # The "weights" concurrency group: nccl broadcasts are received beside a running rollout.
        worker_cls = ray.remote(concurrency_groups={"weights": 1})(RolloutWorker).options(
            num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
            resources=cfg.rollout.resources or None, max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
        seeds = itertools.count(cfg.run.seed * 7919 + self.state.call_id)
        needs = {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": cfg.rollout.num_gpus_per_worker, **cfg.rollout.resources}
        pool = RolloutPool(lambda wid: worker_cls.remote(wid, cfg.model, cfg.sampler, cfg.task, cfg.rollout.group_size,
                                                         self.queue_name, next(seeds), cfg.rollout.max_prompt_tokens,
                                                         cfg.rollout.eval_batch_tokens),
                           needs={k: float(v) for k, v in needs.items() if v})
        desired = read_control(self.run_dir).get("rollout_workers", cfg.rollout.num_workers)
        write_control(self.run_dir, rollout_workers=desired, stop=False)  # a resumed run forgets an old stop
        pool.resize(desired)
        pool.wait_ready(PLACEMENT_TIMEOUT_S)
        if desired and not pool.active():
            shortfall = pool.shortfall()
            pool.shutdown()
            raise RunError(f"no rollout worker could be placed in {PLACEMENT_TIMEOUT_S:.0f} s: {shortfall}; "
                           "lower rollout.num_cpus_per_worker / num_gpus_per_worker or add nodes")
        log.info("rollout pool: %d worker(s)%s", pool.size,
                 f", {len(pool.pending)} waiting for resources" if pool.pending else "")
        return pool

    def _log_placement(self) -> None:
        """Which node each part landed on (metrics.jsonl event ``placement``)."""
        import ray

        record = {"event": "placement", "driver": ray.get_runtime_context().get_node_id(),
                  "queue": ray.get(self.queue.node_id.remote(), timeout=CONTROL_TIMEOUT_S),
                  "learner": self.learner.node_ids(),
                  "rollout": {wid: info.get("node") for wid, info in self.pool.info.items()}}
        self.metrics.log(record)

    # --- the loop

    def run(self) -> int:
        from driver.runtime import read_control

        if self.state.step == 0:
            self._evaluate("held-out before training")
            for steps in self.cfg.run.eval_sampling_steps:  # the base, for accuracy_vs_steps.png
                self._evaluate(f"base at {steps} sampling steps", {"steps": steps})
        t_start, steps_at_start = time.time(), self.state.step
        while self.state.step < self.cfg.run.total_steps:
            control = read_control(self.run_dir)
            if control.get("stop") and not self.step_refs:
                log.info("stop requested (unmask stop): finishing at step %d", self.state.step)
                break
            self._follow_scale(control)
            self._catch_up_waiting_workers()
            self._dispatch_rollouts()
            self._feed_learner()
            self._wait_and_collect()
            if self.step_refs and self._step_done():
                step_before = self.state.step
                self._finish_step()
                if self.state.step != step_before + 1:
                    continue  # skipped (non-finite) or rebuilt: nothing to log or checkpoint yet
                done = max(self.state.step - steps_at_start, 1)
                self._log_step(eta=(time.time() - t_start) / done * (self.cfg.run.total_steps - self.state.step))
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
            self.weights.bring_up(wid, self.state.version)
        self.weights.forget(self.pool.workers)
        self.ray_metrics.record("rollout_workers", float(self.pool.size))

    def _catch_up_waiting_workers(self) -> None:
        """Send the current weights now if joined/restarted workers wait for them and the learner is idle."""
        if self.weights.awaiting and not self.step_refs:
            self.weights.publish(self.state.version)

    def _dispatch_rollouts(self) -> None:
        """Give idle workers prompts, as far as the queue's staleness budget admits."""
        import ray

        self.queue.set_version.remote(self.state.version)  # idempotent; re-arms a restarted queue
        for wid in self.pool.idle():
            if wid in self.weights.awaiting:
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
            self.pool.dispatch(wid, self.prompts.take(n), f"{self.state.incarnation}.{self.state.call_id}", n)
            self.state.call_id += 1

    def _feed_learner(self) -> None:
        """Start a learner step on the next batch when the learner is idle (its refs join the loop's wait)."""
        import ray

        if self.step_refs:
            return
        if self.batch is None:
            try:
                table = ray.get(self.queue.get.remote(self.cfg.learner.groups_per_step, 0.0), timeout=CONTROL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return
            if table is None:
                return
            self._take_batch(table)
        seed = self.cfg.run.seed * 100_003 + self.state.step
        self.step_refs = self.learner.step_refs(self.batch, step_seed=seed)

    def _take_batch(self, table) -> None:
        import torch

        from common.schema import table_to_trajectory
        from driver.ledger import position_of

        self.batch = batch = table_to_trajectory(table, self.tokenizer.pad_id)
        self.batch_positions = sorted({position_of(g) for g in table.column("group_id").to_pylist()})
        _, group_B = torch.unique(batch.group_B, return_inverse=True)
        hi_G = torch.full((int(group_B.max()) + 1,), float("-inf")).scatter_reduce(0, group_B, batch.rewards_B, "amax")
        spread_G = hi_G - torch.full_like(hi_G, float("inf")).scatter_reduce(0, group_B, batch.rewards_B, "amin")
        self.batch_info = {
            "reward": float(batch.rewards_B.mean()),
            "accuracy": float(batch.extras["correct_B"].float().mean()),
            "no_signal_groups": float((spread_G == 0).float().mean()),  # every sample of the group scored the same
            "staleness": float(self.state.version - batch.policy_version_B.float().mean()),
        }

    def _wait_and_collect(self) -> None:
        """Wait (briefly) for any rollout call or the learner step; take the finished rollouts."""
        import ray

        refs = list(self.pool.busy) + self.step_refs[:1]
        if not refs:
            time.sleep(LOOP_WAIT_S)
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=LOOP_WAIT_S)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self.pool.busy:
                self._collect(ref)

    def _collect(self, ref) -> None:
        import ray

        call = self.pool.busy.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            log.warning("rollout call %s on %s failed (%s: %s); its unfilled slots are released", call.call_id,
                        call.worker_id, type(cause).__name__, str(cause).strip().splitlines()[-1][:300])
            self.metrics.log({"event": "rollout_failed", "worker": call.worker_id, "call_id": call.call_id})
            self._release(call)
            failures = self.failed_calls[call.worker_id] = self.failed_calls.get(call.worker_id, 0) + 1
            if failures > self.cfg.rollout.max_restarts and call.worker_id in self.pool.workers:
                self.pool.drop(call.worker_id)  # restarts used up: it would fail every call from now on
            elif call.worker_id in self.pool.workers:
                self.weights.bring_up(call.worker_id, self.state.version)  # Ray restarted it with base weights
            return
        self.metrics.log({"event": "rollout", **result})
        self.failed_calls.pop(call.worker_id, None)
        self._settle_untrained(result.get("rejected_ids", []) + result.get("dropped_ids", []))
        if self.pool.restarted(call.worker_id, result.get("pid")):  # died between calls: base weights now
            log.warning("rollout worker %s was restarted by Ray; it gets the current weights", call.worker_id)
            self.weights.bring_up(call.worker_id, self.state.version)

    def _release(self, call) -> None:
        """A failed call: its unfilled reservations go back to the queue, and its prompts that produced no group
        are handed out again (its refused or stale-dropped ones are done)."""
        import ray

        from driver.ledger import position_of

        ids = [f"{call.call_id}:{item.id}" for item in call.items]
        try:
            released = ray.get(self.queue.release_call.remote(f"{call.call_id}:", ids), timeout=CONTROL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # A restarted queue holds no reservations; which of this call's groups it recovered is not known
            # here, so its prompts count as done (each trained at most once) rather than risk a second training.
            log.warning("replay queue restarting; the %d prompt(s) of failed call %s are not dispatched again",
                        len(ids), call.call_id)
            self.metrics.log({"event": "prompts_skipped", "group_ids": ids})
            self.state.mark_trained(position_of(g) for g in ids)
            return
        self._settle_untrained(released["untrained"])
        # A restarted queue remembers only the groups it recovered: one it had handed to the learner before
        # is in the batch or trained, not unsettled.
        in_batch = set(self.batch_positions if self.batch is not None else ())
        again = {g for g in released["unsettled"] if not self.state.is_done(position_of(g))
                 and position_of(g) not in in_batch}
        self.prompts.give_back([item for item, g in zip(call.items, ids) if g in again])

    def _settle_untrained(self, group_ids: list[str]) -> None:
        """Prompts a rollout refused (over-long) or whose groups the queue dropped as stale are done: marked
        with the trained ones, so the watermark moves past them (a resumed run does not send them again)."""
        from driver.ledger import position_of

        self.state.mark_trained(position_of(g) for g in group_ids)

    def _step_done(self) -> bool:
        import ray

        done, _ = ray.wait(self.step_refs, num_returns=len(self.step_refs), timeout=0)
        return len(done) == len(self.step_refs)

    def _finish_step(self) -> None:
        """Take the learner's result; rebuild the group if a rank died; stop on repeated bad steps."""
        import ray

        from learner.worker import TooManyBadSteps

        refs, self.step_refs = self.step_refs, []
        try:
            self.out = self.learner.step_result(refs)
        except ray.exceptions.RayActorError as e:
            log.warning("a learner rank died (%s); rebuilding the group from the last checkpoint", type(e).__name__)
            self._rebuild_learner()
            return
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, TooManyBadSteps):
                raise
            path = self.learner.save(str(self.run_dir / "checkpoints"), run_state=self.state.to_dict())
            raise RunError(f"{' '.join(str(e.cause).split())}; stopped, the last good weights are in {path}") from None
        self.batch = None
        if self.out.get("skipped"):
            log.warning("step skipped: non-finite loss or gradient (weights unchanged)")
            self.metrics.log({"event": "skipped_step", "step": self.state.step})
            # The batch is spent but the version did not move: re-base admission so rollouts refill it.
            self.queue.set_version.remote(self.state.version, rebase=True)
            return
        self.state.step += 1
        self.state.version = int(self.out.get("version", self.state.version + 1))
        self.state.mark_trained(self.batch_positions)
        t_sync = time.perf_counter()
        self.weights.publish(self.state.version)
        self.queue.set_version.remote(self.state.version)
        self.sync_seconds = time.perf_counter() - t_sync

    def _rebuild_learner(self) -> None:
        """Restart the whole group (process groups are rebuilt, not patched) from the last checkpoint."""
        import ray

        from driver.ledger import RunState

        self.learner.shutdown()
        self.learner = self._build_learner()
        self.weights.attach(self.learner)
        if any((self.run_dir / "checkpoints").glob("step_*")):
            record = self.learner.load(str(self.run_dir / "checkpoints"))
            self._roll_back_to(RunState.from_dict(record["run_state"]))
        else:
            self._roll_back_to(RunState())
        if self.weights.needed(self.state.version):
            self.weights.publish(self.state.version)
        ray.get(self.queue.set_version.remote(self.state.version, rebase=True), timeout=CONTROL_TIMEOUT_S)
        self.metrics.log({"event": "learner_rebuilt", "step": self.state.step, "version": self.state.version})
        log.info("learner group rebuilt at step %d, version %d; retrying the batch", self.state.step, self.state.version)

    def _roll_back_to(self, restored) -> None:
        """The weights went back to the checkpoint's ``restored`` state: so do the step, the version and the
        prompts counted done, as on ``--resume``. Prompts done after the checkpoint are dispatched again; those
        in a rollout, in the queue or in the batch being retried are not (each is trained once in the weights'
        history). Call ids and the incarnation go on: group ids are never reused."""
        from driver.ledger import PromptStream

        in_flight = self.prompts.in_flight(self.state)
        restored.call_id, restored.incarnation = self.state.call_id, self.state.incarnation
        self.state = restored
        self.prompts = PromptStream(self.task.train_items(self.cfg.task.seed), restored, in_flight=in_flight)

    def _log_step(self, eta: float) -> None:
        import ray

        out, info, update = self.out, self.batch_info, self.weights.update
        try:
            qstats = ray.get(self.queue.stats.remote(), timeout=CONTROL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # restarting: log without its stats
            qstats = {}
        record = {"step": self.state.step, "version": self.state.version, **info, **out,
                  "policy_version": self.state.version, "weight_sync_seconds": self.sync_seconds,
                  **(update.metrics if update is not None else {}), "queue_depth": qstats.get("depth", 0),
                  "dropped_stale": qstats.get("dropped_stale", 0), "rollout_workers": self.pool.size,
                  "rollout_workers_waiting": len(self.pool.pending), "prompts": self.batch_positions}
        self.metrics.log(record)
        self.ray_metrics.record("learner_step_seconds", float(out.get("step_time_s", 0.0)))
        waiting = f" (+{len(self.pool.pending)} waiting)" if self.pool.pending else ""
        log.info("step %d/%d | reward %.3f | acc %.3f | no-signal groups %3.0f%% | loss %+.4f | staleness %.1f | "
                 "workers %d%s | ETA %s", self.state.step, self.cfg.run.total_steps, info["reward"], info["accuracy"],
                 100 * info["no_signal_groups"], out.get("loss", float("nan")), info["staleness"], self.pool.size,
                 waiting, _fmt_eta(eta))

    def _periodic(self) -> None:
        step, cfg = self.state.step, self.cfg
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.total_steps:
            self._evaluate(f"held-out at step {step}")
        if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
            self.learner.save(str(self.run_dir / "checkpoints"), run_state=self.state.to_dict())

    def _evaluate(self, label: str, overrides: dict | None = None) -> dict:
        from driver.evaluate import evaluate_on_pool

        self._catch_up_waiting_workers()
        res = evaluate_on_pool(self.pool, self.eval_items, {**self.eval_overrides, **(overrides or {})}, label=label,
                               skip=self.weights.awaiting, timeout=self.cfg.run.eval_timeout_s)
        counts = {"eval_n": res["n"], "eval_missing": res["missing"]}  # the items behind the number
        record = {"step": self.state.step, "eval_accuracy": res["accuracy"], "eval_reward": res["reward"], **counts}
        if overrides:
            record = {"step": self.state.step, "eval_sampling_steps": overrides["steps"],
                      "eval_accuracy_at_steps": res["accuracy"], **counts}
        self.metrics.log(record)
        self.ray_metrics.record("eval_accuracy", res["accuracy"])
        if self.state.step > 0 and not overrides:
            log.info("held-out trend: %s", " -> ".join(f"{r['eval_accuracy']:.3f}" for r in self._evals()))
        return res

    def _evals(self) -> list[dict]:
        from common.metrics import read_metrics

        return [r for r in read_metrics(self.run_dir / "metrics.jsonl") if "eval_accuracy" in r]

    def _finish(self) -> None:
        """Drain rollouts, evaluate, checkpoint, export the policy, plot."""
        from common.metrics import read_metrics
        from driver.model_card import write_model_card
        from driver.plots import plot_run
        from driver.runtime import mark_finished

        self._drain_rollouts()
        after = self._evaluate("held-out after training")
        (self.run_dir / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after["records"]))
        for steps in self.cfg.run.eval_sampling_steps:
            self._evaluate(f"held-out at {steps} sampling steps", {"steps": steps})
        self.learner.save(str(self.run_dir / "checkpoints"), run_state=self.state.to_dict())
        self.learner.export_hf(str(self.run_dir / "policy"))
        self.tokenizer.save(self.run_dir / "policy")
        write_model_card(self.run_dir / "policy", self.cfg, read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir.name)
        plot_run(self.run_dir)
        self.trackers.log_plots(self.run_dir / "plots")
        mark_finished(self.run_dir, self.state.step)
        log.info("done: %d steps; policy exported to %s; plots in %s", self.state.step, self.run_dir / "policy",
                 self.run_dir / "plots")

    def _drain_rollouts(self) -> None:
        """Let the calls in flight finish (within the control timeout); release the slots of the rest."""
        import ray

        refs = list(self.pool.busy)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=CONTROL_TIMEOUT_S) if refs else ([], [])
        for ref in refs:
            if ref in done:
                self._collect(ref)
            else:
                call = self.pool.busy.pop(ref)  # the run ends: its prompts are not dispatched again
                self.queue.release_call.remote(f"{call.call_id}:", [f"{call.call_id}:{item.id}" for item in call.items])

    def close(self) -> None:
        """Shut down what was built; of a partly built run too (``__init__`` calls it when a build step fails)."""
        import ray

        if self.trackers is not None:
            self.trackers.close()
        if self.pool is not None:
            self.pool.shutdown()
        if self.learner is not None:
            self.learner.shutdown()
        if self.queue is not None:
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
    try:
        if resume:
            run_dir = Path(resume).resolve()
            (run_dir / "finished.json").unlink(missing_ok=True)  # it runs again, to a larger total_steps
        else:
            run_dir = new_run_dir(cfg)
        log.info("run directory: %s", run_dir)
        set_cpu_threads(cfg.run.cpu_threads)
        connect_ray(cfg.run.ray_address)
        controller = Controller(cfg, run_dir, resume=bool(resume))
        try:
            return controller.run()
        finally:
            controller.close()
    except RunError as e:
        log.error("unmask: %s", e)
        return 1
