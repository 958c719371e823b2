"""ESPO (ELBO-based sequence-level policy optimisation): the whole completion is one action, its log-likelihood
the ELBO, and one PPO-clipped ratio per sequence, normalised by the completion length G:

    ELBO_i = -(1/2) sum_j [ [j in M] CE_j / p_i + [j not in M] CE'_j / (G/(G+1) - p_i) ]   (coupled; else the
             first sum alone), averaged over ``num_mc`` draws; CE = -log p(x_j | x masked on M), CE' the same
             with the complementary mask; M = x_i random positions, p_i = x_i / (G+1)
    rho_i  = exp((ELBO_i - ELBO_old_i) / G)
    L      = (1/B) sum_i [ -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) + beta (ELBO_i - ELBO_ref_i)^2 / (2G) ]

The mask counts x_i are stratified over the batch: x_i = round(k + i (G+1)/B) mod (G+1) for one uniform k, each
row's positions uniformly at random. Every one of the G positions counts (EOS padding included: the ELBO of the
whole generated sequence, as LLaDA's SFT loss), the prompt is never masked. Advantages: leave-one-out baseline.

Public code: ML-GSAI/ESPO @ b5f2dac4, espo/espo_trainer.py, ESPOTrainer.compute_loss, _get_elbo_mc, _get_elbo,
forward_process, compute_approx_kl ("k2"); defaults from recipes/train.yaml (Countdown: recipes/run_countdown_llada.sh).

Letters: B samples, P prompt length, G completion length, L = P + G, E inner epochs, M Monte-Carlo draws.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses.base import backward_once, per_sample_extra
from learner.losses.surrogate import MaskedSurrogateLoss, baseline_advantages, epoch_draws, masked_logprobs


class EspoLoss(MaskedSurrogateLoss):
    """ESPO's sequence-level ELBO ratio."""

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages and every epoch's ``num_mc`` masks (``espo_masked_BEMG``) with their ratios p = x/(G+1)."""
        out = self._prepare_common(batch, epoch)
        device = batch.completion_ids_BG.device
        B, G = batch.completion_ids_BG.shape
        E, M = self.cfg.inner_epochs, self.cfg.num_mc
        gen = torch.Generator().manual_seed(int(seed))
        masked_EMBG = torch.zeros(E, M, B, G, dtype=torch.bool)
        count_EMB = torch.zeros(E, M, B, dtype=torch.long)
        for e in range(E):
            for m in range(M):
                k = int(torch.randint(0, G + 1, (), generator=gen))
                x_B = torch.round(torch.linspace(float(k), k + (B - 1) * ((G + 1) / B), steps=B)).long() % (G + 1)
                order_BG = torch.argsort(torch.rand((B, G), generator=gen), dim=1)
                masked_EMBG[e, m] = order_BG < x_B[:, None]  # x_B[i] positions of row i, uniformly at random
                count_EMB[e, m] = x_B
        out.extras["advantages_B"] = baseline_advantages(
            batch, baseline=self.cfg.baseline, std_normalize=self.cfg.std_normalize).to(device)
        out.extras["espo_masked_BEMG"] = masked_EMBG.permute(2, 0, 1, 3).contiguous().to(device)
        out.extras["espo_ratio_BEM"] = (count_EMB.float() / (G + 1)).permute(2, 0, 1).contiguous().to(device)
        return out

    def elbo(self, model, micro: Trajectory, masked_BMG: torch.Tensor, ratio_BM: torch.Tensor) -> torch.Tensor:
        """[B] ELBO of each completion, the mean over the M draws (and their complements when coupled)."""
        device = next(model.parameters()).device
        masked_BMG, ratio_BM = masked_BMG.to(device), ratio_BM.to(device)
        B, M, G = masked_BMG.shape
        P = micro.prompt_ids_BP.shape[1]
        masks = [masked_BMG.transpose(0, 1)] + ([~masked_BMG.transpose(0, 1)] if self.cfg.coupled else [])
        masked_NBG = torch.cat(masks)  # [draws, then their complements]
        masked_NBL = torch.cat([torch.zeros(masked_NBG.shape[0], B, P, dtype=torch.bool, device=device), masked_NBG], 2)
        logp_NBG = masked_logprobs(model, micro, masked_NBL, self.mask_id)
        ratio_MB1 = ratio_BM.transpose(0, 1)[..., None]
        term_MBG = torch.where(masked_NBG[:M], logp_NBG[:M] / torch.where(masked_NBG[:M], ratio_MB1, 1.0), 0.0)
        if self.cfg.coupled:
            comp_MB1 = G / (G + 1) - ratio_MB1  # the complement's ratio
            term_MBG = term_MBG + torch.where(masked_NBG[M:], logp_NBG[M:] / torch.where(masked_NBG[M:], comp_MB1, 1.0), 0.0)
            term_MBG = term_MBG / 2
        return term_MBG.sum(2).mean(0)

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """2 x num_mc passes (num_mc without coupling) in one forward; each sample's clipped sequence term and
        KL divided by ``total_samples``."""
        self._check(total_samples)
        if self.cfg.beta_kl > 0 and ref_model is None:
            raise ValueError("beta_kl > 0 needs ref_model (the frozen reference policy)")
        device = next(model.parameters()).device
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        G = micro.completion_ids_BG.shape[1]
        epoch = int(micro.extras["epoch"])
        masks_BEMG, ratio_BEM = per_sample_extra(micro, "espo_masked_BEMG"), per_sample_extra(micro, "espo_ratio_BEM")
        e = epoch_draws(self.cfg, epoch)
        elbo_B = self.elbo(model, micro, masks_BEMG[:, e], ratio_BEM[:, e])
        old_B = self._old.get(micro, epoch, elbo_B, lambda e2: self.elbo(
            model, micro, masks_BEMG[:, epoch_draws(self.cfg, e2)], ratio_BEM[:, epoch_draws(self.cfg, e2)]))
        ratio_B = torch.exp((elbo_B - old_B) / G)
        clipped_B = ratio_B.clamp(1 - self.clip_low, 1 + self.clip_high)
        seq_loss_B = -torch.minimum(ratio_B * adv_B, clipped_B * adv_B)
        kl_B = None
        if self.cfg.beta_kl > 0:
            with torch.no_grad():
                ref_B = self.elbo(ref_model, micro, masks_BEMG[:, e], ratio_BEM[:, e])
            kl_B = (elbo_B - ref_B) ** 2 / 2.0
            seq_loss_B = seq_loss_B + self.cfg.beta_kl * kl_B / G
        loss = seq_loss_B.sum() / total_samples
        r = ratio_B.detach()
        m = backward_once(loss, before_backward, len(micro))
        m.token_stats(r, (r < 1 - self.clip_low) & (adv_B < 0), (r > 1 + self.clip_high) & (adv_B > 0),
                      None if kl_B is None else kl_B)
        m.add("elbo_sum", elbo_B.detach().sum())
        return m.result()
