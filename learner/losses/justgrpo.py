"""JustGRPO: GRPO on left-to-right decoding (one token a step, block length 1), where the sampler's likelihood
is the autoregressive one and each step's action is its one committed token:

    L = -(1 / (G * (n_valid + 1e-5))) sum_i sum_t min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i)
    A_i = (r_i - mean(group)) / (std(group) + 1e-4),   n_valid = #{i : A_i != 0} in the batch

r_it the ratio of token t's probability at the state "prompt, tokens < t, masks after" (the sampler's state at
step t) to its behaviour probability. Every step of every trajectory is scored (G forwards per sample), so the
estimate is the exact score function of sequential decoding (tests/test_loss_unbiased.py).

Public code: LeapLabTHU/JustGRPO @ eebe50e7, grpo.py logprob_loss, compute_group_advantages; train.py (valid_samples).

Letters: B samples, G completion length, T steps, K scored steps per sample.
"""
from __future__ import annotations

import torch

from common.trajectory import Trajectory
from learner.losses import steps as step_sel
from learner.losses.advantages import group_advantages
from learner.losses.agrpo import StepwiseLoss
from learner.losses.base import sampled_tokens


class JustGrpoLoss(StepwiseLoss):
    """Every step of a sequential trajectory, weighted 1 / (G (n_valid + 1e-5)) x B (the backward divides by B)."""

    scores_edits = False  # left-to-right decoding commits one token a step and edits none

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        drawn_BG = sampled_tokens(batch)
        _check_sequential(batch.unmask_step_BG, drawn_BG)
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        B, G = batch.completion_ids_BG.shape
        eligible_BT = step_sel.eligible_steps(batch.unmask_step_BG, batch.completion_ids_BG, batch.num_steps, None,
                                              drawn_BG, rule="all").cpu()
        T = eligible_BT.shape[1]
        steps_BT = torch.where(eligible_BT, torch.arange(T).expand(B, T), T).sort(dim=1).values
        valid_BT = steps_BT < T
        K = max(int(valid_BT.sum(1).max()), 1) if B else 1
        if batch.rewards_B is None or batch.group_B is None:
            raise ValueError("the batch has no rewards_B/group_B: the rollout actor must fill them before the learner")
        adv_B = group_advantages(batch.rewards_B, batch.group_B, std_normalize=self.cfg.std_normalize, eps=1e-4)
        n_valid = float((adv_B != 0).sum())
        weight = B / (G * (n_valid + 1e-5))
        device = batch.completion_ids_BG.device
        out.extras["advantages_B"] = adv_B.to(device)
        out.extras["steps_BK"] = torch.where(valid_BT, steps_BT, -1)[:, :K].to(device)
        out.extras["step_weights_BK"] = torch.where(valid_BT, weight, 0.0)[:, :K].float().to(device)
        out.extras["eligible_steps_B"] = eligible_BT.sum(1).to(device)
        return out


def _check_sequential(unmask_step_BG: torch.Tensor, drawn_BG: torch.Tensor) -> None:
    """One drawn token a step, left to right: what JustGRPO's likelihood assumes."""
    step_BG = torch.where(drawn_BG.to(unmask_step_BG.device), unmask_step_BG, -1)
    later_BG = step_BG[:, 1:]
    ordered = bool(((later_BG > step_BG[:, :-1]) | (later_BG < 0)).all())
    if not ordered:
        raise ValueError("justgrpo scores left-to-right decoding with one token a step: set sampler.remasking: "
                         "sequential and sampler.steps = sampler.gen_length")
