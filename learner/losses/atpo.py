"""ATPO: AGRPO's objective and budget with the k steps put on high-scoring ("confused") steps, scored
from the rollout's recorded per-step statistics (definitions: docs/ALGORITHMS.md).

Letters: B samples, T steps, K steps per sample.
"""
from __future__ import annotations

import torch

from learner.step_states import completion_blocks, steps_per_block
from learner.losses import steps as step_sel
from learner.losses.actions import edit_read_steps, editing
from learner.losses.agrpo import StepwiseLoss
from learner.losses.base import sampled_tokens


class AtpoLoss(StepwiseLoss):
    """``selection="sample"``: draw ∝ score (mixed with ``score_floor`` of uniform), importance-weighted,
    unbiased. ``selection="topk"``: the k best steps, deterministic and biased."""

    def step_scores(self, batch, eligible_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] scores in [0, 1] (0 off the eligible steps)."""
        if editing(batch):  # a step's block is its round (post-edit steps commit nothing, yet decode their block)
            t_T = torch.arange(batch.num_steps) // steps_per_block(batch)
            block_BT = torch.where(edit_read_steps(batch).cpu(), t_T, -1)
        else:
            block_BT = step_sel.step_blocks(batch.unmask_step_BG, completion_blocks(batch)[0], batch.num_steps,
                                            sampled_tokens(batch))
        return step_sel.atpo_step_scores(
            batch.step_entropy_BT, batch.step_margin_BT, block_BT, eligible_BT,
            score=self.cfg.score, hybrid_weight=self.cfg.hybrid_weight, batch_mix=self.cfg.batch_mix,
        )

    def select_steps(self, batch, eligible_BT, gen):
        scores_BT = self.step_scores(batch, eligible_BT)
        if self.cfg.selection == "topk":
            return step_sel.topk_steps(scores_BT, eligible_BT, self.cfg.k_steps)
        probs_BT = step_sel.score_sampling_probs(scores_BT, eligible_BT, self.cfg.score_floor)
        return step_sel.proportional_steps(probs_BT, self.cfg.k_steps, gen)
