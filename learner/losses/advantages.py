"""Group-relative advantages (GRPO): each sample's reward minus the mean reward of its prompt group.

Letters: B samples.
"""
from __future__ import annotations

import torch


def group_advantages(rewards_B: torch.Tensor, group_B: torch.Tensor, *, std_normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean(r of i's group), optionally divided by the group's (unbiased) std + ``eps``.

    Groups are identified by equal ``group_B`` values and need not be contiguous. A group of one
    sample gets advantage 0 (it has no baseline to compare with).
    """
    if rewards_B.shape != group_B.shape or rewards_B.dim() != 1:
        raise ValueError(f"rewards_B {tuple(rewards_B.shape)} and group_B {tuple(group_B.shape)} must be equal 1-d shapes")
    r_B = rewards_B.double()
    _, gid_B = torch.unique(group_B, return_inverse=True)
    n = int(gid_B.max()) + 1 if gid_B.numel() else 0
    count_N = torch.zeros(n, dtype=torch.float64, device=r_B.device).index_add_(0, gid_B, torch.ones_like(r_B))
    mean_N = torch.zeros(n, dtype=torch.float64, device=r_B.device).index_add_(0, gid_B, r_B) / count_N
    adv_B = r_B - mean_N[gid_B]
    if std_normalize:
        sq_N = torch.zeros(n, dtype=torch.float64, device=r_B.device).index_add_(0, gid_B, adv_B**2)
        # Unbiased std like GRPO/d1; a singleton group has advantage 0 already, keep its divisor finite.
        std_N = (sq_N / (count_N - 1).clamp(min=1)).sqrt()
        adv_B = adv_B / (std_N[gid_B] + eps)
    return adv_B.float()
