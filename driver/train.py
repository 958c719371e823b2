"""`unmask train`: the single controller's loop. Rollouts stream into the replay queue, the learner consumes
batches and steps, weights go back to the pool; the loop waits on rollouts and the learner step together
(``ray.wait``). What it drives is built in ``driver.components``, checkpointed and exported in
``driver.checkpoints``, evaluated by ``driver.evaluate.HeldOut``; which prompts are done is ``driver.ledger``'s.

Faults it survives (docs/RELIABILITY.md): a rollout actor dying mid-rollout (Ray restarts it, its
reservations are released, it gets the current weights), the queue actor dying (restarted, recovers
from its spill files), a learner rank dying (the group is rebuilt from the last checkpoint and the
batch retried), NaN/Inf steps (skipped; repeated ones stop the run with a checkpoint), and the
driver dying (`unmask train --resume RUN_DIR`: each prompt is still trained exactly once).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from common.config import UnmaskConfig
from driver.components import CONTROL_TIMEOUT_S
from driver.runtime import RunError

log = logging.getLogger("unmask")
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
        from driver import checkpoints, components
        from driver.evaluate import HeldOut
        from driver.ledger import Ledger, RunState
        from driver.pool import ClusterFollower
        from driver.publisher import WeightPublisher
        from driver.rollouts import Rollouts
        from driver.trackers import build_trackers

        cfg, run_dir = self.cfg, self.run_dir
        # --- run directory, metrics, task
        self.trackers = build_trackers(cfg.run, run_dir, cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", sinks=[self.trackers])
        self.ray_metrics = RayMetrics()
        self.tokenizer = load_tokenizer(resolve_path(cfg.model.path)) if cfg.model.path else CharTokenizer()
        task = get_task(cfg.task)
        self.transport = resolve_transport(cfg.learner.weight_transport, learner_gpus=cfg.learner.num_gpus_per_rank,
                                           rollout_gpus=cfg.rollout.num_gpus_per_worker)
        # --- learner group (first: a resumed run's state decides which prompts are left to train)
        self.learner = components.build_learner(cfg, self.tokenizer, self.transport)
        components.check_run_root_shared(self.learner, run_dir, cfg.run.root)
        state = checkpoints.resume(self.learner, run_dir) if resume else RunState()
        self.ledger = Ledger(lambda: task.train_items(cfg.task.seed), state)
        # --- replay queue, rollout pool, weights
        self.queue = components.build_queue(cfg, run_dir, state.version)
        self.pool = components.build_pool(cfg, run_dir, state.call_id)
        self.weights = WeightPublisher(self.learner, self.pool, self.transport, sync_timeout_s=cfg.learner.sync_timeout_s,
                                       base_is_shipped=cfg.model.path is not None,
                                       prefetch=cfg.rollout.prefetch_weights)
        if self.weights.needed(state.version):
            self.weights.publish(state.version, block=True)
        self.metrics.log(components.placement(self.queue, self.learner, self.pool))
        self.held_out = HeldOut(cfg.run, task.eval_items(cfg.task.eval_size), self.pool, self.weights, self.metrics,
                                self.ray_metrics, catch_up=self._catch_up_waiting_workers,
                                sampler_steps=cfg.sampler.steps)
        self.scale = ClusterFollower(cfg.rollout)
        self.rollouts = Rollouts(cfg.rollout, self.pool, self.queue, self.ledger, self.weights, self.metrics)
        self.step_refs: list = []  # the learner step in flight (one ref per rank)
        self.batch, self.batch_info, self.batch_positions = None, {}, []

    @property
    def state(self):
        """The run state (``driver.ledger.RunState``): step, version, prompts done."""
        return self.ledger.state

    # --- the loop

    def run(self) -> int:
        from driver.runtime import read_control

        if self.state.step == 0:
            self.held_out.before_training(0)
        t_start, steps_at_start = time.time(), self.state.step
        while self.state.step < self.cfg.run.total_steps:
            control = read_control(self.run_dir)
            if control.get("stop") and not self.step_refs:
                log.info("stop requested (unmask stop): finishing at step %d", self.state.step)
                break
            self._follow_scale(control)
            self._catch_up_waiting_workers()
            self.rollouts.dispatch()
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

    def _follow_scale(self, control: dict) -> None:
        self.pool.resize(self.scale.desired(int(control.get("rollout_workers", len(self.pool.members())))))
        for wid in self.pool.poll():
            log.info("rollout worker %s joined the pool", wid)
            self.weights.bring_up(wid, self.state.version)
        self.weights.forget(self.pool.workers)
        self.ray_metrics.record("rollout_workers", float(self.pool.size))

    def _catch_up_waiting_workers(self) -> None:
        """Send the current weights now if workers wait for them (joined, restarted, or a send failed) and the
        learner is idle. A learner rank found dead here (it died between steps) is rebuilt, which publishes."""
        import ray

        if self.step_refs or not self.weights.needs_catch_up():
            return
        try:
            self.weights.publish(self.state.version)
        except ray.exceptions.RayActorError as e:
            log.warning("a learner rank died between steps (%s); rebuilding the group from the last checkpoint",
                        type(e).__name__)
            self._rebuild_learner()

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
                self.rollouts.collect(ref, self._in_batch())

    def _in_batch(self) -> set[int]:
        """The prompt positions of the batch the learner has yet to train (a failed call does not hand them out)."""
        return set(self.batch_positions if self.batch is not None else ())

    def _step_done(self) -> bool:
        import ray

        done, _ = ray.wait(self.step_refs, num_returns=len(self.step_refs), timeout=0)
        return len(done) == len(self.step_refs)

    def _finish_step(self) -> None:
        """Take the learner's result; rebuild the group if a rank died; stop on repeated bad steps."""
        import ray

        from driver import checkpoints
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
            path = checkpoints.save(self.learner, self.run_dir, self.state)
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
        self.ledger.trained(self.batch_positions)
        t_sync = time.perf_counter()
        self.weights.publish(self.state.version)
        self.queue.set_version.remote(self.state.version)
        self.sync_seconds = time.perf_counter() - t_sync

    def _rebuild_learner(self) -> None:
        """Restart the whole group (process groups are rebuilt, not patched) from the last checkpoint; the run
        state goes back with the weights (``Ledger.roll_back_to``)."""
        import ray

        from driver import checkpoints, components

        self.learner.shutdown()
        self.learner = components.build_learner(self.cfg, self.tokenizer, self.transport)
        self.weights.attach(self.learner)
        self.ledger.roll_back_to(checkpoints.restore(self.learner, self.run_dir))
        if self.weights.needed(self.state.version):
            self.weights.publish(self.state.version)
        ray.get(self.queue.set_version.remote(self.state.version, rebase=True), timeout=CONTROL_TIMEOUT_S)
        self.metrics.log({"event": "learner_rebuilt", "step": self.state.step, "version": self.state.version})
        log.info("learner group rebuilt at step %d, version %d; retrying the batch", self.state.step, self.state.version)

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
        lag = f"staleness {info['staleness']:.1f}"
        if out.get("policy_lag_max"):  # stale groups trained: how far behind, and their importance weights
            lag += f" (max {out['policy_lag_max']:.0f})"
            if "is_weight_mean" in out:
                lag += (f" w {out['is_weight_mean']:.2f}±{out['is_weight_std']:.2f} "
                        f"({100 * out['is_truncated_share']:.0f}% cut)")
        log.info("step %d/%d | reward %.3f | acc %.3f | no-signal groups %3.0f%% | loss %+.4f | %s | workers %d%s | "
                 "ETA %s", self.state.step, self.cfg.run.total_steps, info["reward"], info["accuracy"],
                 100 * info["no_signal_groups"], out.get("loss", float("nan")), lag, self.pool.size, waiting,
                 _fmt_eta(eta))

    def _periodic(self) -> None:
        from driver import checkpoints

        self.held_out.at(self.state.step)
        every = self.cfg.learner.checkpoint_every
        if every and self.state.step % every == 0:
            checkpoints.save(self.learner, self.run_dir, self.state)

    def _finish(self) -> None:
        """Drain rollouts, evaluate, checkpoint, export the policy, plot."""
        from driver import checkpoints
        from driver.plots import plot_run
        from driver.runtime import mark_finished

        self.rollouts.drain(self._in_batch())
        self.held_out.after_training(self.state.step, self.run_dir)
        checkpoints.save(self.learner, self.run_dir, self.state)
        policy = checkpoints.export_policy(self.learner, self.tokenizer, self.cfg, self.run_dir)
        plot_run(self.run_dir)
        self.trackers.log_plots(self.run_dir / "plots")
        mark_finished(self.run_dir, self.state.step)
        log.info("done: %d steps; policy exported to %s; plots in %s", self.state.step, policy, self.run_dir / "plots")

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
    from learner.losses import EDIT_LOSSES

    setup_logging()
    if cfg.sampler.cfg_scale > 0:
        log.error("unmask: sampler.cfg_scale > 0 cannot be trained on (the learner cannot rebuild guided "
                  "distributions); use guidance only with `unmask eval`")
        return 2
    if cfg.sampler.edit_threshold is not None and cfg.algorithm.name not in EDIT_LOSSES:
        log.error("unmask: sampler.edit_threshold (LLaDA2.1 token editing) trains with algorithm.name %s only (its "
                  "exact score of every draw the rules read); set algorithm.name=agrpo or unset edit_threshold",
                  " or ".join(EDIT_LOSSES))
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
