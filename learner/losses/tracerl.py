"""TraceRL (dLLM-RL): PPO-clip on the trajectory's own steps. Every denoising step (or every ``shrink``
consecutive ones, merged) is a row: its committed tokens are scored at the sampler's state before it, all
rows of the batch averaged:

    L = (1/N_rows) sum_rows [ -sum_{j in row} c_j min(r_j A_i, clip(r_j, 1 - eps, 1 + eps) A_i)
                              + beta sum_{j in row} c'_j k3(old_j, new_j) ]

    sdar  (rl_sdar.py):  c_j = c'_j = 1/G; shrink within each block; a row is one round: the r-th (merged) step
                         of every block (block-causal models score all blocks' r-th steps in one forward there)
    llada (rl_llada.py): c_j = 1/|row|, c'_j = 1; shrink over the whole completion; a row is one (merged) step

r_j = p(x_j | s) / p_old(x_j | s) with p_old the policy before this batch's updates (the public code computes it
before training; here at each row's first visit), s the state before the row's first step: with shrink 1 the
sampler's own state, so with ``post_num: null`` and ``variant: sdar`` the sum over rows is the exact score
function of the committed tokens (exact when the commit rule reads no draws: random, top_prob, margin,
sequential; tests/test_loss_unbiased.py). shrink > 1 scores later steps' tokens at an earlier state (a
surrogate), llada's 1/|row| reweights steps, post_num drops padding terms. Advantages: group z-scores with the
population std (0 for a group with one reward), as rl_reward.py writes them.

Where ours differs: tokens are scored under the sampler's distribution (temperature, support, banned ids; the
public code scores raw logits at temperature 1, which is the sampler's only for rollouts at T=1 over the full
vocabulary, rl_sdar.yaml's setting); padding is every token after the first EOS (the public code's pad id,
which for LLaDA is also its EOS) and post_num counts it over the whole completion (rl_sdar.py counts it per
round: the same for post_num 0); rl_sdar.py clamps log-ratios to [-10, 10]; the public rows of one rollout
batch are spread over several optimizer steps, here one optimizer step per inner epoch takes them all; groups
whose pass rate is outside [0.2, 0.8] are dropped by the public reward step, not here.

Public code: Gen-Verse/dLLM-RL @ 10b4fd1c, train/rl_sdar.py (collapse_k_unique, one_round_vectorized,
collect_training_data, forward_process), train/rl_llada.py (prepare_inputs_and_labels_for_text,
forward_process), reward/rl_reward.py (z_score_normalize).

Letters: B samples, G completion length, K rows (columns) per sample, N scored tokens of one column.
"""
from __future__ import annotations

import itertools

import torch

from learner.step_states import completion_blocks, policy_hidden
from common.trajectory import Trajectory
from learner.losses.advantages import group_advantages
from learner.losses.base import MetricSums, PolicyLoss, clipped_pg, per_sample_extra, sampled_tokens, sampler_logprobs
from learner.losses.surrogate import first_eos_mask, group_ids

_BATCH_KEYS = itertools.count()


class TraceRLLoss(PolicyLoss):
    """TraceRL's loss; one forward + backward per (merged) step column."""

    def __init__(self, cfg, *, mask_id: int, pad_id: int, eos_id: int | None = None):
        super().__init__(cfg, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id)
        self._key: int | None = None
        self._old: dict[tuple[int, int], torch.Tensor] = {}

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages, each token's column (-1: not scored), each column's state step and token weights."""
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        device = batch.completion_ids_BG.device
        if epoch == 0 or self._key is None:
            self._key, self._old = next(_BATCH_KEYS), {}
        B, G = batch.completion_ids_BG.shape
        drawn_BG = sampled_tokens(batch).cpu()
        scored_BG = drawn_BG & ~self._dropped_padding(batch.completion_ids_BG.cpu())
        block_BG = completion_blocks(batch)[0].cpu() if self.cfg.variant == "sdar" else torch.zeros(B, G, dtype=torch.long)
        col_BG, step_BK, round_BK = trace_rows(batch.unmask_step_BG.cpu(), block_BG, drawn_BG, scored_BG, self.cfg.shrink)
        K = step_BK.shape[1]
        n_BK = torch.zeros(B, K).index_put_((torch.arange(B)[:, None].expand(B, G)[col_BG >= 0], col_BG[col_BG >= 0]),
                                            torch.ones(()), accumulate=True)
        if self.cfg.variant == "sdar":
            rows = sum(len(set(r.tolist()) - {-1}) for r in round_BK)
            w_BK = torch.full((B, K), 1.0 / G)
            kl_w_BK = w_BK
        else:
            rows = int((n_BK > 0).sum())
            w_BK, kl_w_BK = 1.0 / n_BK.clamp(min=1), torch.ones(B, K)
        scale = B / max(rows, 1)  # the backward divides by the batch size; the public loss by the rows
        out.extras["advantages_B"] = self._trace_advantages(batch).to(device)
        out.extras["trace_col_BG"] = col_BG.to(device)
        out.extras["trace_step_BK"] = step_BK.to(device)
        out.extras["trace_weight_BK"] = (w_BK * scale).to(device)
        out.extras["trace_kl_weight_BK"] = (kl_w_BK * scale).to(device)
        out.extras["row_id_B"] = torch.arange(B, device=device)
        out.extras["epoch"] = int(epoch)
        out.extras["batch_key"] = self._key
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """One forward + backward per column (the same count on every rank: the whole batch's K)."""
        if total_samples <= 0:
            raise ValueError(f"total_samples must be the global batch size (> 0), got {total_samples}")
        device = next(model.parameters()).device
        adv_B = per_sample_extra(micro, "advantages_B").to(device).float()
        col_BG = per_sample_extra(micro, "trace_col_BG").to(device)
        step_BK = per_sample_extra(micro, "trace_step_BK").to(device)
        w_BK = per_sample_extra(micro, "trace_weight_BK").to(device)
        kl_w_BK = per_sample_extra(micro, "trace_kl_weight_BK").to(device)
        rows = [(micro.extras["batch_key"], int(r)) for r in micro.extras["row_id_B"]]
        first_visit = any(r not in self._old for r in rows)
        old_BG = torch.zeros(col_BG.shape, device=device) if first_visit else torch.stack([self._old[r] for r in rows]).to(device)
        P = micro.prompt_ids_BP.shape[1]
        K = step_BK.shape[1]
        m = MetricSums()
        for j in range(K):
            b_N, g_N = (col_BG == j).nonzero(as_tuple=True)
            hidden = policy_hidden(model, micro, step_BK[:, j], self.mask_id, device)
            logp_N = sampler_logprobs(
                model.vocab_logits(hidden.rows(b_N, P + g_N)), micro.completion_ids_BG.to(device)[b_N, g_N],
                temperature=micro.temperature, cutoff_N=micro.cutoff_BG.to(device)[b_N, g_N],
                banned_ids=tuple(micro.banned_ids))
            if first_visit:
                old_BG[b_N, g_N] = logp_N.detach()
            old_N = old_BG[b_N, g_N]
            tok_loss_N, ratio_N, low_N, high_N = clipped_pg(logp_N, old_N, adv_B[b_N], self.clip_low, self.clip_high)
            loss = (w_BK[b_N, j] * tok_loss_N).sum()
            kl_N = None
            if self.cfg.beta_kl > 0:  # k3 of the policy before the batch's updates
                d_N = old_N - logp_N
                kl_N = torch.exp(d_N) - d_N - 1
                loss = loss + self.cfg.beta_kl * (kl_w_BK[b_N, j] * kl_N).sum()
            loss = loss / total_samples
            if before_backward is not None:
                before_backward(j == K - 1)
            loss.backward()
            m.add("loss", loss)
            m.add("steps", (step_BK[:, j] >= 0).sum())
            m.token_stats(ratio_N, low_N, high_N, kl_N)
        if first_visit:
            self._old.update({r: old_BG[i].detach().cpu() for i, r in enumerate(rows)})
        m.add("samples", len(micro))
        return m.result()

    def _dropped_padding(self, completion_ids_BG: torch.Tensor) -> torch.Tensor:
        """[B, G] padding left out of the loss: the tokens after the first EOS beyond the first ``post_num``."""
        if self.cfg.post_num is None or self.eos_id is None:
            return torch.zeros_like(completion_ids_BG, dtype=torch.bool)
        pad_BG = ~first_eos_mask(completion_ids_BG, self.eos_id)
        return pad_BG & (pad_BG.long().cumsum(1) > self.cfg.post_num)

    def _trace_advantages(self, batch: Trajectory) -> torch.Tensor:
        """r - group mean, divided by the group's population std (0 where that std is 0) with std_normalize."""
        if batch.rewards_B is None or batch.group_B is None:
            raise ValueError("the batch has no rewards_B/group_B: the rollout actor must fill them before the learner")
        adv_B = group_advantages(batch.rewards_B, batch.group_B, std_normalize=False).double()
        if not self.cfg.std_normalize:
            return adv_B.float()
        gid_B, n_B = group_ids(batch.group_B)
        var_B = torch.zeros(int(gid_B.max()) + 1, dtype=torch.float64).index_add_(0, gid_B, adv_B**2)[gid_B] / n_B
        std_B = var_B.sqrt()
        return torch.where(std_B > 0, adv_B / std_B.clamp(min=1e-300), 0.0).float()


def trace_rows(unmask_step_BG, block_BG, drawn_BG, scored_BG, shrink: int):
    """Group each block's drawn steps ``shrink`` at a time (in step order) and give every group with a scored
    token a column, in order of its first step. Returns ``col_BG`` (-1: not scored), ``step_BK`` (the column's
    state: its group's first step; -1 padding) and ``round_BK`` (the group's index within its block; -1 padding)."""
    B, G = unmask_step_BG.shape
    col_BG = torch.full((B, G), -1, dtype=torch.long)
    per_sample = []
    for b in range(B):
        groups = {}  # (block, group in block) -> (first step, positions)
        for k in block_BG[b][drawn_BG[b]].unique().tolist():
            in_block = drawn_BG[b] & (block_BG[b] == k)
            steps = unmask_step_BG[b][in_block].unique(sorted=True)
            rank = torch.searchsorted(steps, unmask_step_BG[b][in_block])
            for pos, r in zip(in_block.nonzero()[:, 0].tolist(), (rank // shrink).tolist()):
                if scored_BG[b, pos]:
                    groups.setdefault((k, r), (int(steps[r * shrink]), []))[1].append(pos)
        order = sorted(groups.items(), key=lambda kv: kv[1][0])
        for c, (_, (_, positions)) in enumerate(order):
            col_BG[b, positions] = c
        per_sample.append([(first, r) for (_, r), (first, _) in order])
    K = max([len(s) for s in per_sample] + [1])
    step_BK = torch.full((B, K), -1, dtype=torch.long)
    round_BK = torch.full((B, K), -1, dtype=torch.long)
    for b, cols in enumerate(per_sample):
        for c, (first, r) in enumerate(cols):
            step_BK[b, c], round_BK[b, c] = first, r
    return col_BG, step_BK, round_BK
