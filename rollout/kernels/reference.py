"""Pure-torch reference of the fused masked-logit sampling kernel (CPU runs and tests use it).

Letters: N scored rows (masked positions of the current block), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.kernels.philox import exponential_noise

LOG2E = 1.4426950408889634


@dataclass
class RowStats:
    """Per scored row: the sampled token and statistics of the distribution it was drawn from."""

    token_N: torch.Tensor  # int64
    logp_N: torch.Tensor  # log p~(token): p~ = softmax(logits / T) restricted to the support
    entropy_N: torch.Tensor  # entropy of p~
    margin_N: torch.Tensor  # p~(top1) - p~(top2)
    confidence_N: torch.Tensor  # softmax(logits)[token] at temperature 1 (LLaDA's remasking score)


def support_cutoff(logits_NV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """Per-row smallest raw logit kept by top-k and/or top-p (nucleus at ``temperature``), or None.

    Storing this one float per token lets the learner rebuild the sampler's support exactly.
    Logits equal to the cut-off are kept.
    """
    if top_k is None and top_p is None:
        return None
    x = logits_NV.float()
    cutoff = torch.full(x.shape[:1], float("-inf"), device=x.device)
    if top_k is not None and top_k < x.shape[-1]:
        cutoff = x.topk(top_k, dim=-1).values[:, -1]
    if top_p is not None and top_p < 1.0:
        scaled = x.masked_fill(x < cutoff[:, None], float("-inf")) / (temperature if temperature > 0 else 1.0)
        sorted_scaled, order = scaled.sort(dim=-1, descending=True)
        mass_before = sorted_scaled.softmax(-1).cumsum(-1) - sorted_scaled.softmax(-1)
        keep = (mass_before < top_p).sum(-1).clamp(min=1)  # tokens needed to reach top_p
        kept_last = x.gather(1, order.gather(1, (keep - 1)[:, None]))[:, 0]
        cutoff = torch.maximum(cutoff, kept_last)
    return cutoff


def sample_rows_reference(
    logits_NV: torch.Tensor,
    temperature: float,
    seed: int,
    row_ids_N: torch.Tensor,
    cutoff_N: torch.Tensor | None = None,
) -> RowStats:
    """Gumbel-max sample each row at ``temperature`` and report its statistics, in fp32.

    ``row_ids_N`` are global counters of the rows (so the noise of a row does not depend on which
    other rows are scored together); ``cutoff_N`` removes logits below it (top-k/top-p support).
    At temperature 0 the token is the argmax and the statistics are those of softmax(logits).
    The noise is the Philox stream of ``rollout.kernels.philox``, the one the Triton kernel draws.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    x = logits_NV.float()
    if cutoff_N is not None:
        x = x.masked_fill(x < cutoff_N[:, None].float(), float("-inf"))
    t = temperature if temperature > 0 else 1.0
    # The kernel multiplies by log2(e)/T in fp32; the Gumbel key uses the very same product so
    # both pick the same token (up to ulp-level ties of their log2 implementations).
    scaled2 = x * torch.tensor(LOG2E / t, dtype=torch.float32)
    scaled = x / t
    logz = torch.logsumexp(scaled, dim=-1)
    logp_all = scaled - logz[:, None]
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    top2 = p.topk(2, dim=-1).values if p.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
    if temperature > 0:
        exp_NV = exponential_noise(int(seed), row_ids_N.to(x.device), x.shape[-1])
        token = (scaled2 - torch.log2(exp_NV)).argmax(-1)
    else:
        token = x.argmax(-1)
    raw_logz = torch.logsumexp(logits_NV.float(), dim=-1)
    confidence = (logits_NV.float().gather(1, token[:, None])[:, 0] - raw_logz).exp()
    return RowStats(
        token_N=token,
        logp_N=logp_all.gather(1, token[:, None])[:, 0],
        entropy_N=entropy,
        margin_N=top2[:, 0] - top2[:, 1],
        confidence_N=confidence,
    )
