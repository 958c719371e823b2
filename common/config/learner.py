"""`learner:` section: the FSDP2 learner group, optimizer and checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import Section


class LoraConfig(Section):
    """Low-rank adapters; when enabled only adapters train (and, over a checkpoint base, only adapters sync)."""

    enabled: bool = Field(default=False, description="Train LoRA adapters instead of the full model.")
    r: int = Field(default=64, ge=1, description="Adapter rank.")
    alpha: float = Field(default=64.0, gt=0.0, description="Adapter scale numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    sync_adapters: bool = Field(
        default=True,
        description="Weight syncs send only the adapters (LLaDA-8B at r=64: 0.67 GB in fp32 instead of 16 GB of "
        "bf16 weights) and rollout actors merge W0 + scale*B@A into the base they loaded; needs model.path "
        "(a random preset base syncs merged weights).")
    target_modules: list[str] | None = Field(
        default=None,
        description="Linear layers inside each block that get adapters (dotted paths, e.g. 'self_attn.q_proj'); "
        "None: the model family's defaults, every attention and MLP projection (LLaDA: q_proj, k_proj, v_proj, "
        "attn_out, ff_proj, up_proj, ff_out; Dream/SDAR: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj).",
    )


class LearnerConfig(Section):
    """Learner ranks, optimization and checkpointing."""

    num_ranks: int = Field(default=1, ge=1, description="Learner ranks (Ray actors in one torch.distributed group).")
    num_gpus_per_rank: float = Field(default=0.0, ge=0.0, description="GPUs per learner rank.")
    num_cpus_per_rank: float = Field(default=1.0, gt=0.0, description="CPUs per learner rank.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per learner rank (e.g. {learner: 1}).")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed backend; auto picks nccl with GPUs, gloo without."
    )
    groups_per_step: int = Field(default=4, ge=1, description="Prompt groups consumed per optimizer step.")
    micro_batch_tokens: int = Field(
        default=4096, ge=1, description="Token budget of one micro-batch (sequences x length)."
    )
    reduce_every_backward: bool = Field(
        default=False,
        description="Reduce-scatter gradients after every backward (K sampled steps x micro-batches times per "
        "step) instead of once per optimizer step. Off, each rank keeps an unsharded gradient accumulator of "
        "the trained parameters in the reduce dtype (0.6 GiB for LLaDA-8B LoRA r=64, 30 GiB for its full "
        "fine-tuning: benchmarks/results/memory_plan.md); on, that memory is saved for K x M times the collectives.")
    lr: float = Field(default=1e-5, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.99), description="AdamW betas.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine"] = Field(default="constant", description="LR schedule after warm-up.")
    decay_steps: int = Field(
        default=1000, ge=1, description="Cosine schedule: optimizer steps after warm-up over which the LR decays."
    )
    min_lr_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Cosine schedule: final LR as a fraction of `lr`."
    )
    grad_clip: float = Field(default=1.0, gt=0.0, description="Global gradient-norm clip.")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="FSDP2 mixed-precision parameter dtype."
    )
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="FSDP2 gradient reduce dtype."
    )
    routing: Literal["replay", "recompute"] = Field(
        default="replay",
        description="Mixtures of experts whose rollouts recorded their routing (sampler.record_routing): 'replay' "
        "runs each token on the experts the sampler chose (the gate weights recomputed, so the router still "
        "learns); 'recompute' lets the learner's router choose again.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Low-rank adapters.")
    weight_transport: Literal["auto", "nccl", "cuda_ipc", "object_store"] = Field(
        default="auto",
        description="How weights reach rollout actors: auto picks nccl when both sides have GPUs, object_store "
        "on CPU; cuda_ipc when learner and rollout actors share one GPU (fractional num_gpus).",
    )
    checkpoint_every: int = Field(default=0, ge=0, description="Save a checkpoint every n steps (0: only at the end).")
    sync_bucket_mb: int = Field(
        default=256, ge=1, description="nccl weight sync: size of each of the two flat broadcast buffers (MiB)."
    )
    sync_timeout_s: float = Field(
        default=120.0, gt=0.0,
        description="nccl weight sync: how long the group's rendezvous or one bucket may take before the "
        "broadcast fails and the driver rebuilds the group without the member that left.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept on disk.")
    max_bad_steps: int = Field(
        default=3, ge=1, description="Consecutive NaN/Inf steps tolerated (skipped) before the run stops."
    )

    @model_validator(mode="after")
    def _backend(self) -> "LearnerConfig":
        if self.backend == "nccl" and self.num_gpus_per_rank == 0:
            raise ValueError("backend nccl needs learner.num_gpus_per_rank > 0")
        return self
