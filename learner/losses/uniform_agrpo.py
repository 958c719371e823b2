"""AGRPO and ATPO on uniform-noise canvases (DiffusionGemma): the clipped-ratio policy gradient on the acting
steps of the real trajectory, each row's steps averaged (weight 1/T_i, as AGRPO's release; k of them drawn,
or ATPO's confused ones), rows averaged over the global batch. The score is ``learner.canvas_steps.step_logps``: exact (the self-conditioning chain with
its gradient) or the stop-gradient surrogate; definitions and the measured bias: docs/ALGORITHMS.md.

Letters: B samples, K canvases, S steps per canvas, C canvas length.
"""
from __future__ import annotations

import torch

from common.model.dgemma.modeling import UniformDecoding
from common.model.dgemma.record import CanvasRecord
from common.trajectory import Trajectory
from learner.canvas_steps import acting_steps, backward_by_prompt_length, idle_step_logps, step_logps
from learner.losses import steps as step_sel
from learner.losses.agrpo import _epoch_seed
from learner.losses.base import MetricSums, PolicyLoss, clipped_pg, per_sample_extra


def _terms(model, prompt_ids_BP, rec: CanvasRecord, d: UniformDecoding, advantages_B, exact: bool, clip_low: float,
           clip_high: float, weights_BKS: torch.Tensor | None = None, passes_KS: torch.Tensor | None = None):
    """Per-row loss (the ``weights_BKS``-weighted sum over the scored steps; default the mean over the acting steps)
    and the scored steps' ratio, low- and high-clipped flags. ``passes_KS``: ``step_logps``'s."""
    acting_BKS = acting_steps(rec.active)
    if weights_BKS is None:
        weights_BKS = acting_BKS / acting_BKS.sum((1, 2), keepdim=True).clamp(min=1)
    scored_BKS = weights_BKS > 0
    logp_BKS = step_logps(model, prompt_ids_BP, rec, d, exact=exact, scored=scored_BKS, passes_KS=passes_KS)
    # unscored steps at ratio 1: zero weight times an overflowed ratio would be NaN
    logp_BKS = torch.where(scored_BKS, logp_BKS, rec.logp)
    adv_BKS = advantages_B.float()[:, None, None].expand_as(logp_BKS)
    loss_BKS, ratio_BKS, low, high = clipped_pg(logp_BKS, rec.logp, adv_BKS, clip_low, clip_high)
    per_row_B = (loss_BKS * weights_BKS).sum((1, 2))
    return per_row_B, ratio_BKS[scored_BKS], low[scored_BKS], high[scored_BKS]


def uniform_agrpo_loss(model, prompt_ids_BP: torch.Tensor, rec: CanvasRecord, d: UniformDecoding,
                       advantages_B: torch.Tensor, *, total_samples: int, exact: bool = True,
                       clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of these rows (already divided by ``total_samples``) and its ratio statistics."""
    per_row_B, ratio_N, low_N, high_N = _terms(model, prompt_ids_BP, rec, d, advantages_B, exact, clip_low, clip_high)
    metrics = {"ratio_mean": float(ratio_N.mean()) if ratio_N.numel() else 1.0,
               "ratio_max_dev": float((ratio_N - 1).abs().max()) if ratio_N.numel() else 0.0,
               "clipped_frac": float((low_N | high_N).float().mean()) if ratio_N.numel() else 0.0}
    return per_row_B.sum() / total_samples, metrics


def canvas_record(micro: Trajectory, rows: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, CanvasRecord]:
    """The unpadded prompts [b, prompt_len] and the ``CanvasRecord`` of ``rows`` of a canvas batch (the sampler
    decoded each prompt without padding: ``rollout.uniform_sampler.generate_canvases``)."""
    prompt = micro.prompt_ids_BP[rows, micro.prompt_ids_BP.shape[1] - prompt_len:]
    return prompt, CanvasRecord(
        canvas=micro.extras["canvas_BKSC"][rows], draws=micro.extras["draws_BKSC"][rows],
        accepted=micro.extras["accepted_BKSC"][rows], active=per_sample_extra(micro, "active_BKS")[rows],
        logp=micro.extras["step_logp_BKS"][rows],
        sequences=torch.cat([prompt, micro.completion_ids_BG[rows]], 1), prompt_mask=None)


class UniformStepLoss(PolicyLoss):
    """AGRPO / ATPO on canvases behind the learner's interface: ``prepare`` adds group advantages and the weighted
    steps each row is scored at (``select_steps``: the masked families' selectors over the acting steps, T = K x S;
    weights summing, in expectation, to each acting step's 1/T_i of AGRPO's mean), ``backward`` rebuilds each prompt
    length's rows (one encoder cache each) and backpropagates their share, in step with the other learner ranks
    (``learner.canvas_steps.backward_by_prompt_length``)."""

    def select_steps(self, batch: Trajectory, eligible_BT: torch.Tensor, gen: torch.Generator):
        raise NotImplementedError

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        if "canvas_BKSC" not in batch.extras:
            raise ValueError("algorithm on canvases got a batch without a canvas record: the rollouts were not made "
                             "by the uniform-noise sampler (a DiffusionGemma policy)")
        B, K, S = batch.extras["active_BKS"].shape
        eligible_BT = acting_steps(batch.extras["active_BKS"]).reshape(B, K * S).cpu()
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        steps_BK, weights_BK = self.select_steps(batch, eligible_BT, gen)
        if self.cfg.normalize == "step_mean":
            weights_BK = weights_BK / eligible_BT.sum(1, keepdim=True).clamp(min=1)
        w_BT = torch.zeros(B, K * S, dtype=torch.float32)
        w_BT.scatter_add_(1, steps_BK.clamp(min=0), torch.where(steps_BK >= 0, weights_BK, 0.0))
        out = batch.select(slice(None))
        out.extras = {**batch.extras, "advantages_B": self._advantages(batch),
                      "step_weights_BKS": w_BT.reshape(B, K, S).to(batch.completion_ids_BG.device)}
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        t_min, t_max = micro.extras["canvas_t_range"]
        S = micro.extras["canvas_BKSC"].shape[2]
        d = UniformDecoding(steps=S, t_min=t_min, t_max=t_max)
        exact = self.cfg.canvas_score == "exact"
        advantages_B = per_sample_extra(micro, "advantages_B")
        weights_BKS = per_sample_extra(micro, "step_weights_BKS")
        ratios, lows, highs = [], [], []

        def plan(rows):
            passes_KS = (weights_BKS[rows] > 0).any(0)  # the steps these rows are scored at
            passes_KS[0, 0] |= not passes_KS.any()  # none: one unscored pass, so every micro-batch backpropagates
            return passes_KS

        def loss(n, rows, passes_KS):
            prompt, rec = canvas_record(micro, rows, n)
            per_row, ratio_N, low_N, high_N = _terms(model, prompt, rec, d, advantages_B[rows], exact, self.clip_low,
                                                     self.clip_high, weights_BKS[rows], passes_KS)
            ratios.append(ratio_N), lows.append(low_N), highs.append(high_N)
            return per_row.sum() / total_samples

        m = MetricSums()
        m.add("loss", backward_by_prompt_length(micro, plan, loss, lambda p: idle_step_logps(model, p, d, exact),
                                                before_backward))
        m.add("samples", len(micro))
        m.add("steps", (weights_BKS > 0).sum())
        m.token_stats(torch.cat(ratios), torch.cat(lows), torch.cat(highs))
        return m.result()


class UniformAgrpoLoss(UniformStepLoss):
    """AGRPO's k steps over the acting steps: uniform, stratified (every step once when k >= T_i: the exact
    mean) or proportional to the step's mean entropy, importance-weighted; unbiased."""

    def select_steps(self, batch, eligible_BT, gen):
        def entropy_probs():  # each acting step's recorded mean entropy; a floor keeps every one reachable
            h_BT = batch.step_entropy_BT.detach().cpu().double() * eligible_BT
            floor_B = 1e-6 * h_BT.sum(1) / eligible_BT.sum(1).clamp(min=1) + 1e-12
            return (h_BT + floor_B[:, None]) * eligible_BT

        return step_sel.agrpo_steps(self.cfg.step_sampling, eligible_BT, self.cfg.k_steps, gen, entropy_probs)


class UniformAtpoLoss(UniformStepLoss):
    """ATPO's budget on the confused canvas steps: its scores from each step's mean entropy and margin (RoEC is
    0 at a canvas's first step), top-k (biased) or sampled with importance weights (unbiased)."""

    def select_steps(self, batch, eligible_BT, gen):
        B, K, S = batch.extras["active_BKS"].shape
        canvas_BT = torch.arange(K).repeat_interleave(S).expand(B, K * S)
        scores_BT = step_sel.atpo_step_scores(batch.step_entropy_BT, batch.step_margin_BT, canvas_BT, eligible_BT,
                                              score=self.cfg.score, hybrid_weight=self.cfg.hybrid_weight,
                                              batch_mix=self.cfg.batch_mix)
        if self.cfg.selection == "topk":
            return step_sel.topk_steps(scores_BT, eligible_BT, self.cfg.k_steps)
        probs_BT = step_sel.score_sampling_probs(scores_BT, eligible_BT, self.cfg.score_floor)
        return step_sel.proportional_steps(probs_BT, self.cfg.k_steps, gen)
