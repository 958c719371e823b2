"""How the sampler lays out a denoising step, the rules both sides share: the sampler runs them and the
learner's rebuild of its states (``learner/step_states.py``) recomputes with them.

Letters: B samples, P prompt length (left-padded), L = P + completion length.
"""
from __future__ import annotations

import torch

CACHE_MODES = ("none", "prefix", "dual")


def packed_positions(attn_BL: torch.Tensor) -> torch.Tensor:
    """RoPE positions that count real tokens only (``position_ids='packed'``): padding shares position 0."""
    return (torch.cumsum(attn_BL.long(), dim=1) - 1).clamp(min=0)


def block_starts(prompt_mask_BP: torch.Tensor, block: int, block_length: int, grid: str) -> torch.Tensor:
    """Column [B] where each row's ``block``-th decoded block starts (prompts left-padded to P columns).

    ``completion``: P + block * K for every row. ``sequence``: blocks count K real positions from the
    prompt's first token, so a row with p real prompt tokens starts its first decoded block p mod K columns
    before the completion (holding the prompt's tail)."""
    P = prompt_mask_BP.shape[1]
    if grid == "completion":
        return torch.full((prompt_mask_BP.shape[0],), P + block * block_length, dtype=torch.long,
                          device=prompt_mask_BP.device)
    offset_B = prompt_mask_BP.sum(1) % block_length
    return P - offset_B + block * block_length


def query_columns(mode: str, block_start, block_length: int, L: int, shift: int = 0):
    """[lo, hi) columns a cached step of the block starting at column ``block_start`` (int or [B]) runs; with a
    logit ``shift`` (Dream) the window starts ``shift`` columns early, where the block's first logits sit."""
    if mode == "dual":
        return block_start - shift, block_start + block_length
    if mode == "prefix":
        return block_start - shift, block_start * 0 + L
    raise ValueError(f"unknown cache mode {mode!r}; choose one of {CACHE_MODES}")
