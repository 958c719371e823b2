"""LearnerGroup: M ``LearnerRank`` Ray actors in one placement group and one torch.distributed group.

The driver holds one of these. Every method fans out to all ranks (they are collective) and returns
rank 0's answer.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from common.config import LearnerConfig, ModelConfig
from common.model import CheckpointError
from common.trajectory import Trajectory
from common.weights import WeightUpdate
from learner.checkpoint import read_meta, resolve_checkpoint

log = logging.getLogger("unmask.learner")

PLACEMENT_TIMEOUT_S = 120.0


def _strategy(bundles: list[dict[str, float]]) -> str:
    """STRICT_PACK (all ranks on one node: shared-memory collectives, one checkpoint disk) when one node fits them."""
    import ray

    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in {k for b in bundles for k in b}}  # custom ones too
    for node in ray.nodes():
        if node.get("Alive") and all(node["Resources"].get(k, 0.0) >= v for k, v in need.items() if v > 0):
            return "STRICT_PACK"
    return "PACK"


class LearnerGroup:
    """``step`` / ``save`` / ``load`` / ``export_hf`` / weight sync over M FSDP2 ranks."""

    def __init__(self, cfg: LearnerConfig, model_cfg: ModelConfig, *, loss_factory: Callable[[], object],
                 seed: int, ref_model: bool = False):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.worker import LearnerRank

        self.cfg, self.model_cfg = cfg, model_cfg
        bundle = {"CPU": cfg.num_cpus_per_rank}
        if cfg.num_gpus_per_rank > 0:
            bundle["GPU"] = cfg.num_gpus_per_rank
        bundle.update(cfg.resources)
        bundles = [dict(bundle) for _ in range(cfg.num_ranks)]
        strategy = _strategy(bundles)
        self._pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self._pg)
            raise RuntimeError(f"learner placement group ({cfg.num_ranks} x {bundle}, {strategy}) not schedulable in "
                               f"{PLACEMENT_TIMEOUT_S:.0f}s; cluster has {ray.cluster_resources()}: lower "
                               "learner.num_ranks or the per-rank CPUs/GPUs")
        actor_cls = ray.remote(LearnerRank)
        self._actors = [
            actor_cls.options(
                num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank, resources=cfg.resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
            ).remote(cfg, model_cfg, rank=rank, world_size=cfg.num_ranks, loss_factory=loss_factory, seed=seed,
                     ref_model=ref_model)
            for rank in range(cfg.num_ranks)
        ]
        master_addr, master_port = ray.get(self._actors[0].address.remote())
        self.info = self._all("setup", master_addr, master_port)
        self.version = 0
        log.info("learner group: %d ranks (%s), %s", cfg.num_ranks, strategy, self.info)

    def _all(self, method: str, *args, **kwargs):
        """Call ``method`` on every rank; rank 0's result."""
        import ray

        refs = [getattr(a, method).remote(*args, **kwargs) for a in self._actors]
        return ray.get(refs)[0]

    def step(self, batch, *, step_seed: int) -> dict[str, float]:
        """One optimizer step over the whole batch (a ``Trajectory`` or an ObjectRef of one); all-reduced metrics.

        Metric sums from the loss are summed over micro-batches and ranks; ``grad_norm``, ``lr``,
        ``step_time_s``, ``tokens_per_s``, ``skipped`` and ``version`` are added.
        """
        return self.step_result(self.step_refs(batch, step_seed=step_seed))

    def step_refs(self, batch, *, step_seed: int) -> list:
        """Start ``step`` on every rank and return at once: one ref per rank, for a caller's ``ray.wait``."""
        import ray

        ref = ray.put(batch) if isinstance(batch, Trajectory) else batch  # one copy in the store for M ranks
        return [a.step.remote(ref, step_seed) for a in self._actors]

    def step_result(self, refs: list) -> dict[str, float]:
        """The metrics of a step started with ``step_refs`` (rank 0's; they are all-reduced)."""
        import ray

        metrics = ray.get(refs)[0]
        self.version = int(metrics["version"])
        return metrics

    def save(self, root: str, run_state: dict | None = None) -> str:
        """Checkpoint into ``root/step_<version>`` (a filesystem every rank sees) with the caller's ``run_state``
        record; keeps the newest ``keep_checkpoints``."""
        return self._all("save", str(root), run_state or {})

    def load(self, path: str) -> dict:
        """Resume from a checkpoint directory (or the newest complete one under a root); returns its record.

        Works at any world size. Errors are one-line ``CheckpointError``s.
        """
        import ray

        directory = resolve_checkpoint(path)
        read_meta(directory)
        try:
            meta = self._all("load", str(directory))
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, CheckpointError):
                raise
            raise CheckpointError(" ".join(str(e.cause).split())) from None
        self.version = meta["version"]
        return meta

    def export_hf(self, directory: str) -> str:
        """Full policy weights (LoRA merged) in HF format, readable by ``common.model.load_pretrained``."""
        return self._all("export_hf", str(directory))

    def full_state(self) -> dict:
        """Unsharded model and optimizer state on CPU (tests and debugging)."""
        return self._all("full_state")

    def state_dict_for_sync(self) -> dict:
        """The tensors a weight sync sends (state-dict order, LoRA merged, rollout dtype) on CPU."""
        return self._all("state_dict_for_sync")

    def init_weight_sync(self, transport: str, num_receivers: int = 0) -> dict:
        """Build rank 0's sender; for nccl returns what receivers need (host, port, world_size, backend)."""
        return self._all("init_weight_sync", transport, num_receivers)

    def sync_weights(self, *, block: bool = True) -> WeightUpdate:
        """Send the current version; returns the ``WeightUpdate`` for rollout actors (metrics inside).

        With ``block=False`` returns an ObjectRef instead, so the driver can start nccl receivers alongside.
        """
        import ray

        refs = [a.sync_weights.remote() for a in self._actors]
        return ray.get(refs)[0] if block else refs[0]

    def node_ids(self) -> list[str]:
        """The Ray node of each rank."""
        import ray

        return ray.get([a.node_id.remote() for a in self._actors], timeout=60)

    def check_shared(self, path: str, token: str) -> list[str]:
        """The ranks that do not see ``path`` holding ``token`` (a file the driver just wrote), as 'ip: why'."""
        import ray

        answers = ray.get([a.reads.remote(path, token) for a in self._actors], timeout=60)
        return [a for a in answers if a is not None]

    def shutdown(self) -> None:
        """Tear down the ranks and release their placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([a.shutdown.remote() for a in self._actors], timeout=30)
        except ray.exceptions.RayActorError:
            pass  # a rank that already died has nothing to tear down; the others are killed below
        finally:
            for actor in self._actors:
                ray.kill(actor)
            remove_placement_group(self._pg)
