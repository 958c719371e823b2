"""`unmask train`: the single controller. Builds queue, learner group and rollout pool, then loops:
rollouts stream into the queue, the learner consumes batches and steps, weights go back to the pool.
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


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def evaluate(pool, items: list, overrides: dict, label: str = "eval") -> dict:
    """Held-out accuracy, the items spread over every rollout worker."""
    import ray

    workers = list(pool.workers.values())
    chunks = [items[i::len(workers)] for i in range(len(workers))]
    refs = [w.evaluate.remote(chunk, overrides) for w, chunk in zip(workers, chunks) if chunk]
    records = [r for chunk in ray.get(refs) for r in chunk]
    acc = sum(r["correct"] for r in records) / max(len(records), 1)
    reward = sum(r["reward"] for r in records) / max(len(records), 1)
    log.info("%s: accuracy %.3f (%d items), mean reward %.3f", label, acc, len(records), reward)
    return {"accuracy": acc, "reward": reward, "n": len(records), "records": records}


def train(cfg: UnmaskConfig, resume: str | None = None) -> int:
    import ray

    from common.metrics import MetricsLog, RayMetrics
    from common.weights import resolve_transport
    from common.queue import ReplayQueue
    from common.schema import table_to_trajectory
    from common.tasks import get_task
    from common.tokenizers import CharTokenizer, load_tokenizer
    from common.policy import resolve_path
    from driver.plots import plot_run
    from driver.pool import RolloutPool
    from driver.runtime import connect_ray, new_run_dir, read_control, setup_logging, write_control
    from learner.group import LearnerGroup
    from learner.losses import build_loss
    from rollout.actor import RolloutWorker

    setup_logging()
    if cfg.sampler.cfg_scale > 0:
        log.error("unmask: sampler.cfg_scale > 0 cannot be trained on (the learner cannot rebuild guided "
                  "distributions); use guidance only with `unmask eval`")
        return 2
    # --- run directory
    if resume:
        run_dir = Path(resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            log.error("unmask: %s is not a run directory (no config.yaml)", run_dir)
            return 2
    else:
        run_dir = new_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    ray_metrics = RayMetrics()
    tokenizer = load_tokenizer(resolve_path(cfg.model.path)) if cfg.model.path else CharTokenizer()
    task = get_task(cfg.task)

    # --- ray
    connect_ray(cfg.run.ray_address)
    # --- replay queue
    queue = ReplayQueue.options(name=f"unmask-queue-{run_dir.name}", max_restarts=-1).remote(
        cfg.queue, cfg.learner.groups_per_step, str(run_dir / "trajectories") if cfg.queue.spill else None)
    log.info("replay queue: capacity %d groups, max_staleness %d", cfg.queue.capacity_groups, cfg.queue.max_staleness)
    # --- learner group
    loss_factory = functools.partial(build_loss, cfg.algorithm, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id,
                                     eos_id=tokenizer.eos_id)
    learner = LearnerGroup(cfg.learner, cfg.model, loss_factory=loss_factory, seed=cfg.run.seed,
                           ref_model=cfg.algorithm.beta_kl > 0)
    log.info("learner group: %d rank(s), algorithm %s", cfg.learner.num_ranks, cfg.algorithm.name)
    state = {"step": 0, "version": 0, "data_position": 0, "call_id": 0}
    if resume and any((run_dir / "checkpoints").glob("step_*")):
        record = learner.load(str(run_dir / "checkpoints"))
        state.update(record.get("data_position", {}))
        log.info("resumed: step %d, version %d, data position %d", state["step"], state["version"], state["data_position"])
    ray.get(queue.set_version.remote(state["version"]))
    transport = resolve_transport(cfg.learner.weight_transport, learner_gpus=cfg.learner.num_gpus_per_rank,
                                  rollout_gpus=cfg.rollout.num_gpus_per_worker, colocated=cfg.run.colocated)
    if transport == "nccl":
        log.warning("nccl weight transport is not wired into the driver yet; using object_store")
        transport = "object_store"
    learner.init_weight_sync(transport)
    log.info("weight transport: %s", transport)
    # --- rollout pool
    worker_cls = ray.remote(RolloutWorker).options(
        num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
        max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
    make_worker = lambda wid: worker_cls.remote(wid, cfg.model, cfg.sampler, cfg.task, cfg.rollout.group_size,
                                                queue, cfg.run.seed * 7919 + hash(wid) % 10_000)
    pool = RolloutPool(make_worker)
    write_control(run_dir, rollout_workers=read_control(run_dir).get("rollout_workers", cfg.rollout.num_workers))
    pool.resize(read_control(run_dir)["rollout_workers"])
    ray.get([w.ready.remote() for w in pool.workers.values()])
    log.info("rollout pool: %d worker(s)", pool.size)
    update = learner.sync_weights() if state["version"] > 0 else None
    if update is not None:
        ray.get(pool.broadcast(update))

    eval_items = task.eval_items(cfg.task.eval_size)
    eval_overrides = {"temperature": cfg.run.eval_temperature, "top_k": None, "top_p": None}
    prompts = itertools.islice(task.train_items(cfg.task.seed), state["data_position"], None)
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        if state["step"] == 0:
            before = evaluate(pool, eval_items, eval_overrides, label="held-out before training")
            metrics.log({"step": 0, "eval_accuracy": before["accuracy"], "eval_reward": before["reward"]})
        t_start, steps_at_start = time.time(), state["step"]
        learner_future: Future | None = None
        pending_sync: list = []
        batch_info: dict = {}
        while state["step"] < cfg.run.total_steps:
            # --- pool size follows `unmask scale`
            for wid in pool.resize(int(read_control(run_dir).get("rollout_workers", pool.size))):
                log.info("rollout worker %s joined the pool", wid)
                if update is not None:
                    pool.workers[wid].set_weights.remote(update)
            ray_metrics.record("rollout_workers", float(pool.size))
            # --- dispatch rollouts within the staleness budget
            for wid in pool.idle():
                n = cfg.rollout.prompts_per_call
                while n > 0 and not ray.get(queue.reserve.remote(n)):
                    n //= 2
                if n == 0:
                    break
                items = list(itertools.islice(prompts, n))
                state["data_position"] += n
                pool.dispatch(wid, items, state["call_id"], n)
                state["call_id"] += 1
            # --- feed the learner
            if learner_future is None:
                table = ray.get(queue.get.remote(cfg.learner.groups_per_step, 0.2))
                if table is not None:
                    batch = table_to_trajectory(table, tokenizer.pad_id)
                    batch_info = {
                        "reward": float(batch.rewards_B.mean()),
                        "accuracy": float(table.column("correct").to_numpy(zero_copy_only=False).mean()),
                        "staleness": float(state["version"] - batch.policy_version_B.float().mean()),
                    }
                    learner_future = executor.submit(learner.step, batch, step_seed=cfg.run.seed * 100_003 + state["step"])
            # --- collect finished work
            refs = list(pool.busy)
            done, _ = ray.wait(refs, num_returns=1, timeout=0.05) if refs else ([], [])
            for ref in done:
                call = pool.busy.pop(ref)
                try:
                    result = ray.get(ref)
                    metrics.log({"event": "rollout", **result})
                except ray.exceptions.RayError as e:
                    log.warning("rollout call %d on %s failed (%s); its slots are released",
                                call.call_id, call.worker_id, type(e).__name__)
                    queue.release_call.remote(f"{call.call_id}:", call.reserved)
                    if update is not None and call.worker_id in pool.workers:
                        pool.workers[call.worker_id].set_weights.remote(update)  # a restarted actor has base weights
            if learner_future is not None and learner_future.done():
                out = learner_future.result()
                learner_future = None
                state["step"] += 1
                state["version"] += 1
                t_sync = time.perf_counter()
                if transport == "cuda_ipc":
                    ray.get(pending_sync)  # one shared buffer: receivers of the last version must be done
                update = learner.sync_weights()
                pending_sync = pool.broadcast(update)
                ray.get(queue.set_version.remote(state["version"]))
                sync_s = time.perf_counter() - t_sync
                qstats = ray.get(queue.stats.remote())
                record = {"step": state["step"], "version": state["version"], **batch_info, **out,
                          "weight_sync_seconds": sync_s, **update.metrics, "queue_depth": qstats.get("depth", 0),
                          "dropped_stale": qstats.get("dropped_stale", 0), "rollout_workers": pool.size}
                elapsed = time.time() - t_start
                eta = elapsed / (state["step"] - steps_at_start) * (cfg.run.total_steps - state["step"])
                metrics.log(record)
                ray_metrics.record("learner_step_seconds", float(out.get("step_seconds", 0.0)))
                log.info("step %d/%d | reward %.3f | acc %.3f | loss %+.4f | staleness %.1f | workers %d | ETA %s",
                         state["step"], cfg.run.total_steps, batch_info["reward"], batch_info["accuracy"],
                         out.get("loss", float("nan")), batch_info["staleness"], pool.size, _fmt_eta(eta))
                if cfg.run.eval_every and state["step"] % cfg.run.eval_every == 0 and state["step"] < cfg.run.total_steps:
                    mid = evaluate(pool, eval_items, eval_overrides, label=f"held-out at step {state['step']}")
                    metrics.log({"step": state["step"], "eval_accuracy": mid["accuracy"], "eval_reward": mid["reward"]})
                if cfg.learner.checkpoint_every and state["step"] % cfg.learner.checkpoint_every == 0:
                    learner.save(str(run_dir / "checkpoints"), data_position=dict(state))
        # --- the end: evaluate, checkpoint, export, plot
        for ref in list(pool.busy):
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass
            pool.busy.pop(ref)
        after = evaluate(pool, eval_items, eval_overrides, label="held-out after training")
        metrics.log({"step": state["step"], "eval_accuracy": after["accuracy"], "eval_reward": after["reward"]})
        (run_dir / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after["records"]))
        if cfg.run.eval_sampling_steps:
            for steps in cfg.run.eval_sampling_steps:
                res = evaluate(pool, eval_items, {**eval_overrides, "steps": steps},
                               label=f"held-out at {steps} sampling steps")
                metrics.log({"step": state["step"], "eval_sampling_steps": steps, "eval_accuracy_at_steps": res["accuracy"]})
        learner.save(str(run_dir / "checkpoints"), data_position=dict(state))
        learner.export_hf(str(run_dir / "policy"))
        tokenizer.save(run_dir / "policy")
        plot_run(run_dir)
        log.info("done: %d steps; policy exported to %s; plots in %s", state["step"], run_dir / "policy", run_dir / "plots")
        return 0
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        pool.shutdown()
        learner.shutdown()
        ray.kill(queue)
