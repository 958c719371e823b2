"""`rollout:` section: the pool of rollout actors."""
from __future__ import annotations

from pydantic import Field, model_validator

from common.config.base import Section


class RolloutConfig(Section):
    """How many rollout actors run, what each one holds, and how much each generates per call."""

    num_workers: int = Field(default=1, ge=0, description="Rollout actors; changeable while running (`unmask scale`).")
    num_gpus_per_worker: float = Field(
        default=0.0, ge=0.0, description="GPUs per rollout actor (fractional to share a GPU with the learner; then learner.weight_transport=cuda_ipc)."
    )
    num_cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs per rollout actor.")
    group_size: int = Field(default=8, ge=2, description="Samples per prompt (G); advantages are group-relative.")
    prompts_per_call: int = Field(
        default=4, ge=1, description="Prompts a worker generates per `generate` call (batch = prompts x group_size)."
    )
    max_prompt_tokens: int = Field(
        default=256, ge=1, description="Prompts longer than this are rejected with a logged reason."
    )
    eval_batch_tokens: int = Field(
        default=32768, ge=1,
        description="Token budget of one evaluation batch (sequences x (longest prompt + gen_length)): held-out "
        "items are decoded in as many batches as it takes, by rollout workers and by `unmask eval` alike.")
    max_restarts: int = Field(default=3, ge=0, description="Ray restarts of a rollout actor that died.")
    prefetch_weights: bool = Field(
        default=True,
        description="object_store / cuda_ipc weight syncs: each worker copies a new version into a second copy of "
        "the weights on its weights thread while its current rollout runs, so the swap between rollouts is a device "
        "copy (the nccl transport always stages so). Costs one more copy of the weights per worker (16 GB for an "
        "8B model in bf16); false receives between rollouts instead.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per rollout actor (e.g. {rollout: 1}) so the autoscaler adds rollout "
        "nodes, never learner nodes, for them.")
    follow_cluster: bool = Field(
        default=False,
        description="Size the pool to the rollout capacity of the cluster's live nodes (how many workers their "
        "`resources` hold), so nodes the Ray autoscaler adds or removes grow or shrink it; num_workers (or "
        "`unmask scale`) is then the minimum.")
    max_workers: int | None = Field(default=None, ge=1, description="Ceiling of the pool when follow_cluster is on.")

    @model_validator(mode="after")
    def _follow(self) -> "RolloutConfig":
        if self.follow_cluster and not self.resources:
            raise ValueError("follow_cluster needs rollout.resources to name a custom resource the rollout nodes "
                             "carry (e.g. {rollout: 1}), so their capacity can be counted")
        return self
