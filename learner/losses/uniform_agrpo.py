"""AGRPO on uniform-noise canvases (DiffusionGemma): the clipped-ratio policy gradient on every acting step of
the real trajectory, each row's steps averaged (weight 1/T_i, as AGRPO's release), rows averaged over the
global batch. The score is ``learner.canvas_steps.step_logps``: exact (the self-conditioning chain with
its gradient) or the stop-gradient surrogate; definitions and the measured bias: docs/ALGORITHMS.md.

Letters: B rows, K canvases, S steps per canvas.
"""
from __future__ import annotations

import torch

from common.model.dgemma.modeling import UniformDecoding
from common.model.dgemma.record import CanvasRecord
from learner.canvas_steps import acting_steps, step_logps
from learner.losses.base import clipped_pg


def uniform_agrpo_loss(model, prompt_ids_BP: torch.Tensor, rec: CanvasRecord, d: UniformDecoding,
                       advantages_B: torch.Tensor, *, total_samples: int, exact: bool = True,
                       clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of these rows (already divided by ``total_samples``) and its ratio statistics."""
    scored_BKS = acting_steps(rec)
    logp_BKS = step_logps(model, prompt_ids_BP, rec, d, exact=exact, scored=scored_BKS)
    adv_BKS = advantages_B.float()[:, None, None].expand_as(logp_BKS)
    loss_BKS, ratio_BKS, low, high = clipped_pg(logp_BKS, rec.logp, adv_BKS, clip_low, clip_high)
    per_row_B = (loss_BKS * scored_BKS).sum((1, 2)) / scored_BKS.sum((1, 2)).clamp(min=1)
    n = scored_BKS.sum().clamp(min=1)
    metrics = {"ratio_mean": float((ratio_BKS * scored_BKS).sum() / n),
               "ratio_max_dev": float(((ratio_BKS - 1).abs() * scored_BKS).max()),
               "clipped_frac": float(((low | high) & scored_BKS).sum() / n)}
    return per_row_B.sum() / total_samples, metrics
