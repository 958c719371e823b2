"""Off-policy groups (trained after the learner has moved on from the policy that sampled them): their policy
lag, the decoupled objective (AReaL-style: trust region against the proximal policy, truncated importance
weight against the behaviour one) and the staleness metrics of a learner step. Definitions and what is exact:
docs/ALGORITHMS.md, "Asynchronous corrections".

Letters: B samples, N scored token rows.
"""
from __future__ import annotations

import torch

from learner.losses.base import MetricSums, clipped_pg

LAG_KEY = "policy_lag_B"  # batch.extras: learner version at the step's start minus the version that sampled the row


def policy_lag(policy_version_B: torch.Tensor, version: int) -> torch.Tensor:
    """[B] int64 lag of each row behind the learner's ``version``: 0 = sampled by the current weights; negative
    = by weights a learner rolled back to a checkpoint no longer has (stale as well: any lag but 0 is)."""
    return version - policy_version_B.long()


def decoupled_pg(logp_N, prox_N, behav_N, adv_N, clip_low: float, clip_high: float, cap: float):
    """Per-token loss  -w min(r A, clip(r, 1-lo, 1+hi) A),  r = pi/pi_prox,  w = min(pi_prox/pi_behav, cap)
    (w detached); returns it with r and the low/high-clipped flags, as ``clipped_pg``."""
    loss_N, ratio_N, low_N, high_N = clipped_pg(logp_N, prox_N, adv_N, clip_low, clip_high)
    return torch.exp(prox_N - behav_N).detach().clamp(max=cap) * loss_N, ratio_N, low_N, high_N


def add_weight_sums(m: MetricSums, w_N: torch.Tensor, cap: float) -> None:
    """Sums of the stale draws' importance weights pi_prox/pi_behav into ``m``, for ``weight_summary``."""
    m.add("stale_tokens", w_N.numel())
    m.add("is_weight_sum", w_N.sum())
    m.add("is_weight_sq_sum", (w_N.double() ** 2).sum())
    m.add("is_truncated_tokens", (w_N > cap).sum())


def lag_metrics(lag_B: torch.Tensor, group_B: torch.Tensor) -> dict[str, float]:
    """Per-step policy lag of the groups trained: mean, max, the share with lag != 0 and the count at each lag."""
    _, first = torch.unique(group_B, return_inverse=True)
    lag_G = torch.zeros(int(first.max()) + 1, dtype=torch.long).scatter_reduce(
        0, first.cpu(), lag_B.long().cpu(), "amax", include_self=False)  # one version per group: any row's
    out = {"policy_lag_mean": float(lag_G.float().mean()), "policy_lag_max": float(lag_G.max()),
           "stale_group_share": float((lag_G != 0).float().mean())}
    values, counts = torch.unique(lag_G, return_counts=True)
    out.update({f"groups_lag_{int(v)}": float(c) for v, c in zip(values, counts)})
    return out


def weight_summary(sums: dict[str, float]) -> dict[str, float]:
    """Mean, std and truncated share of the stale tokens' importance weights pi_prox/pi_behav, from a step's
    all-reduced sums (empty when the step scored no stale token)."""
    n = sums.get("stale_tokens", 0.0)
    if n <= 0:
        return {}
    mean = sums["is_weight_sum"] / n
    var = max(sums["is_weight_sq_sum"] / n - mean * mean, 0.0)
    return {"is_weight_mean": mean, "is_weight_std": var ** 0.5, "is_truncated_share": sums["is_truncated_tokens"] / n}
