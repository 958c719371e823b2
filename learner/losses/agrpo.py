"""AGRPO: an unbiased Monte-Carlo estimate of  E[A(tau) * sum_t grad log pi(a_t | s_t)]  from k steps
per trajectory (definitions and the unbiasedness argument: docs/ALGORITHMS.md).

Letters: B samples, P prompt length, G completion length, T steps, K steps drawn per sample,
N gathered token rows, V vocabulary.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses import steps as step_sel
from learner.losses.base import (
    MetricSums,
    PolicyLoss,
    clipped_pg,
    k3_kl,
    per_sample_extra,
    sampled_tokens,
    sampler_logprobs,
    state_inputs,
)


class StepwiseLoss(PolicyLoss):
    """Clipped-ratio policy gradient on the tokens committed at K selected steps per trajectory.

    Subclasses choose the steps (``select_steps``); the objective, normalisation and the per-step
    backward are shared, so AGRPO and ATPO differ only in where the budget goes.
    """

    def select_steps(self, batch: Trajectory, eligible_BT: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, batch: Trajectory, *, seed: int) -> Trajectory:
        """Advantages and the K (step, weight) pairs of every sample; deterministic in ``seed``."""
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        eligible_BT = step_sel.eligible_steps(
            batch.unmask_step_BG, batch.completion_ids_BG, batch.num_steps, self.eos_id, sampled_tokens(batch)
        )
        gen = torch.Generator().manual_seed(int(seed))
        steps_BK, weights_BK = self.select_steps(batch, eligible_BT.cpu(), gen)
        device = batch.completion_ids_BG.device
        out.extras["advantages_B"] = self._advantages(batch).to(device)
        out.extras["steps_BK"] = steps_BK.to(device)
        out.extras["step_weights_BK"] = weights_BK.to(device)
        out.extras["eligible_steps_B"] = eligible_BT.sum(1).to(device)
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None) -> dict[str, float]:
        """One forward + backward per selected step column (K of them, always, so every FSDP rank runs
        the same collectives even when its rows have padding there)."""
        if total_samples <= 0:
            raise ValueError(f"total_samples must be the global batch size (> 0), got {total_samples}")
        if self.cfg.beta_kl > 0 and ref_model is None:
            raise ValueError("beta_kl > 0 needs ref_model (the frozen reference policy)")
        adv_B = per_sample_extra(micro, "advantages_B")
        steps_BK = per_sample_extra(micro, "steps_BK")
        weights_BK = per_sample_extra(micro, "step_weights_BK")
        device = next(model.parameters()).device
        P = micro.prompt_ids_BP.shape[1]
        drawn_BG = sampled_tokens(micro).to(device)
        m = MetricSums()
        for j in range(steps_BK.shape[1]):
            step_B, w_B = steps_BK[:, j].to(device), weights_BK[:, j].to(device)
            ids_BL, attn_BL, pos_BL = state_inputs(micro, step_B, self.mask_id, device)
            commit_BG = (micro.unmask_step_BG.to(device) == step_B[:, None]) & (w_B[:, None] > 0) & drawn_BG
            b_N, g_N = commit_BG.nonzero(as_tuple=True)
            # Project only the rows committed at this step: [N, V] instead of [B, L, V] logits.
            h_BLD = model.hidden_states(ids_BL, attn_BL, pos_BL)
            logp_N = self._logp(model, h_BLD[b_N, P + g_N], micro, b_N, g_N)
            old_N = micro.logp_BG.to(device)[b_N, g_N].float()
            adv_N = adv_B.to(device)[b_N].float()
            tok_loss_N, ratio_N, low_N, high_N = clipped_pg(logp_N, old_N, adv_N, self.clip_low, self.clip_high)
            kl_N = None
            if self.cfg.beta_kl > 0:
                with torch.no_grad():
                    ref_h = ref_model.hidden_states(ids_BL, attn_BL, pos_BL)[b_N, P + g_N]
                    ref_N = self._logp(ref_model, ref_h, micro, b_N, g_N)
                kl_N = k3_kl(logp_N, ref_N)
                tok_loss_N = tok_loss_N + self.cfg.beta_kl * kl_N
            loss = (w_B[b_N] * tok_loss_N).sum() / total_samples
            loss.backward()  # per step: activation memory does not grow with K
            m.add("loss", loss)
            m.add("steps", (w_B > 0).sum())
            m.token_stats(ratio_N, low_N, high_N, kl_N)
        m.add("samples", len(micro))
        return m.result()

    def _logp(self, model, h_ND, micro, b_N, g_N):
        cutoff_N = micro.cutoff_BG.to(h_ND.device)[b_N, g_N]
        token_N = micro.completion_ids_BG.to(h_ND.device)[b_N, g_N]
        return sampler_logprobs(
            model.lm_head(h_ND), token_N, temperature=micro.temperature, cutoff_N=cutoff_N, banned_ids=tuple(micro.banned_ids)
        )


class AgrpoLoss(StepwiseLoss):
    """AGRPO: steps drawn uniformly (i.i.d. or stratified) or by entropy importance sampling; unbiased."""

    def select_steps(self, batch, eligible_BT, gen):
        k = self.cfg.k_steps
        if self.cfg.step_sampling == "uniform":
            return step_sel.uniform_steps(eligible_BT, k, gen)
        if self.cfg.step_sampling == "stratified":
            return step_sel.stratified_steps(eligible_BT, k, gen)
        probs_BT = step_sel.entropy_step_probs(batch.entropy_BG, batch.unmask_step_BG, eligible_BT)
        return step_sel.proportional_steps(probs_BT, k, gen)
