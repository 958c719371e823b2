"""Building the parts the run's loop drives: the learner group, the replay queue and the rollout pool, and the
record of where each landed. Each gets only its own config section plus what it needs from the others."""
from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path

from common.config import UnmaskConfig
from driver.runtime import RunError

log = logging.getLogger("unmask")
CONTROL_TIMEOUT_S = 60.0  # the longest the driver waits on a control call (queue, pool); no wait is unbounded
PLACEMENT_TIMEOUT_S = 120.0  # at start, how long the first rollout workers may take to be placed


def build_learner(cfg: UnmaskConfig, tokenizer, transport: str):
    """The learner group with the run's loss, reference model (``beta_kl > 0``) and seed."""
    from common.model import family_of
    from common.policy import policy_config
    from learner.group import LearnerGroup
    from learner.losses import build_loss

    canvases = family_of(policy_config(cfg.model)).canvases
    loss_factory = functools.partial(build_loss, cfg.algorithm, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id,
                                     eos_id=tokenizer.eos_id, canvases=canvases,
                                     editing=cfg.sampler.edit_threshold is not None)
    learner = LearnerGroup(cfg.learner, cfg.model, loss_factory=loss_factory, seed=cfg.run.seed,
                           ref_model=cfg.algorithm.beta_kl > 0)
    log.info("learner group: %d rank(s), algorithm %s, weight transport %s%s", cfg.learner.num_ranks,
             cfg.algorithm.name, transport,
             " (on gloo: no GPUs)" if transport == "nccl" and cfg.learner.num_gpus_per_rank == 0 else "")
    return learner


def check_run_root_shared(learner, run_dir: Path, root: str) -> None:
    """Every learner rank must see the run directory (checkpoints, exports): a file the driver writes."""
    import uuid

    token, probe = uuid.uuid4().hex, run_dir / ".shared-probe"
    probe.write_text(token)
    try:
        blind = learner.check_shared(str(probe), token)
    finally:
        probe.unlink()
    if blind:
        raise RunError(f"run.root {root} is not shared with the learner node(s) ({'; '.join(blind)}): "
                       "mount one shared filesystem at the same path on the driver's and the learner nodes")


def queue_name(run_dir: Path) -> str:
    """The replay queue's actor name: rollout workers find it by this name."""
    return f"unmask-queue-{run_dir.name}"


def build_queue(cfg: UnmaskConfig, run_dir: Path, version: int):
    """The replay queue actor, on the driver's node (the head under `ray job submit`): its spill files and ledger
    are in the run directory the driver reads, and a restarted queue finds them again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from driver.queue_actor import ReplayQueue

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = ReplayQueue.options(name=queue_name(run_dir), max_restarts=-1, scheduling_strategy=here).remote(
        cfg.queue, cfg.learner.groups_per_step, str(run_dir / "trajectories") if cfg.queue.spill else None)
    ray.get(queue.set_version.remote(version, rebase=True), timeout=CONTROL_TIMEOUT_S)
    log.info("replay queue: capacity %d groups, max_staleness %d, spill %s", cfg.queue.capacity_groups,
             cfg.queue.max_staleness, "on" if cfg.queue.spill else "off")
    return queue


def build_pool(cfg: UnmaskConfig, run_dir: Path, call_id: int):
    """The rollout pool at the size `unmask scale` last asked for (else ``rollout.num_workers``), its first
    workers placed; a run where none can be placed stops here in one line."""
    import ray

    from driver.pool import RolloutPool
    from driver.runtime import read_control, write_control
    from rollout.actor import RolloutWorker

    # The "weights" concurrency group: nccl broadcasts are received beside a running rollout.
    worker_cls = ray.remote(concurrency_groups={"weights": 1})(RolloutWorker).options(
        num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
        resources=cfg.rollout.resources or None, max_restarts=cfg.rollout.max_restarts, max_task_retries=0)
    seeds = itertools.count(cfg.run.seed * 7919 + call_id)
    needs = {"CPU": cfg.rollout.num_cpus_per_worker, "GPU": cfg.rollout.num_gpus_per_worker, **cfg.rollout.resources}
    name = queue_name(run_dir)
    pool = RolloutPool(lambda wid: worker_cls.remote(wid, cfg.model, cfg.sampler, cfg.task, cfg.rollout.group_size,
                                                     name, next(seeds), cfg.rollout.max_prompt_tokens,
                                                     cfg.rollout.eval_batch_tokens),
                       needs={k: float(v) for k, v in needs.items() if v})
    desired = read_control(run_dir).get("rollout_workers", cfg.rollout.num_workers)
    write_control(run_dir, rollout_workers=desired, stop=False)  # a resumed run forgets an old stop
    pool.resize(desired)
    pool.wait_ready(PLACEMENT_TIMEOUT_S)
    if desired and not pool.active():
        shortfall = pool.shortfall()
        pool.shutdown()
        raise RunError(f"no rollout worker could be placed in {PLACEMENT_TIMEOUT_S:.0f} s: {shortfall}; "
                       "lower rollout.num_cpus_per_worker / num_gpus_per_worker or add nodes")
    log.info("rollout pool: %d worker(s)%s", pool.size, f", {len(pool.pending)} waiting for resources" if pool.pending else "")
    return pool


def placement(queue, learner, pool) -> dict:
    """Which node each part landed on (metrics.jsonl event ``placement``)."""
    import ray

    return {"event": "placement", "driver": ray.get_runtime_context().get_node_id(),
            "queue": ray.get(queue.node_id.remote(), timeout=CONTROL_TIMEOUT_S), "learner": learner.node_ids(),
            "rollout": {wid: info.get("node") for wid, info in pool.info.items()}}
