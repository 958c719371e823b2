"""`algorithm:` section: the policy-gradient estimator, one variant per loss."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from common.config.base import Section


class _PolicyGradient(Section):
    """Options every estimator shares."""

    clip_eps: float = Field(default=0.2, gt=0.0, description="PPO ratio clip (lower side, and upper if clip_eps_high unset).")
    clip_eps_high: float | None = Field(default=None, gt=0.0, description="Upper ratio clip (DAPO clip-higher).")
    beta_kl: float = Field(default=0.0, ge=0.0, description="Weight of the k3 KL to the frozen reference policy.")
    std_normalize: bool = Field(default=False, description="Divide group-relative advantages by the group std.")
    inner_epochs: int = Field(default=1, ge=1, description="Optimizer passes over each batch (mu).")


class AgrpoConfig(_PolicyGradient):
    """AGRPO: unbiased Monte-Carlo estimate of the policy gradient summed over denoising steps."""

    name: Literal["agrpo"] = "agrpo"
    k_steps: int = Field(default=4, ge=1, description="Denoising steps sampled per trajectory.")
    step_sampling: Literal["stratified", "uniform", "entropy"] = Field(
        default="stratified",
        description="uniform: i.i.d. uniform steps; stratified: one per equal stratum (lower variance); "
        "entropy: importance sampling proportional to summed entropy, reweighted to stay unbiased.",
    )


class AtpoConfig(_PolicyGradient):
    """ATPO: the same objective, with the k-step budget spent on high-scoring ("confused") steps."""

    name: Literal["atpo"] = "atpo"
    k_steps: int = Field(default=4, ge=1, description="Denoising steps per trajectory.")
    score: Literal["entropy", "cm", "roec", "hybrid"] = Field(
        default="hybrid", description="Per-step score: entropy, confidence-margin uncertainty, rate of entropy change, or RoEC+CM."
    )
    hybrid_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Weight of normalised RoEC in the hybrid score (CM gets 1 - w)."
    )
    selection: Literal["topk", "sample"] = Field(
        default="sample",
        description="topk: the k highest-scoring steps (biased); sample: draw steps proportional to score "
        "with importance weights (unbiased).",
    )
    score_floor: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Mixing weight of the uniform distribution in `sample`, keeping every step reachable."
    )
    batch_mix: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the batch-averaged per-step score profile mixed into each trajectory's own "
        "(normalised) scores; 0 uses only the trajectory's own scores.",
    )

    @model_validator(mode="after")
    def _reachable(self) -> "AtpoConfig":
        if self.selection == "sample" and self.score_floor <= 0.0:
            raise ValueError("selection 'sample' needs score_floor > 0 so every step stays reachable (unbiasedness)")
        return self


class DiffuGrpoConfig(_PolicyGradient):
    """diffu-GRPO (d1): one-pass per-token log-prob estimate with a randomly masked prompt; biased baseline."""

    name: Literal["diffu_grpo"] = "diffu_grpo"
    prompt_mask_prob: float = Field(default=0.15, ge=0.0, lt=1.0, description="Probability each prompt token is masked.")


AlgorithmConfig = Annotated[Union[AgrpoConfig, AtpoConfig, DiffuGrpoConfig], Field(discriminator="name")]
