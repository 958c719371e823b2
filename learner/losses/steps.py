"""Which denoising steps a trajectory's gradient is computed on, and the weights that make the
k-step estimate stand for the full sum over its eligible steps.

Letters: B samples, G completion length, T denoising steps, K steps drawn per sample.

Every selector returns ``steps_BK`` (global step index, -1 for padding) and ``weights_BK`` (float32,
0 for padding). The estimator is  sum_k weights_BK[i, k] * f_i(steps_BK[i, k]);  for the unbiased
selectors its expectation is  sum_{t eligible} f_i(t)  for every function f_i. All randomness comes
from the ``torch.Generator`` passed in, drawn on CPU, so every rank computes the same draws.
"""
from __future__ import annotations

import torch

_NO_STEP = -1


def eligible_steps(
    unmask_step_BG: torch.Tensor,
    completion_ids_BG: torch.Tensor,
    num_steps: int,
    eos_id: int | None,
    drawn_BG: torch.Tensor | None = None,
    rule: str = "non_eos",
) -> torch.Tensor:
    """[B, T] bool: the steps whose actions are scored, among those that committed a drawn token
    (``drawn_BG``; all tokens if None).

    ``non_eos``: steps that committed a token other than ``eos_id``; ``through_last`` (AGRPO's release):
    every step up to the last such step, EOS-only steps before it included; ``all``: every step (the exact
    sum: the other rules drop the EOS-only steps' terms). ``eos_id`` None makes all three the same.
    """
    B = unmask_step_BG.shape[0]
    drawn_BG = torch.ones_like(unmask_step_BG, dtype=torch.bool) if drawn_BG is None else drawn_BG.to(unmask_step_BG.device)
    content_BG = drawn_BG if eos_id is None else drawn_BG & (completion_ids_BG != eos_id)
    step_BG = unmask_step_BG.clamp(0, num_steps - 1)

    def has_BT(keep_BG: torch.Tensor) -> torch.Tensor:
        counts_BT = torch.zeros(B, num_steps, dtype=torch.int64, device=unmask_step_BG.device)
        return counts_BT.scatter_add_(1, step_BG, keep_BG.long()) > 0

    if rule == "non_eos":
        return has_BT(content_BG)
    if rule == "all":
        return has_BT(drawn_BG)
    if rule != "through_last":
        raise ValueError(f"unknown eligible_steps rule {rule!r}; choose through_last, non_eos or all")
    last_B = torch.where(content_BG, step_BG, -1).amax(1) if step_BG.shape[1] else torch.full((B,), -1)
    return has_BT(drawn_BG) & (torch.arange(num_steps, device=step_BG.device)[None, :] <= last_B[:, None])


def _ordered(eligible_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eligible step ids first, in increasing order ([B, T]), and their count per row ([B])."""
    T = eligible_BT.shape[1]
    t_BT = torch.arange(T).expand_as(eligible_BT)
    order_BT = torch.where(eligible_BT, t_BT, T).sort(dim=1).values
    return order_BT, eligible_BT.sum(1)


def uniform_steps(eligible_BT: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k i.i.d. uniform draws among the T_i eligible steps, each weighted T_i / k."""
    order_BT, count_B = _ordered(eligible_BT.cpu())
    u_BK = torch.rand(count_B.shape[0], k, generator=gen, dtype=torch.float64)
    idx_BK = (u_BK * count_B[:, None]).long().clamp(max=(count_B - 1).clamp(min=0)[:, None])
    return _finish(order_BT, idx_BK, (count_B.double() / k)[:, None].expand(-1, k), count_B[:, None] > 0)


def stratified_steps(eligible_BT: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the eligible steps into k contiguous strata of (near-)equal size, draw one step per stratum
    uniformly and weight it by its stratum's size. Unbiased; when T_i <= k every step is taken once
    (weight 1, the exact sum) and the empty strata are padding."""
    order_BT, count_B = _ordered(eligible_BT.cpu())
    j_K = torch.arange(k)
    lo_BK = (j_K[None, :] * count_B[:, None]) // k
    hi_BK = ((j_K[None, :] + 1) * count_B[:, None]) // k
    size_BK = hi_BK - lo_BK
    u_BK = torch.rand(count_B.shape[0], k, generator=gen, dtype=torch.float64)
    idx_BK = lo_BK + (u_BK * size_BK).long().clamp(max=(size_BK - 1).clamp(min=0))
    return _finish(order_BT, idx_BK, size_BK.double(), size_BK > 0)


def agrpo_steps(sampling: str, eligible_BT: torch.Tensor, k: int, gen: torch.Generator,
                entropy_probs) -> tuple[torch.Tensor, torch.Tensor]:
    """AGRPO's k steps by ``algorithm.step_sampling``: i.i.d. uniform, stratified, or drawn proportionally to
    ``entropy_probs()`` (a [B, T] distribution, computed only then) with importance weights; all unbiased."""
    if sampling == "uniform":
        return uniform_steps(eligible_BT, k, gen)
    if sampling == "stratified":
        return stratified_steps(eligible_BT, k, gen)
    return proportional_steps(entropy_probs(), k, gen)


def proportional_steps(probs_BT: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws from per-row step distributions ``probs_BT`` (zero off the eligible steps), weighted
    1 / (k p(t)) so the estimate is unbiased for the full sum.

    Draws use stratified uniforms on the CDF (u_j in [j/k, (j+1)/k)): each u_j is uniform on its
    stratum, so E[sum_j f(t_j) / (k p(t_j))] = integral of f/p over [0, 1) = sum_t f(t) still holds,
    with lower variance than i.i.d. draws. Rows whose probabilities are all zero get padding.
    """
    p_BT = probs_BT.detach().cpu().double()
    B, T = p_BT.shape
    total_B = p_BT.sum(1)
    valid_B = total_B > 0
    p_BT = p_BT / total_B.clamp(min=1e-300)[:, None]
    cdf_BT = p_BT.cumsum(1)
    u_BK = (torch.arange(k)[None, :] + torch.rand(B, k, generator=gen, dtype=torch.float64)) / k
    u_BK = u_BK * cdf_BT[:, -1:]  # the CDF's last value is 1 up to rounding; stay strictly inside it
    t_BK = torch.searchsorted(cdf_BT, u_BK, right=True)
    # Rounding can land past the last step with mass; move it back onto that step.
    last_B = torch.searchsorted(cdf_BT, cdf_BT[:, -1:].contiguous()).clamp(max=T - 1)[:, 0]  # last step with mass
    t_BK = torch.minimum(t_BK, last_B[:, None])
    p_BK = p_BT.gather(1, t_BK)
    assert bool((p_BK[valid_B] > 0).all()), "drew a step with zero probability"
    weights_BK = torch.where(valid_B[:, None], 1.0 / (k * p_BK.clamp(min=1e-300)), 0.0)
    steps_BK = torch.where(valid_B[:, None], t_BK, _NO_STEP)
    return steps_BK, weights_BK.float()


def entropy_step_probs(entropy_BG: torch.Tensor, unmask_step_BG: torch.Tensor, eligible_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] step distribution proportional to the summed per-token entropy the step committed.

    A tiny floor (1e-6 of the row's mean) keeps zero-entropy eligible steps reachable, which
    unbiasedness needs; such steps have (near-)zero gradient anyway.
    """
    B, T = eligible_BT.shape
    h_BT = torch.zeros(B, T, dtype=torch.float64)
    h_BT.scatter_add_(1, unmask_step_BG.cpu().clamp(0, T - 1), entropy_BG.detach().cpu().double().clamp(min=0))
    elig_BT = eligible_BT.cpu()
    h_BT = h_BT * elig_BT
    mean_B = h_BT.sum(1) / elig_BT.sum(1).clamp(min=1)
    h_BT = (h_BT + (1e-6 * mean_B + 1e-12)[:, None]) * elig_BT
    return h_BT / h_BT.sum(1, keepdim=True).clamp(min=1e-300)


def topk_steps(scores_BT: torch.Tensor, eligible_BT: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring eligible steps, each weighted T_i / k (all of them, weight 1, when T_i <= k).

    Deterministic and BIASED: steps outside the top k never contribute. The weight only keeps the
    loss on the same scale as the unbiased selectors.
    """
    elig_BT = eligible_BT.cpu()
    count_B = elig_BT.sum(1)
    s_BT = torch.where(elig_BT, scores_BT.detach().cpu().double(), float("-inf"))
    kk = min(k, s_BT.shape[1])
    # Ties (e.g. equal scores) break towards earlier steps: stable descending sort.
    top_BK = s_BT.sort(dim=1, descending=True, stable=True).indices[:, :kk]
    valid_BK = torch.arange(kk)[None, :] < count_B.clamp(max=k)[:, None]
    w_B = torch.where(count_B <= k, 1.0, count_B.double() / k)
    steps_BK = torch.where(valid_BK, top_BK, _NO_STEP)
    weights_BK = torch.where(valid_BK, w_B[:, None], 0.0)
    if kk < k:  # fewer steps than the budget: pad to K columns
        pad = k - kk
        steps_BK = torch.cat([steps_BK, torch.full((steps_BK.shape[0], pad), _NO_STEP)], 1)
        weights_BK = torch.cat([weights_BK, torch.zeros(weights_BK.shape[0], pad, dtype=weights_BK.dtype)], 1)
    return steps_BK, weights_BK.float()


def _finish(order_BT, idx_BK, weight_BK, valid_BK):
    steps_BK = torch.where(valid_BK, order_BT.gather(1, idx_BK.clamp(min=0)), _NO_STEP)
    return steps_BK, torch.where(valid_BK, weight_BK, 0.0).float()


# --- ATPO step scores (from the recorded rollout statistics only; no forward pass)


def step_blocks(unmask_step_BG: torch.Tensor, blk_BG: torch.Tensor, num_steps: int,
                drawn_BG: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] block index each step drew tokens in (-1 for a step that drew nothing), from the block of each
    completion position ``blk_BG`` (``learner.step_states.completion_blocks``)."""
    blk_BG = blk_BG.to(unmask_step_BG.device)
    if drawn_BG is not None:  # the sampler's filled EOS tail belongs to later blocks; it was not drawn
        blk_BG = torch.where(drawn_BG.to(blk_BG.device), blk_BG, -1)
    out_BT = torch.full((unmask_step_BG.shape[0], num_steps), -1, dtype=torch.int64, device=unmask_step_BG.device)
    return out_BT.scatter_reduce(1, unmask_step_BG.clamp(0, num_steps - 1), blk_BG, reduce="amax")


def atpo_components(step_entropy_BT: torch.Tensor, step_margin_BT: torch.Tensor, block_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw per-step metrics: entropy H_t, CM_t = 1 - mean margin, RoEC_t = |H_t - H_{t-1}|.

    RoEC is 0 at the first step of the trajectory and of every block: there the entropy jumps
    because a new block's positions are being scored, not because the model got confused.
    """
    H_BT = step_entropy_BT.detach().cpu().double()
    cm_BT = 1.0 - step_margin_BT.detach().cpu().double()
    blk_BT = block_BT.cpu()
    roec_BT = torch.zeros_like(H_BT)
    if H_BT.shape[1] > 1:
        same_BT = blk_BT[:, 1:] == blk_BT[:, :-1]
        roec_BT[:, 1:] = torch.where(same_BT, (H_BT[:, 1:] - H_BT[:, :-1]).abs(), 0.0)
    return {"entropy": H_BT, "cm": cm_BT, "roec": roec_BT}


def _minmax(x_BT: torch.Tensor, eligible_BT: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation to [0, 1] over the eligible steps (0 where the row is flat)."""
    lo_B = torch.where(eligible_BT, x_BT, float("inf")).amin(1)
    hi_B = torch.where(eligible_BT, x_BT, float("-inf")).amax(1)
    span_B = hi_B - lo_B
    ok_B = torch.isfinite(span_B) & (span_B > 0)
    out_BT = (x_BT - torch.where(ok_B, lo_B, 0.0)[:, None]) / torch.where(ok_B, span_B, 1.0)[:, None]
    return torch.where(eligible_BT & ok_B[:, None], out_BT, 0.0)


def atpo_step_scores(
    step_entropy_BT: torch.Tensor,
    step_margin_BT: torch.Tensor,
    block_BT: torch.Tensor,
    eligible_BT: torch.Tensor,
    *,
    score: str,
    hybrid_weight: float,
    batch_mix: float,
) -> torch.Tensor:
    """[B, T] ATPO scores in [0, 1], zero off the eligible steps (definitions in docs/ALGORITHMS.md).

    1. each metric is min-max normalised per trajectory over its eligible steps;
    2. ``hybrid`` = w * norm(RoEC) + (1 - w) * norm(CM);
    3. the batch profile (the mean score of step t over the trajectories where t is eligible) is
       mixed in: score = (1 - batch_mix) * own + batch_mix * profile.
    """
    elig_BT = eligible_BT.cpu()
    comp = atpo_components(step_entropy_BT, step_margin_BT, block_BT)
    if score == "hybrid":
        own_BT = hybrid_weight * _minmax(comp["roec"], elig_BT) + (1 - hybrid_weight) * _minmax(comp["cm"], elig_BT)
    elif score in comp:
        own_BT = _minmax(comp[score], elig_BT)
    else:
        raise ValueError(f"unknown ATPO score {score!r}; choose entropy, cm, roec or hybrid")
    n_T = elig_BT.sum(0)
    profile_T = (own_BT * elig_BT).sum(0) / n_T.clamp(min=1)
    mixed_BT = (1 - batch_mix) * own_BT + batch_mix * profile_T[None, :]
    return torch.where(elig_BT, mixed_BT, 0.0)


def score_sampling_probs(scores_BT: torch.Tensor, eligible_BT: torch.Tensor, floor: float) -> torch.Tensor:
    """q_t = (1 - floor) * s_t / sum(s) + floor / T_i over the eligible steps (uniform if all s are 0)."""
    elig_BT = eligible_BT.cpu()
    s_BT = torch.where(elig_BT, scores_BT.detach().cpu().double().clamp(min=0), 0.0)
    count_B = elig_BT.sum(1).double().clamp(min=1)
    total_B = s_BT.sum(1, keepdim=True)
    uniform_BT = elig_BT.double() / count_B[:, None]
    prop_BT = torch.where(total_B > 0, s_BT / total_B.clamp(min=1e-300), uniform_BT)
    return (1 - floor) * prop_BT + floor * uniform_BT
