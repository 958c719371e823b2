"""BGPO (boundary-guided policy optimisation): per Monte-Carlo mask m of sample i an ELBO of the completion up to
its first EOS (n_i tokens, the tail after it neither scored nor attended), and instead of the ratio of the
averaged ELBO a bound on each mask's ratio, so the loss is a sum over masks and each mask takes its own forward
and backward (memory independent of ``num_mc``):

    l_im = (1/G) sum_{j in M_im} log p(x_j | x masked on M_im) / (x_im / n_i)      (|M_im| = x_im, stratified)
    d_im = l_im - l_old_im
    r_im = 1 + d_im  if A_i > 0  (a lower bound of exp(d_im))    else  exp(d_im)  (whose mean over m bounds
                                                                                    exp of the mean from above)
    L    = (1/M) sum_m sum_i w_i c(r_im, A_i),  c = PPO-clip, and for A_i < 0 at most -A_i dual_clip
    w_i  = n_i / sum_i' n_i' (token_mean, the recipes')  or 1/B (sample_mean)

The counts x_im of a group of ``strata`` masks are ((round(k + m n_i / strata) - 1) mod n_i) + 1 for one
k ~ U{1..n_i} (stratified over [1, n_i]); positions uniformly at random among the n_i. The masks are drawn once
per batch and reused by every inner epoch (``mask_per_epoch`` off, as DARE); old values are each row's ELBOs at
its first visit. Advantages: (r - group mean) / (unbiased group std + 1e-6).

Public code: yjyddq/DARE @ 83ae8a30, verl/workers/actor/llada_dp_actor_bgpo.py (``_forward_micro_batch``,
``update_policy``), verl/trainer/ppo/dllm_core_algos.py (``compute_policy_loss_bgpo``, ``_forward_process_bgpo``),
verl/workers/dllm_fsdp_workers.py (``forward_process``); defaults from recipe/llada/run_bgpo_llada_8b_instruct.sh.

Letters: B samples, P prompt length, G completion length, L = P + G, E inner epochs, M masks per sample.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses.base import MetricSums, per_sample_extra
from learner.losses.surrogate import MaskedSurrogateLoss, epoch_draws, masked_logprobs


def stratified_counts(n: int, strata: int, gen: torch.Generator) -> torch.Tensor:
    """``strata`` masked counts in [1, n], evenly spaced from one uniform start k (DARE's linspace rule)."""
    k = int(torch.randint(1, n + 1, (), generator=gen))
    x = torch.round(torch.linspace(float(k), k + (strata - 1) * (n / strata), steps=strata)).long()
    return (x - 1) % n + 1


def bgpo_terms(d_B: torch.Tensor, adv_B: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float):
    """Per-sample loss of one mask from its scaled ELBO change ``d_B``, with the bounded ratio and the low-, high-
    and dual-clipped flags."""
    ratio_B = torch.where(adv_B > 0, 1 + d_B, torch.exp(d_B))
    clipped_B = torch.maximum(-adv_B * ratio_B, -adv_B * ratio_B.clamp(1 - clip_low, 1 + clip_high))
    loss_B = torch.where(adv_B < 0, torch.minimum(clipped_B, -adv_B * dual_clip), clipped_B)
    r = ratio_B.detach()
    low_B, high_B = (r < 1 - clip_low) & (adv_B < 0), (r > 1 + clip_high) & (adv_B > 0)
    dual_B = (clipped_B.detach() > -adv_B * dual_clip) & (adv_B < 0)
    return loss_B, r, low_B, high_B, dual_B


class BgpoLoss(MaskedSurrogateLoss):
    """BGPO's per-mask bounded ratios of ELBOs, one forward + backward per mask."""

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages and the ``num_mc`` masks per sample (``bgpo_masked_BEMG``) with their ratios x/n: every
        epoch's with ``mask_per_epoch``, else the batch's one set (``epoch_draws``)."""
        out = self._prepare_common(batch, epoch)
        device = batch.completion_ids_BG.device
        B, G = batch.completion_ids_BG.shape
        E = self.cfg.inner_epochs if self.cfg.mask_per_epoch else 1
        M, S = self.cfg.num_mc, self.cfg.strata
        n_B = out.extras["completion_mask_BG"].sum(1).cpu()
        gen = torch.Generator().manual_seed(int(seed))
        masked_BEMG = torch.zeros(B, E, M, G, dtype=torch.bool)
        ratio_BEM = torch.zeros(B, E, M)
        for e in range(E):
            for i in range(B):
                n = int(n_B[i])
                for g in range(M // S):
                    for s, x in enumerate(stratified_counts(n, S, gen).tolist()):
                        masked_BEMG[i, e, g * S + s, torch.randperm(n, generator=gen)[:x]] = True
                        ratio_BEM[i, e, g * S + s] = x / n
        out.extras["advantages_B"] = self._advantages(batch).to(device)
        out.extras["bgpo_masked_BEMG"] = masked_BEMG.to(device)
        out.extras["bgpo_ratio_BEM"] = ratio_BEM.to(device)
        return out

    def scaled_elbo(self, model, micro: Trajectory, masked_BG: torch.Tensor, ratio_B: torch.Tensor) -> torch.Tensor:
        """[B] one mask's ELBO over G: sum over its masked tokens of log p / (x/n), the tail after the first EOS
        out of attention."""
        device = next(model.parameters()).device
        masked_BG, ratio_B = masked_BG.to(device), ratio_B.to(device)
        P = micro.prompt_ids_BP.shape[1]
        masked_BL = torch.cat([torch.zeros(masked_BG.shape[0], P, dtype=torch.bool, device=device), masked_BG], 1)
        attend_BG = per_sample_extra(micro, "completion_mask_BG")
        logp_BG = masked_logprobs(model, micro, masked_BL[None], self.mask_id, attend_BG=attend_BG)[0]
        G = masked_BG.shape[1]
        return torch.where(masked_BG, logp_BG / ratio_B[:, None], 0.0).sum(1) / G

    def scaled_elbos(self, model, micro: Trajectory, masked_BMG: torch.Tensor, ratio_BM: torch.Tensor) -> torch.Tensor:
        """[B, M] every mask's scaled ELBO without gradient, one mask a pass (the old values)."""
        with torch.no_grad():
            return torch.stack([self.scaled_elbo(model, micro, masked_BMG[:, m], ratio_BM[:, m])
                                for m in range(masked_BMG.shape[1])], 1)

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """One forward + backward per mask (the micro-batch's last one reduces); each sample's weighted share of
        the batch loss divided by ``total_samples``. The first visit scores the old values first (no gradient)."""
        self._check(total_samples)
        device = next(model.parameters()).device
        cfg = self.cfg
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        masks_BEMG, ratio_BEM = per_sample_extra(micro, "bgpo_masked_BEMG"), per_sample_extra(micro, "bgpo_ratio_BEM")
        epoch = int(micro.extras["epoch"])
        old_BM = self._old.get(micro, epoch, None, lambda e: self.scaled_elbos(
            model, micro, masks_BEMG[:, epoch_draws(cfg, e)], ratio_BEM[:, epoch_draws(cfg, e)]))
        if cfg.normalize == "token_mean":
            n_B = per_sample_extra(micro, "completion_mask_BG").to(device).sum(1).float()
            weight_B = n_B / max(micro.extras["tokens_per_sample"], 1e-12)
        else:
            weight_B = torch.ones_like(adv_B)
        e, M = epoch_draws(cfg, epoch), cfg.num_mc
        weight_B = weight_B / (M * total_samples)
        m = MetricSums()
        for j in range(M):
            elbo_B = self.scaled_elbo(model, micro, masks_BEMG[:, e, j], ratio_BEM[:, e, j])
            loss_B, r_B, low_B, high_B, dual_B = bgpo_terms(
                elbo_B - old_BM[:, j], adv_B, self.clip_low, self.clip_high, cfg.dual_clip)
            loss = (loss_B * weight_B).sum()
            if before_backward is not None:
                before_backward(j == M - 1)
            loss.backward()
            m.add("loss", loss)
            m.token_stats(r_B, low_B, high_B)
            m.add("dual_clipped", dual_B.sum())
            m.add("elbo_sum", elbo_B.detach().sum() * masks_BEMG.shape[-1] / M)  # the mean ELBO over masks, unscaled
        m.add("samples", len(micro))
        return m.result()
