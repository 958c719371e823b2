"""`algorithm:` section: the policy-gradient estimator, one variant per loss."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from common.config.base import Section


class _Estimator(Section):
    """Options every estimator shares."""

    std_normalize: bool = Field(default=False, description="Divide group-relative advantages by the group std.")
    inner_epochs: int = Field(
        default=1, ge=1,
        description="Optimizer steps per batch (mu): agrpo/atpo draw fresh steps each time (old log-probs are the "
        "behaviour ones); diffu_grpo and the masked surrogates draw new masks each time (old values of every mask "
        "are taken from the policy before the batch's first step, as d1 does). The LR schedule counts batches.",
    )


class _PolicyGradient(_Estimator):
    """Options of the estimators with a PPO-clipped ratio and an optional KL to a reference policy."""

    clip_eps: float = Field(default=0.2, gt=0.0, description="PPO ratio clip (lower side, and upper if clip_eps_high unset).")
    clip_eps_high: float | None = Field(default=None, gt=0.0, description="Upper ratio clip (DAPO clip-higher).")
    beta_kl: float = Field(default=0.0, ge=0.0, description="Weight of the k3 KL to the frozen reference policy.")
    kl: Literal["k3_ratio", "k3"] = Field(
        default="k3_ratio",
        description="KL penalty per scored token: k3_ratio = k3 x ratio (AGRPO's release; its gradient is that of "
        "KL(pi || ref) under the behaviour samples); k3 = k3 alone (d1; its gradient is that of KL(ref || pi)).",
    )


class _Decoupled(_PolicyGradient):
    """The off-policy correction of the estimators that score per-draw ratios at rebuilt steps (agrpo, atpo,
    justgrpo)."""

    correction: Literal["none", "decoupled"] = Field(
        default="none",
        description="Off-policy correction of groups sampled by an older policy (queue.max_staleness > 0): none = "
        "the PPO ratio against the behaviour log-probs both corrects and clips; decoupled = clip against the "
        "proximal policy (the learner's at the step's start) and weight each draw by pi_prox/pi_behav truncated at "
        "is_weight_cap (AReaL's decoupled PPO; docs/ALGORITHMS.md). Groups with lag 0 train the same either way.",
    )
    is_weight_cap: float = Field(
        default=2.0, ge=1.0,
        description="Truncation of the decoupled importance weights pi_prox/pi_behav (also the threshold of the "
        "is_truncated_share metric under correction none).",
    )

    @model_validator(mode="after")
    def _one_epoch_for_decoupled(self) -> "_Decoupled":
        if self.correction == "decoupled" and self.inner_epochs != 1:
            raise ValueError("correction 'decoupled' takes the proximal log-probs from inner epoch 0's forward: set "
                             "inner_epochs 1 (later epochs' steps would need a pass of their own at the old weights)")
        return self


class _Stepwise(_Decoupled):
    """Options of the estimators that score the sampler's actions at k denoising steps (agrpo, atpo)."""

    k_steps: int = Field(default=4, ge=1, description="Denoising steps per trajectory.")
    canvas_score: Literal["exact", "stop_gradient"] = Field(
        default="exact",
        description="Uniform-noise canvases (DiffusionGemma): 'exact' carries the gradient through the "
        "self-conditioning logits of earlier steps (the policy gradient); 'stop_gradient' detaches them (a biased "
        "surrogate, cheaper in the backward: docs/ALGORITHMS.md).",
    )
    draws: Literal["auto", "all", "committed", "rao_blackwell"] = Field(
        default="auto",
        description="Which draws of a step make its action: all = every token drawn at the block's still-masked "
        "positions, committed or discarded (the exact score function under any commit rule); committed = the "
        "committed tokens only (exact only when the commit rule ignores the draws: random, margin or entropy "
        "remasking without a threshold or EOS demotion; biased otherwise); auto = committed where that is exact "
        "(lower variance), all elsewhere (the trajectory's commit_reads_draws); rao_blackwell = the committed "
        "tokens and, for each discarded draw, the mass of the tokens that would have left it uncommitted (exact "
        "and no noisier than all, for plain low_confidence remasking: common/rao_blackwell.py).",
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


class _NoKl(_Estimator):
    """Estimators whose public loss has no KL term (the field keeps `algorithm.beta_kl` readable everywhere)."""

    beta_kl: float = Field(default=0.0, ge=0.0, le=0.0, description="No KL term in this estimator's public loss: 0.")


class Wd1Config(_NoKl):
    """wd1: ratio-free weighted likelihood of the one-pass (d1) log-prob, weights softmax(A) and softmax(-A) in
    the group (xiaohangt/wd1 `RevDiffuGRPOTrainer`)."""

    name: Literal["wd1"] = "wd1"
    negative: bool = Field(
        default=True,
        description="Also push down the likelihood with weights softmax(-A) (wd1's `wll_d1_neg`, the paper's "
        "method); false keeps only the positive term softmax(A) (`wll_d1_pos_only`).",
    )
    prompt_mask_prob: float = Field(default=0.15, ge=0.0, lt=1.0, description="Probability each prompt token is masked (p_mask_prompt).")
    mask_per_epoch: bool = Field(
        default=True,
        description="Draw a new prompt mask at every inner epoch (random_masking: true); false reuses epoch 0's.",
    )
    inner_epochs: int = Field(default=12, ge=1, description="Optimizer steps per batch (num_iterations; 12 in wd1's scripts).")


class _LooAdvantage(Section):
    """The leave-one-out baseline DiffuCoder and ESPO hard-code (`leave_one_out = True`)."""

    baseline: Literal["leave_one_out", "mean"] = Field(
        default="leave_one_out",
        description="Group baseline of the advantage: leave_one_out = r_i minus the mean of the group's other "
        "rewards (the public code's); mean = r_i minus the group mean. std_normalize divides by the group's "
        "unbiased std + 1e-4 (the public code's scale_rewards).",
    )


class CoupledGrpoConfig(_PolicyGradient, _LooAdvantage):
    """coupled-GRPO (DiffuCoder): per-token log-prob = mean of a fully masked pass and a complementary pair of
    masks (ratio t and 1 - t) weighted 1/t, 1/(1-t); PPO-clip + beta k3 (apple/ml-diffucoder `coupled_grpo.py`)."""

    name: Literal["coupled_grpo"] = "coupled_grpo"
    clip_eps: float = Field(default=0.5, gt=0.0, description="PPO ratio clip (epsilon; 0.5 in DiffuCoder's recipe).")
    beta_kl: float = Field(default=0.01, ge=0.0, description="Weight of the per-token k3 KL to the reference (0.01 in the recipe).")
    kl: Literal["k3"] = Field(default="k3", description="KL penalty per token: k3 on the coupled log-probs (the public code's).")
    inner_epochs: int = Field(default=2, ge=1, description="Optimizer steps per batch (num_iterations; 2 in the recipe).")
    mask_ratio_min: float = Field(default=0.2, gt=0.0, lt=1.0, description="Lower end of the uniform mask ratio t (0.2, hard-coded there).")
    mask_ratio_max: float = Field(default=0.8, gt=0.0, lt=1.0, description="Upper end of the uniform mask ratio t (0.8, hard-coded there).")
    mask_per_epoch: bool = Field(default=True, description="New masks at every inner epoch (random_masking: true); false reuses epoch 0's.")

    @model_validator(mode="after")
    def _ratio_range(self) -> "CoupledGrpoConfig":
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError(f"mask_ratio_min {self.mask_ratio_min} > mask_ratio_max {self.mask_ratio_max}")
        return self


class SpgConfig(_NoKl):
    """SPG: sandwiched policy gradient, -A x (ELBO for A > 0, an upper bound or a mix for A <= 0), Monte-Carlo
    over block-wise masks; no ratio (facebookresearch/SPG `spg_trainer.py`)."""

    name: Literal["spg"] = "spg"
    negative_bound: Literal["mix", "eubo", "elbo", "zero"] = Field(
        default="mix",
        description="Likelihood estimate of the samples with A <= 0 (logp_estimation): eubo = the upper bound "
        "log(mean_t p^beta / t)/beta; mix = mix_weight x eubo + (1 - mix_weight) x ELBO (the paper's best, "
        "`SPG w/ Mixture`); elbo = the ELBO as for A > 0; zero = no term.",
    )
    eubo_beta: float = Field(default=1.5, gt=0.0, description="beta of the upper bound (1.5 GSM8K/MATH, 2.0 Countdown, 1.0 Sudoku in the scripts).")
    mix_weight: float = Field(default=0.5, ge=0.0, le=1.0, description="Weight of the upper bound in `mix`.")
    masking: Literal["block_random", "block_all", "random", "all"] = Field(
        default="block_random",
        description="forward_type: block_random = a random block of the completion (within its EOS-bounded "
        "blocks) is partly masked, every later block fully, earlier ones kept (the scripts'); block_all = that "
        "block fully masked too; random = a uniform number of completion tokens at random positions; all = the "
        "whole completion (num_t must be 1).",
    )
    num_t: int = Field(default=2, ge=1, description="Masks per sample (Monte-Carlo draws of t; 2 in the scripts).")
    min_t: float = Field(default=0.0, ge=0.0, le=1.0, description="Smallest masked fraction of the chosen block (random: of the completion).")
    max_t: float = Field(default=1.0, ge=0.0, le=1.0, description="Largest masked fraction of the chosen block (random: of the completion).")
    block_length: int | None = Field(
        default=None, ge=1, description="Masking block length; None = the rollout's sampler block length (the public code's)."
    )
    prompt_mask_prob: float = Field(
        default=0.15, ge=0.0, lt=1.0,
        description="Probability each still-clean token is masked too (p_mask_prompt with use_mask_prompt; under "
        "block masking this includes the completion blocks before the chosen one, as the public code does).",
    )
    mask_per_epoch: bool = Field(default=True, description="New masks at every inner epoch (random_masking: true); false reuses epoch 0's.")
    inner_epochs: int = Field(default=4, ge=1, description="Optimizer steps per batch (num_iterations; 4 in the Countdown scripts).")

    @model_validator(mode="after")
    def _masks(self) -> "SpgConfig":
        if self.masking == "all" and self.num_t != 1:
            raise ValueError("masking 'all' has one mask per sample: num_t must be 1")
        if self.min_t > self.max_t:
            raise ValueError(f"min_t {self.min_t} > max_t {self.max_t}")
        return self


class EspoConfig(_PolicyGradient, _LooAdvantage):
    """ESPO: one PPO-clipped ratio per sequence, exp((ELBO - ELBO_old) / G), ELBO from stratified mask counts
    with the complementary mask; beta x k2 of the ELBOs (ML-GSAI/ESPO `espo_trainer.py`)."""

    name: Literal["espo"] = "espo"
    clip_eps: float = Field(default=0.2, ge=0.0, description="Sequence-ratio clip (epsilon; 0.2 in train.yaml, 0 in the Countdown script).")
    beta_kl: float = Field(default=0.01, ge=0.0, description="Weight of the k2 KL of the sequence ELBOs, per token (0.01 in train.yaml).")
    kl: Literal["k2"] = Field(default="k2", description="(ELBO - ELBO_ref)^2 / 2 per sequence, over G (the public loss's).")
    inner_epochs: int = Field(default=2, ge=1, description="Optimizer steps per batch (num_iterations; 2 in train.yaml).")
    num_mc: int = Field(default=1, ge=1, description="Monte-Carlo mask draws per ELBO (1 in train.yaml, 2 in the Countdown script).")
    coupled: bool = Field(
        default=True,
        description="Add the complementary-mask pass (reduce_var; always on in the public code, whose flag is not "
        "passed through); false scores only the drawn mask.",
    )


class BgpoConfig(_PolicyGradient):
    """BGPO (boundary-guided): per Monte-Carlo mask, the ELBO over the completion up to its first EOS; the ratio
    of each mask's ELBO / G to its old value is replaced by a bound (1 + d for A > 0, exp(d) for A <= 0) so the
    loss is a sum over masks, one backward each (yjyddq/DARE `llada_dp_actor_bgpo.py`, `compute_policy_loss_bgpo`)."""

    name: Literal["bgpo"] = "bgpo"
    std_normalize: bool = Field(
        default=True, description="Divide group advantages by the group's unbiased std + 1e-6 (verl's GRPO, "
        "norm_adv_by_std_in_grpo: true).")
    beta_kl: float = Field(default=0.0, ge=0.0, le=0.0, description="No KL term (use_kl_loss: false in every DARE BGPO recipe): 0.")
    dual_clip: float = Field(
        default=3.0, gt=1.0,
        description="Dual-clip bound c for A < 0: a mask's loss is at most -A c (clip_ratio_c, 3.0 in verl).")
    num_mc: int = Field(default=16, ge=1, description="Monte-Carlo masks per sample (mc_num; 16 in DARE's recipes), one forward + backward each.")
    strata: int = Field(
        default=16, ge=1,
        description="Masks whose masked counts are stratified together (n_l; 16 in the recipes): num_mc / strata "
        "independent groups, each with counts x_m = ((round(k + m n / strata) - 1) mod n) + 1, k ~ U{1..n}, "
        "n = the sample's tokens up to its first EOS.",
    )
    normalize: Literal["token_mean", "sample_mean"] = Field(
        default="token_mean",
        description="token_mean: each sample weighted by its tokens up to the first EOS over the batch's (verl's "
        "loss_agg_mode token-mean, the recipes'); sample_mean: every sample alike (seq-mean-token-mean).",
    )
    mask_per_epoch: bool = Field(
        default=False, description="New masks at every inner epoch; false (DARE: forward_process runs once per batch) reuses epoch 0's.")

    @model_validator(mode="after")
    def _whole_strata(self) -> "BgpoConfig":
        if self.num_mc % self.strata:
            raise ValueError(f"num_mc {self.num_mc} must be a multiple of strata {self.strata} (n_l)")
        return self


class TraceRLConfig(_PolicyGradient):
    """TraceRL (Gen-Verse/dLLM-RL `train/rl_sdar.py`, `train/rl_llada.py`): PPO-clip on the committed tokens of
    every (group of) denoising step(s) of the trajectory, each scored at the state before its step; ratio and KL
    against the policy before the batch's updates."""

    name: Literal["tracerl"] = "tracerl"
    std_normalize: bool = Field(
        default=True, description="Group z-score advantages with the population std, 0 where it is 0 (rl_reward.py).")
    beta_kl: float = Field(
        default=0.01, ge=0.0,
        description="Weight of the k3 KL to the policy before this batch's updates (beta; not a reference model: its "
        "gradient is 0 in the first inner epoch).")
    kl: Literal["k3"] = Field(default="k3", description="k3 (use_kl_estimator_k3: true).")
    variant: Literal["sdar", "llada"] = Field(
        default="sdar",
        description="Which public script's loss: sdar (rl_sdar.py, block-causal models): shrink within each block, "
        "each token and its KL divided by G, rows = denoising rounds over all blocks; llada (rl_llada.py): shrink "
        "over the whole completion, each step's tokens averaged, its KL summed, rows = steps.",
    )
    shrink: int = Field(
        default=1, ge=1,
        description="Consecutive denoising steps merged into one, scored together at the state before the first of "
        "them (1 in rl_sdar.yaml, the exact trajectory; 8 in rl_llada.yaml).")
    post_num: int | None = Field(
        default=0, ge=0,
        description="Padding tokens (after the first EOS) kept in the loss: the first post_num of them; None keeps all.")


class JustGrpoConfig(_Decoupled):
    """JustGRPO (LeapLabTHU/JustGRPO `grpo.py`): GRPO on left-to-right decoding, one token a step, with each
    token's exact autoregressive likelihood; needs ``sampler.remasking: sequential`` and steps = gen_length."""

    name: Literal["justgrpo"] = "justgrpo"
    std_normalize: bool = Field(
        default=True, description="Divide group advantages by the group's unbiased std + 1e-4 (compute_group_advantages).")
    beta_kl: float = Field(default=0.0, ge=0.0, le=0.0, description="No KL term in JustGRPO's loss: 0.")
    draws: Literal["auto", "committed"] = Field(
        default="auto", description="The committed token is the whole action of a sequential step (the rule reads no draw).")


AlgorithmConfig = Annotated[
    Union[AgrpoConfig, AtpoConfig, DiffuGrpoConfig, Wd1Config, CoupledGrpoConfig, SpgConfig, EspoConfig, BgpoConfig,
          TraceRLConfig, JustGrpoConfig],
    Field(discriminator="name"),
]
