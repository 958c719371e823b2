"""Pure-torch reference of the fused masked-logit sampling kernel (CPU runs and tests use it).

Letters: N scored rows (masked positions of the current block), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """
    x = logits_NV.float()
    if cutoff_N is not None:
        x = x.masked_fill(x < cutoff_N[:, None], float("-inf"))
    scaled = x / temperature if temperature > 0 else x
    logz = torch.logsumexp(scaled, dim=-1)
    logp_all = scaled - logz[:, None]
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    top2 = p.topk(2, dim=-1).values if p.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
    if temperature > 0:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        # Noise depends only on (seed, row id, column): draw per-row streams deterministically.
        u = torch.empty_like(scaled)
        for i, rid in enumerate(row_ids_N.tolist()):
            gen.manual_seed(int(seed) * 1_000_003 + int(rid))
            u[i] = torch.rand(scaled.shape[-1], generator=gen, device=x.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))
        token = (scaled + gumbel).argmax(-1)
    else:
        token = scaled.argmax(-1)
    raw_logz = torch.logsumexp(logits_NV.float(), dim=-1)
    confidence = (logits_NV.float().gather(1, token[:, None])[:, 0] - raw_logz).exp()
    return RowStats(
        token_N=token,
        logp_N=logp_all.gather(1, token[:, None])[:, 0],
        entropy_N=entropy,
        margin_N=top2[:, 0] - top2[:, 1],
        confidence_N=confidence,
    )
