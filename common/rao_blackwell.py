"""The Rao-Blackwellised score of a discarded draw under low-confidence remasking, one definition for the sampler
(which records its behaviour value) and the learner (which scores it).

At a step the sampler draws a token x_k at every still-masked position of the block and commits the n whose
drawn token has the highest confidence (probability under softmax(logits) at temperature 1; ties go to the
lower position). What follows depends on a discarded position k only through the fact that k was not
committed: x_k fell in B_k = {v : conf_k(v) < s}, s the confidence of the n-th committed draw (and
conf_k(v) = s only if k lies after that draw's position). So log P~(B_k), the sampling distribution's mass
on B_k, is the score of a coarser action: still exact, and a conditional expectation of the all-draws term
log p~(x_k), so no noisier (docs/ALGORITHMS.md; enumeration in tests/test_loss_unbiased.py). Valid for
low_confidence remasking without a threshold, a remasking temperature or demoted tokens.

Letters: B samples, R scored positions per sample, N rows, V vocabulary.
"""
from __future__ import annotations

import torch


def commit_floor(conf_N: torch.Tensor, commit_N: torch.Tensor, pos_N: torch.Tensor, sample_N: torch.Tensor,
                 num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (rows grouped by ``sample_N``): the confidence s of its n-th (least confident) committed draw
    and that draw's position (the largest among equal confidences, since ties commit the lower position first);
    +inf / -1 with none."""
    conf_N = torch.where(commit_N, conf_N.float(), float("inf"))
    floor_B = conf_N.new_full((num_samples,), float("inf")).scatter_reduce(0, sample_N, conf_N, "amin")
    at_floor_N = commit_N & (conf_N == floor_B[sample_N])
    last_B = pos_N.new_full((num_samples,), -1).scatter_reduce(0, sample_N, torch.where(at_floor_N, pos_N, -1), "amax")
    return floor_B, last_B


def uncommitted_logp(logits_NV: torch.Tensor, floor_N: torch.Tensor, last_N: torch.Tensor, pos_N: torch.Tensor,
                     temperature: float, cutoff_N: torch.Tensor | None) -> torch.Tensor:
    """log P~(B) of each discarded row: the sampling distribution's mass (``temperature``, support above
    ``cutoff_N``) on the tokens that would have left the row uncommitted. ``logits_NV`` carry -inf on banned
    ids; the set is read from them without gradient (it is piecewise constant in the parameters)."""
    x_NV = logits_NV.float()
    conf_NV = torch.softmax(x_NV.detach(), dim=-1)
    floor_N1 = floor_N.float()[:, None]
    in_set_NV = (conf_NV < floor_N1) | ((conf_NV == floor_N1) & (pos_N > last_N)[:, None])
    if cutoff_N is not None:
        x_NV = x_NV.masked_fill(x_NV < cutoff_N.float()[:, None], float("-inf"))
    logp_NV = torch.log_softmax(x_NV / (temperature if temperature > 0 else 1.0), dim=-1)
    return torch.logsumexp(logp_NV.masked_fill(~in_set_NV, float("-inf")), dim=-1)
