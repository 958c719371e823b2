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
    inner_epochs: int = Field(
        default=1, ge=1,
        description="Optimizer steps per batch (mu): agrpo/atpo draw fresh steps each time (old log-probs are the "
        "behaviour ones); diffu_grpo draws a new prompt mask each time (old log-probs of every mask are taken "
        "from the policy before the batch's first step, as d1 does). The LR schedule counts batches.",
    )
    kl: Literal["k3_ratio", "k3"] = Field(
        default="k3_ratio",
        description="KL penalty per scored token: k3_ratio = k3 x ratio (AGRPO's release; its gradient is that of "
        "KL(pi || ref) under the behaviour samples); k3 = k3 alone (d1; its gradient is that of KL(ref || pi)).",
    )


class _Stepwise(_PolicyGradient):
    """Options of the estimators that score the sampler's actions at k denoising steps (agrpo, atpo)."""

    k_steps: int = Field(default=4, ge=1, description="Denoising steps per trajectory.")
    draws: Literal["auto", "all", "committed"] = Field(
        default="auto",
        description="Which draws of a step make its action: all = every token drawn at the block's still-masked "
        "positions, committed or discarded (the exact score function under any commit rule); committed = the "
        "committed tokens only (exact only when the commit rule ignores the draws: random, margin or entropy "
        "remasking without a threshold or EOS demotion; biased otherwise); auto = committed where that is exact "
        "(lower variance), all elsewhere (the trajectory's commit_reads_draws).",
    )
    normalize: Literal["step_mean", "sum"] = Field(
        default="step_mean",
        description="step_mean: each trajectory's loss is the mean over its eligible steps (1/T_i per step; "
        "AGRPO's release); sum: the sum over them (longer trajectories weigh more).",
    )
    eligible_steps: Literal["through_last", "non_eos", "all"] = Field(
        default="through_last",
        description="Steps whose actions are scored: through_last = every step up to the last one that drew a "
        "non-EOS token (AGRPO's release); non_eos = only steps that drew a non-EOS token; all = every step that "
        "drew a token (the only exact choice: the others drop the EOS-only steps' terms).",
    )


class AgrpoConfig(_Stepwise):
    """AGRPO: Monte-Carlo estimate of the policy gradient over denoising steps from k sampled steps."""

    name: Literal["agrpo"] = "agrpo"
    step_sampling: Literal["stratified", "uniform", "entropy"] = Field(
        default="stratified",
        description="uniform: i.i.d. uniform steps; stratified: one per equal stratum (lower variance); "
        "entropy: importance sampling proportional to summed entropy, reweighted to stay unbiased.",
    )


class AtpoConfig(_Stepwise):
    """ATPO: the same objective, with the k-step budget spent on high-scoring ("confused") steps."""

    name: Literal["atpo"] = "atpo"
    score: Literal["entropy", "cm", "roec", "hybrid"] = Field(
        default="hybrid", description="Per-step score: entropy, confidence-margin uncertainty, rate of entropy change, or RoEC+CM."
    )
    hybrid_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Weight of normalised RoEC in the hybrid score (CM gets 1 - w)."
    )
    selection: Literal["topk", "sample"] = Field(
        default="topk",
        description="topk: the k highest-scoring steps (the paper's reallocation of the gradient budget; biased "
        "by design); sample: draw steps proportional to score with importance weights (unbiased, so AGRPO in "
        "expectation: only the variance differs).",
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
    kl: Literal["k3_ratio", "k3"] = Field(default="k3", description="KL penalty per token: k3 (d1's) or k3 x ratio.")
    normalize: Literal["token_mean", "sample_mean"] = Field(
        default="token_mean",
        description="token_mean: the loss is the mean over the batch's scored tokens (d1; divided by the whole "
        "batch's count, so micro-batching does not change it); sample_mean: mean per sample, then over samples.",
    )


AlgorithmConfig = Annotated[Union[AgrpoConfig, AtpoConfig, DiffuGrpoConfig], Field(discriminator="name")]
