"""Random but well-formed trajectories, for the tests and benchmarks that need no model."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from common.trajectory import Trajectory


def random_trajectory(prompt_lens: Sequence[int], gen: int, steps: int, *, seed: int = 0, vocab: int = 100,
                      block_length: int = 4, banned: tuple[int, ...] = (), temperature: float = 0.9,
                      cutoff_every: int | None = 3) -> Trajectory:
    """Left-padded prompts of the given lengths (pad id 0), ``gen`` completion tokens, ``steps`` denoising
    steps; token ids in [5, vocab). Every ``cutoff_every``-th column has no cutoff (-inf, as for tokens
    committed by the step budget); None leaves every cutoff at -inf."""
    g = torch.Generator().manual_seed(seed)
    B, P = len(prompt_lens), max(prompt_lens)
    mask = torch.arange(P)[None, :] >= (P - torch.tensor(list(prompt_lens)))[:, None]
    if cutoff_every is None:
        cutoff = torch.full((B, gen), -math.inf)
    else:
        cutoff = torch.randn(B, gen, generator=g)
        cutoff[:, ::cutoff_every] = -math.inf
    return Trajectory(
        prompt_ids_BP=torch.randint(5, vocab, (B, P), generator=g) * mask,
        prompt_mask_BP=mask,
        completion_ids_BG=torch.randint(5, vocab, (B, gen), generator=g),
        unmask_step_BG=torch.randint(0, steps, (B, gen), generator=g),
        logp_BG=-torch.rand(B, gen, generator=g),
        entropy_BG=torch.rand(B, gen, generator=g),
        margin_BG=torch.rand(B, gen, generator=g),
        cutoff_BG=cutoff,
        step_entropy_BT=torch.rand(B, steps, generator=g),
        step_margin_BT=torch.rand(B, steps, generator=g),
        step_committed_BT=torch.randint(0, 4, (B, steps), generator=g),
        temperature=temperature,
        block_length=block_length,
        banned_ids=tuple(banned),
    )


class EosBiased(torch.nn.Module):
    """A model with EOS made likely: by ``boost`` everywhere, or (``by_row``) only where the hidden state's first
    unit is positive, so some rows stop early while the others keep decoding (for the stopping rules)."""

    def __init__(self, base: torch.nn.Module, eos_id: int, boost: float, by_row: bool = True):
        super().__init__()
        self.base, self.eos_id, self.boost, self.by_row = base, eos_id, boost, by_row
        self.logit_shift = base.logit_shift

    def hidden_states(self, *args, **kwargs):
        return self.base.hidden_states(*args, **kwargs)

    def vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base.vocab_logits(h)
        gate = h[..., 0].sign().clamp(min=0) if self.by_row else 1.0
        logits[..., self.eos_id] += self.boost * gate
        return logits
