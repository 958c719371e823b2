"""SPG (sandwiched policy gradient): -A_i x an estimate of log pi(x_i) that is a lower bound (the ELBO) when
A_i > 0 and an upper bound (EUBO) or a mix of the two when A_i <= 0, so that both pushes work on a bound in the
safe direction. Monte Carlo over ``num_t`` masks per sample; with block-wise masking a random block of the
completion (within the blocks the first EOS reaches) is partly masked, later blocks fully, earlier ones kept
(then every still-clean token, prompt and earlier blocks, masked with ``prompt_mask_prob``). Per mask m of
sample i, with D_im the masked completion tokens up to the first EOS and n_i their count (including the EOS):

    ELBO_im = mean_{j in D_im} log p(x_j | masked)           ELBO_i = mean_m ELBO_im
    EUBO_i  = (1/beta) mean_{j: a_ij > 0} log a_ij,   a_ij = mean_m [j in D_im] p(x_j | masked)^beta / (|D_im| / n_i)
    L = (1/B) sum_i -A_i n_i est_i / (mean_i n_i)             (the public token-weighted mean over the batch)

No ratio, no clip, no KL: later inner epochs reuse the rollouts with new masks. Advantages: r_i - group mean.

Public code: facebookresearch/SPG @ a1c71209, spg/spg_trainer.py, SPGTrainer.compute_loss, forward_process,
get_logits, _get_per_seq_logps; knobs from spg/diffu_grpo_config.py and spg/slurm_scripts/ (block_random,
num_t 2, min_t 0, max_t 1, mix with weight 0.5; eubo_beta 1.5 GSM8K/MATH, 2.0 Countdown, 1.0 Sudoku).

Letters: B samples, P prompt length, G completion length, L = P + G, E inner epochs, N masks per sample.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses.base import backward_once, per_sample_extra
from learner.losses.surrogate import MaskedSurrogateLoss, epoch_draws, masked_logprobs


class SpgLoss(MaskedSurrogateLoss):
    """SPG's sandwiched likelihood bounds in a plain (ratio-free) policy gradient."""

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages and this epoch's ``num_t`` masks per sample (``spg_masked_BNL``, prompt included)."""
        out = self._prepare_common(batch, epoch)
        device = batch.completion_ids_BG.device
        G = batch.completion_ids_BG.shape[1]
        block = self.cfg.block_length or batch.block_length
        if self.cfg.masking.startswith("block") and batch.block_grid != "completion":
            raise ValueError("SPG's block masking counts blocks from the completion's first token; these rollouts' "
                             "blocks start at the prompt's (block_grid sequence): set algorithm.masking to random or all")
        if self.cfg.masking.startswith("block") and (block <= 0 or G % block):
            raise ValueError(f"SPG's block masking needs a block length dividing the completion length {G}, got {block}")
        if self.cfg.masking.startswith("block") and self.cfg.num_t > G // block:
            raise ValueError(f"SPG's block masking draws num_t = {self.cfg.num_t} distinct blocks of the {G // block} "
                             f"(completion {G}, block {block}): lower num_t or algorithm.block_length")
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(epoch_draws(self.cfg, epoch)):  # epoch e's masks: the (e+1)-th draw from the seed
            self._draw_masks(batch, out.extras["completion_mask_BG"], block, gen)
        masked_BNL = self._draw_masks(batch, out.extras["completion_mask_BG"], block, gen)
        out.extras["advantages_B"] = self._advantages(batch).to(device)
        out.extras["spg_masked_BNL"] = masked_BNL.to(device)
        return out

    def _draw_masks(self, batch: Trajectory, cmask_BG: torch.Tensor, block: int, gen) -> torch.Tensor:
        """[B, N, L] masks, drawn like the public forward_process for each ``masking`` (see the config)."""
        cfg = self.cfg
        B, P = batch.prompt_ids_BP.shape
        G = batch.completion_ids_BG.shape[1]
        N = cfg.num_t
        n_B = cmask_BG.cpu().sum(1)
        comp_BNG = torch.zeros(B, N, G, dtype=torch.bool)  # completion masked by the block/random rule
        keep_BNG = torch.ones(B, N, G, dtype=torch.bool)  # positions the rule leaves eligible for p-masking
        if cfg.masking == "all":
            comp_BNG[:] = True
            keep_BNG[:] = False
        elif cfg.masking == "random":
            for i in range(B):
                n = int(n_B[i])
                lo, hi = max(int(n * cfg.min_t), 1), min(int(n * cfg.max_t), n)
                for m in range(N):
                    k = int(torch.randint(lo, hi + 1, (), generator=gen))
                    comp_BNG[i, m, torch.randperm(n, generator=gen)[:k]] = True
                    comp_BNG[i, m, n:] = True  # after the first EOS: always masked
            keep_BNG[:] = False  # the public rule p-masks only the prompt here
        else:
            nb = G // block
            for i in range(B):
                n = int(n_B[i])
                blocks_i = (n - 1) // block + 1
                chosen = torch.randperm(nb, generator=gen)[:N] % blocks_i
                for m in range(N):
                    start = int(chosen[m]) * block
                    comp_BNG[i, m, start:] = True
                    keep_BNG[i, m, start:] = False
                    if cfg.masking == "block_random":
                        span = min(block, n - start)  # the chosen block's tokens up to the first EOS
                        lo, hi = max(int(span * cfg.min_t), 1), min(int(span * cfg.max_t), span)
                        k = int(torch.randint(lo, hi + 1, (), generator=gen))
                        inside = torch.zeros(span, dtype=torch.bool)
                        inside[torch.randperm(span, generator=gen)[:k]] = True
                        comp_BNG[i, m, start:start + span] = inside
                        comp_BNG[i, m, n:] = True
        prompt_BNP = batch.prompt_mask_BP.cpu().bool()[:, None, :].expand(B, N, P)
        eligible_BNL = torch.cat([prompt_BNP, keep_BNG], 2)
        p_mask_BNL = eligible_BNL & (torch.rand((B, N, P + G), generator=gen) < cfg.prompt_mask_prob)
        return p_mask_BNL | torch.cat([torch.zeros(B, N, P, dtype=torch.bool), comp_BNG], 2)

    def sequence_estimates(self, logp_BNG, masked_BNG, cmask_BG) -> tuple[torch.Tensor, torch.Tensor]:
        """(ELBO_B, negative-side estimate_B) from the per-mask token log-probs."""
        cfg = self.cfg
        scored_BNG = masked_BNG & cmask_BG[:, None, :]
        d_BN = scored_BNG.sum(2).float()
        elbo_B = ((logp_BNG * scored_BNG).sum(2) / d_BN.clamp(min=1e-8)).mean(1)
        if cfg.negative_bound == "elbo":
            return elbo_B, elbo_B
        if cfg.negative_bound == "zero":
            return elbo_B, torch.zeros_like(elbo_B)
        t_BN = d_BN / cmask_BG.sum(1, keepdim=True).float()  # the mask's empirical ratio
        a_BG = (torch.exp(cfg.eubo_beta * logp_BNG) * scored_BNG / t_BN.clamp(min=1e-8)[..., None]).mean(1)
        seen_BG = a_BG > 0
        log_a_BG = torch.where(seen_BG, a_BG, torch.ones_like(a_BG)).log()
        eubo_B = (log_a_BG * seen_BG).sum(1) / seen_BG.sum(1).float().clamp(min=1e-8) / cfg.eubo_beta
        if cfg.negative_bound == "eubo":
            return elbo_B, eubo_B
        return elbo_B, cfg.mix_weight * eubo_B + (1 - cfg.mix_weight) * elbo_B

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """``num_t`` masked copies of the micro-batch in one forward; each sample's share of the token-weighted
        batch mean divided by ``total_samples``."""
        self._check(total_samples)
        device = next(model.parameters()).device
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        cmask_BG = per_sample_extra(micro, "completion_mask_BG").to(device)
        masked_BNL = per_sample_extra(micro, "spg_masked_BNL").to(device)
        G = cmask_BG.shape[1]
        logp_BNG = masked_logprobs(model, micro, masked_BNL.transpose(0, 1), self.mask_id).transpose(0, 1)
        elbo_B, negative_B = self.sequence_estimates(logp_BNG, masked_BNL[..., -G:], cmask_BG)
        est_B = torch.where(adv_B > 0, elbo_B, negative_B)
        n_B = cmask_BG.sum(1).float()
        loss = (-adv_B * est_B * n_B).sum() / max(micro.extras["tokens_per_sample"], 1e-12) / total_samples
        m = backward_once(loss, before_backward, len(micro))
        m.add("tokens", (masked_BNL[..., -G:] & cmask_BG[:, None, :]).sum())
        m.add("elbo_sum", elbo_B.detach().sum())
        m.add("negative_bound_sum", negative_B.detach()[adv_B <= 0].sum())
        m.add("negative_samples", (adv_B <= 0).sum())
        return m.result()
