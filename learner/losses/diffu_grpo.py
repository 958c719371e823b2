"""diffu-GRPO (d1): per-token log-probs from ONE forward pass with the whole completion masked and the
prompt randomly masked; PPO-clip + beta * k3 KL. A biased, mean-field estimate of log pi; kept as the
baseline row of every comparison.

Letters: B samples, P prompt length, G completion length, L = P + G, V vocabulary.
"""
from __future__ import annotations

import itertools

import torch

from common.step_layout import packed_positions
from common.trajectory import Trajectory
from learner.losses.base import PolicyLoss, backward_once, clipped_pg, k3_kl, per_sample_extra
from learner.losses.surrogate import first_eos_mask, token_logprobs

_BATCH_KEYS = itertools.count()


class DiffuGrpoLoss(PolicyLoss):
    """d1's estimator. Each inner epoch masks the prompt anew (d1's per-iteration mask seed). "Old" log-probs
    are the one-pass log-probs of the policy when a prepared batch's row is first seen, under every epoch's
    prompt mask at once (cached per row and epoch, as d1 computes them at generation): ratio 1 on the first
    inner epoch, PPO ratios on later ones."""

    def __init__(self, cfg, *, mask_id: int, pad_id: int, eos_id: int | None = None):
        super().__init__(cfg, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id)
        self._old_key: int | None = None
        self._old_logp: dict[tuple[int, int], torch.Tensor] = {}
        self._prepared_key: int | None = None

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages, the prompt masks of every inner epoch (this one's in ``prompt_masked_BP``), the
        completion-token mask, the batch's mean scored tokens per sample, row ids for the old-logp cache.
        Epoch 0 starts a new cache; later epochs of the same batch reuse it."""
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        device = batch.completion_ids_BG.device
        gen = torch.Generator().manual_seed(int(seed))
        u_EBP = torch.rand((self.cfg.inner_epochs, *batch.prompt_ids_BP.shape), generator=gen)
        masked_BEP = ((u_EBP < self.cfg.prompt_mask_prob) & batch.prompt_mask_BP.cpu().bool()).transpose(0, 1)
        cmask_BG = first_eos_mask(batch.completion_ids_BG, self.eos_id)  # d1: up to and including the first EOS
        if epoch == 0 or self._prepared_key is None:
            self._prepared_key = next(_BATCH_KEYS)
        out.extras["advantages_B"] = self._advantages(batch).to(device)
        out.extras["prompt_masked_BEP"] = masked_BEP.contiguous().to(device)
        out.extras["prompt_masked_BP"] = masked_BEP[:, epoch].contiguous().to(device)
        out.extras["completion_mask_BG"] = cmask_BG
        out.extras["tokens_per_sample"] = float(cmask_BG.sum()) / max(len(batch), 1)
        out.extras["row_id_B"] = torch.arange(len(batch), device=device)
        out.extras["epoch"] = int(epoch)
        out.extras["batch_key"] = self._prepared_key
        return out


    def _inputs(self, micro: Trajectory, device, prompt_masked_BP: torch.Tensor):
        prompt_BP = micro.prompt_ids_BP.to(device).masked_fill(prompt_masked_BP.to(device), self.mask_id)
        comp_BG = torch.full_like(micro.completion_ids_BG, self.mask_id, device=device)
        ids_BL = torch.cat([prompt_BP, comp_BG], 1)
        attn_BL = torch.cat([micro.prompt_mask_BP.to(device).bool(), torch.ones_like(comp_BG, dtype=torch.bool)], 1)
        # positions as the sampler numbered them (see learner.step_states.state_inputs)
        pos_BL = packed_positions(attn_BL) if micro.extras.get("position_ids", "absolute") == "packed" else None
        return ids_BL, attn_BL, pos_BL

    def _logp_BG(self, model, ids_BL, attn_BL, pos_BL, tokens_BG):
        """log softmax of the raw logits (temperature 1, full vocabulary), as d1 scores its tokens."""
        return token_logprobs(model, ids_BL, attn_BL, pos_BL, tokens_BG)

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """One pass; the mean over the batch's scored tokens (or per-sample means, ``normalize``), each
        sample's share divided by ``total_samples`` so any split sums to the same loss."""
        if total_samples <= 0:
            raise ValueError(f"total_samples must be the global batch size (> 0), got {total_samples}")
        if self.cfg.beta_kl > 0 and ref_model is None:
            raise ValueError("beta_kl > 0 needs ref_model (the frozen reference policy)")
        device = next(model.parameters()).device
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        cmask_BG = per_sample_extra(micro, "completion_mask_BG").to(device)
        tokens_BG = micro.completion_ids_BG.to(device)
        ids_BL, attn_BL, pos_BL = self._inputs(micro, device, per_sample_extra(micro, "prompt_masked_BP"))
        logp_BG = self._logp_BG(model, ids_BL, attn_BL, pos_BL, tokens_BG)
        old_BG = self._old(model, micro, logp_BG, device)
        tok_loss_BG, ratio_BG, low_BG, high_BG = clipped_pg(logp_BG, old_BG, adv_B[:, None], self.clip_low, self.clip_high)
        kl_BG = None
        if self.cfg.beta_kl > 0:
            with torch.no_grad():
                ref_BG = self._logp_BG(ref_model, ids_BL, attn_BL, pos_BL, tokens_BG)
            kl_BG = k3_kl(logp_BG, ref_BG)
            if self.cfg.kl == "k3_ratio":
                kl_BG = kl_BG * torch.exp(logp_BG - old_BG)
            tok_loss_BG = tok_loss_BG + self.cfg.beta_kl * kl_BG
        if self.cfg.normalize == "token_mean":  # d1's token mean, over the whole batch rather than the micro-batch
            per_sample_B = (tok_loss_BG * cmask_BG).sum(1) / max(micro.extras["tokens_per_sample"], 1e-12)
        else:
            per_sample_B = (tok_loss_BG * cmask_BG).sum(1) / cmask_BG.sum(1).clamp(min=1)
        loss = per_sample_B.sum() / total_samples
        m = backward_once(loss, before_backward, len(micro))
        sel = cmask_BG
        m.token_stats(ratio_BG[sel], low_BG[sel], high_BG[sel], None if kl_BG is None else kl_BG[sel])
        return m.result()

    def _old(self, model, micro: Trajectory, logp_BG: torch.Tensor, device) -> torch.Tensor:
        """Cached one-pass log-probs of each row under this epoch's prompt mask, all taken at the row's first
        visit (the policy before this batch's updates): every epoch's mask is scored then."""
        key = micro.extras.get("batch_key")
        if key != self._old_key:
            self._old_key, self._old_logp = key, {}
        epoch = int(micro.extras.get("epoch", 0))
        rows = per_sample_extra(micro, "row_id_B").tolist()
        if any((r, epoch) not in self._old_logp for r in rows):
            masks_BEP = per_sample_extra(micro, "prompt_masked_BEP")
            tokens_BG = micro.completion_ids_BG.to(device)
            for e in range(masks_BEP.shape[1]):
                if e == epoch:
                    values_BG = logp_BG.detach()
                else:
                    with torch.no_grad():
                        values_BG = self._logp_BG(model, *self._inputs(micro, device, masks_BEP[:, e]), tokens_BG)
                for i, r in enumerate(rows):
                    self._old_logp.setdefault((r, e), values_BG[i].clone())
        return torch.stack([self._old_logp[(r, epoch)] for r in rows])
