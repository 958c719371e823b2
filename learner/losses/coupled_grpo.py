"""coupled-GRPO (DiffuCoder): a per-token log-prob from three passes of the clean completion, the prompt never
masked: completion fully masked (p0); completion masked where u < t (p1); its complement, u > t (p2); with one
t ~ U(mask_ratio_min, mask_ratio_max) per batch and inner epoch, u ~ U(0, 1) per token. Every token is masked in
exactly one of the pair, and

    log pi_ij ~= ( p0_ij + [j in M] p1_ij / t + [j not in M] p2_ij / (1 - t) ) / 2

then PPO-clip per token with the "old" value of the same estimate under the same masks, + beta x k3 to the
reference's estimate, mean over the batch's tokens up to the first EOS. Advantages: leave-one-out baseline.

Public code: apple/ml-diffucoder @ f735e013, src/open_r1/coupled_grpo.py, DiffuGRPOTrainer.compute_loss,
forward_process, _get_per_token_logps, selective_log_softmax; defaults from recipes/config_coupled_code.yaml.

Letters: B samples, P prompt length, G completion length, L = P + G, E inner epochs, N passes.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses.base import backward_once, clipped_pg, k3_kl, per_sample_extra
from learner.losses.surrogate import MaskedSurrogateLoss, baseline_advantages, epoch_draws, masked_logprobs


class CoupledGrpoLoss(MaskedSurrogateLoss):
    """DiffuCoder's coupled-sampling estimate inside a GRPO (PPO-clip) loss."""

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages and every epoch's mask ratio and completion mask M (this epoch's in
        ``mask_ratio_B``/``completion_masked_BG``, all of them for the old-value cache)."""
        out = self._prepare_common(batch, epoch)
        device = batch.completion_ids_BG.device
        B, G = batch.completion_ids_BG.shape
        E = self.cfg.inner_epochs
        gen = torch.Generator().manual_seed(int(seed))
        lo, hi = self.cfg.mask_ratio_min, self.cfg.mask_ratio_max
        t_E = lo + (hi - lo) * torch.rand(E, generator=gen, dtype=torch.float64)
        u_EBG = torch.rand((E, B, G), generator=gen, dtype=torch.float64)
        masked_BEG = (u_EBG < t_E[:, None, None]).transpose(0, 1)
        e = epoch_draws(self.cfg, epoch)
        out.extras["advantages_B"] = baseline_advantages(
            batch, baseline=self.cfg.baseline, std_normalize=self.cfg.std_normalize).to(device)
        out.extras["mask_ratio_BE"] = t_E.expand(B, E).contiguous().to(device)
        out.extras["completion_masked_BEG"] = masked_BEG.contiguous().to(device)
        out.extras["mask_ratio_B"] = out.extras["mask_ratio_BE"][:, e].contiguous()
        out.extras["completion_masked_BG"] = out.extras["completion_masked_BEG"][:, e].contiguous()
        return out

    def coupled_logprobs(self, model, micro: Trajectory, masked_BG: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """[B, G] coupled estimate: (full-mask pass + the pair pass in which the token is masked, / its ratio) / 2."""
        device = next(model.parameters()).device
        masked_BG = masked_BG.to(device)
        P = micro.prompt_ids_BP.shape[1]
        no_prompt_BP = torch.zeros(masked_BG.shape[0], P, dtype=torch.bool, device=device)
        masked_NBL = torch.stack([
            torch.cat([no_prompt_BP, torch.ones_like(masked_BG)], 1),
            torch.cat([no_prompt_BP, masked_BG], 1),
            torch.cat([no_prompt_BP, ~masked_BG], 1),
        ])
        logp_NBG = masked_logprobs(model, micro, masked_NBL, self.mask_id)
        # the public code multiplies by fp32 weights 1/t, 1/(1-t): the same rounding here
        w1_B1 = (1.0 / t_B.double()).float().to(device)[:, None]
        w2_B1 = (1.0 / (1.0 - t_B.double())).float().to(device)[:, None]
        pair_BG = torch.where(masked_BG, logp_NBG[1] * w1_B1, logp_NBG[2] * w2_B1)
        return (logp_NBG[0] + pair_BG) / 2

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """Three passes in one forward; the mean over the batch's scored tokens (divided by the batch's mean
        count per sample and ``total_samples``, so any split sums to the same loss)."""
        self._check(total_samples)
        if self.cfg.beta_kl > 0 and ref_model is None:
            raise ValueError("beta_kl > 0 needs ref_model (the frozen reference policy)")
        device = next(model.parameters()).device
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        cmask_BG = per_sample_extra(micro, "completion_mask_BG").to(device)
        masked_BG, t_B = per_sample_extra(micro, "completion_masked_BG"), per_sample_extra(micro, "mask_ratio_B")
        logp_BG = self.coupled_logprobs(model, micro, masked_BG, t_B)
        epoch = int(micro.extras["epoch"])
        masks_BEG, t_BE = micro.extras["completion_masked_BEG"], micro.extras["mask_ratio_BE"]
        old_BG = self._old.get(micro, epoch, logp_BG, lambda e: self.coupled_logprobs(
            model, micro, masks_BEG[:, epoch_draws(self.cfg, e)], t_BE[:, epoch_draws(self.cfg, e)]))
        tok_loss_BG, ratio_BG, low_BG, high_BG = clipped_pg(logp_BG, old_BG, adv_B[:, None], self.clip_low, self.clip_high)
        kl_BG = None
        if self.cfg.beta_kl > 0:
            with torch.no_grad():
                ref_BG = self.coupled_logprobs(ref_model, micro, masked_BG, t_B)
            kl_BG = k3_kl(logp_BG, ref_BG)
            tok_loss_BG = tok_loss_BG + self.cfg.beta_kl * kl_BG
        per_sample_B = (tok_loss_BG * cmask_BG).sum(1) / max(micro.extras["tokens_per_sample"], 1e-12)
        loss = per_sample_B.sum() / total_samples
        m = backward_once(loss, before_backward, len(micro))
        m.token_stats(ratio_BG[cmask_BG], low_BG[cmask_BG], high_BG[cmask_BG], None if kl_BG is None else kl_BG[cmask_BG])
        return m.result()
