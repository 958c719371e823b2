"""wd1: a ratio-free weighted likelihood. Each sample's log-likelihood is d1's one-pass estimate (completion fully
masked, prompt masked with p = prompt_mask_prob), summed over its scored tokens; the loss raises it with weight
softmax(A) over the group and lowers it with weight softmax(-A):

    L = (1/B) sum_i n_g(i) (w-_i - w+_i) sum_{j <= first EOS} log p_theta(x_ij | masked input)

n_g(i) = the size of i's group, so the loss is the mean over groups of the public per-group loss (whose
micro-batch is one group: `per_device_train_batch_size = num_generations` in wd1's scripts). No old policy,
no ratio, no clip, no KL: each inner epoch is a plain gradient step on a newly masked prompt.

Public code: xiaohangt/wd1 @ 08989851, wd1/trainers/rev_grpo_trainer.py, RevDiffuGRPOTrainer.compute_loss
(`wll_d1_neg`) and rev_grpo_trainer_psr.py (`wll_d1_pos_only`, negative: false).

Letters: B samples, P prompt length, G completion length, E inner epochs.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses.base import backward_once, per_sample_extra
from learner.losses.surrogate import MaskedSurrogateLoss, epoch_draws, group_ids, group_softmax, masked_logprobs


class Wd1Loss(MaskedSurrogateLoss):
    """wd1's weighted likelihood on the one-pass (d1) log-probs."""

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages, the per-sample weight n_g (w- - w+), and the prompt mask of every epoch (this one's in
        ``prompt_masked_BP``)."""
        out = self._prepare_common(batch, epoch)
        device = batch.completion_ids_BG.device
        adv_B = self._advantages(batch)
        weight_B = group_softmax(adv_B, batch.group_B)
        if self.cfg.negative:
            weight_B = weight_B - group_softmax(-adv_B, batch.group_B)
        _, size_B = group_ids(batch.group_B)
        gen = torch.Generator().manual_seed(int(seed))
        u_EBP = torch.rand((self.cfg.inner_epochs, *batch.prompt_ids_BP.shape), generator=gen)
        masked_BEP = ((u_EBP < self.cfg.prompt_mask_prob) & batch.prompt_mask_BP.cpu().bool()).transpose(0, 1)
        out.extras["advantages_B"] = adv_B.to(device)
        out.extras["wd1_weight_B"] = (size_B.float() * weight_B).to(device)
        out.extras["prompt_masked_BP"] = masked_BEP[:, epoch_draws(self.cfg, epoch)].contiguous().to(device)
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """One pass; each sample's share of the global loss divided by ``total_samples``."""
        self._check(total_samples)
        device = next(model.parameters()).device
        cmask_BG = per_sample_extra(micro, "completion_mask_BG").to(device)
        weight_B = per_sample_extra(micro, "wd1_weight_B").to(device)
        prompt_masked_BP = per_sample_extra(micro, "prompt_masked_BP").to(device)
        masked_BL = torch.cat([prompt_masked_BP, torch.ones_like(cmask_BG)], 1)
        logp_BG = masked_logprobs(model, micro, masked_BL[None], self.mask_id)[0]
        seq_logp_B = (logp_BG * cmask_BG).sum(1)
        loss = -(weight_B * seq_logp_B).sum() / total_samples
        m = backward_once(loss, before_backward, len(micro))
        m.add("tokens", cmask_BG.sum())
        m.add("seq_logp_sum", seq_logp_B.detach().sum())
        return m.result()
