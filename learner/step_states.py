"""The sampler's computation at any step of a recorded trajectory, rebuilt by the learner (with gradients)
from the layout rules the sampler runs (``common/step_layout.py``).

Letters: B samples, P prompt length (left-padded), G completion length, L = P + G, Q query columns of a
cached forward, D model width.

The cache rule (``SamplerConfig.cache``) is part of the policy. A block's first step (and every
``cache_refresh``-th step inside it) runs the full sequence and keeps every column's keys/values: the
*anchor* forward. Its other steps run only the query columns (``dual``: the block; ``prefix``: the block
and everything after it), attending to the anchor's keys/values elsewhere. The anchor state is the
trajectory's state at the anchor step, so ``policy_hidden`` rebuilds it exactly: anchor forward, then
the query forward on that cache, the gradient flowing through both.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from common.step_layout import block_starts, packed_positions, query_columns
from common.trajectory import Trajectory


def state_inputs(traj: Trajectory, step, mask_id: int, device=None):
    """The sampler's model input before step ``step`` (int, or [B] per-sample steps): ids [B, L], attention
    mask, positions.

    Completion tokens committed at a step >= t are masked again (with token editing the step's block is the one
    the sampler recorded, ``edited_state``); the prompt stays left-padded with its
    padding excluded from attention (no mask at all for an unpadded batch, the sampler's kernel path),
    and positions follow ``extras["position_ids"]``: "absolute" = 0..L-1 per column as LLaDA's
    reference (None), "packed" = real tokens only. No guidance: guided rollouts are never trained on.
    """
    device = traj.completion_ids_BG.device if device is None else device
    step_B1 = torch.as_tensor(step, device=device).reshape(-1, 1)
    if editing(traj):
        ids_BL = edited_state(traj, step_B1.expand(len(traj), 1)[:, 0], mask_id, device)
    else:
        unmask_BG = traj.unmask_step_BG.to(device)
        comp_BG = traj.completion_ids_BG.to(device).masked_fill(unmask_BG >= step_B1, mask_id)
        ids_BL = torch.cat([traj.prompt_ids_BP.to(device), comp_BG], dim=1)
    prompt_mask_BP = traj.prompt_mask_BP.to(device).bool()
    if bool(prompt_mask_BP.all()):
        return ids_BL, None, None
    attn_BL = torch.cat([prompt_mask_BP, torch.ones_like(traj.completion_ids_BG, dtype=torch.bool, device=device)], dim=1)
    pos_BL = packed_positions(attn_BL) if traj.extras.get("position_ids", "absolute") == "packed" else None
    return ids_BL, attn_BL, pos_BL


def editing(traj: Trajectory) -> bool:
    """The batch was decoded with token editing (``sampler.edit_threshold``): its record is ``edit_*_BTK``."""
    return "edit_draws_BTK" in traj.extras


def edited_state(traj: Trajectory, step_B: torch.Tensor, mask_id: int, device) -> torch.Tensor:
    """[B, L] ids before step ``step_B`` of a trajectory decoded with token editing (``sampler.edit_threshold``):
    finished blocks hold their final tokens (a block is edited only while it decodes), the step's block what the
    sampler recorded before the step (``edit_before_BTK``), later blocks masks."""
    step_B = step_B.to(device).clamp(min=0)  # -1 marks a padding step: any valid step will do
    start_B, cols_BK = step_window(traj, step_B, device)
    P = traj.prompt_ids_BP.shape[1]
    comp_BG = traj.completion_ids_BG.to(device)
    later_BG = P + torch.arange(comp_BG.shape[1], device=device) >= start_B[:, None]
    ids_BL = torch.cat([traj.prompt_ids_BP.to(device), comp_BG.masked_fill(later_BG, mask_id)], dim=1)
    before_BK = traj.extras["edit_before_BTK"].to(device)[torch.arange(len(traj), device=device), step_B]
    return ids_BL.scatter(1, cols_BK, before_BK)


def step_window(traj: Trajectory, step_B: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first column [B] of the block step ``step_B`` decoded, and the block's columns [B, K] as the sampler's
    ``_window`` reads them (a last block past the sequence's end points K columns back, at its previous block)."""
    K, L = traj.block_length, traj.prompt_ids_BP.shape[1] + traj.completion_ids_BG.shape[1]
    step_B = step_B.to(device).clamp(min=0)
    start_B = (block_starts(traj.prompt_mask_BP.to(device), 0, K, traj.block_grid)
               + (step_B // steps_per_block(traj)) * K)
    cols_BK = start_B[:, None] + torch.arange(K, device=device)
    return start_B, torch.where(cols_BK < L, cols_BK, cols_BK - K)


def completion_blocks(traj: Trajectory) -> tuple[torch.Tensor, int]:
    """The decoded block of every completion position [B, G] (its index in decoding order) and the sampler's
    steps per block (the trajectory's T over the blocks it decoded): one home for the block layout."""
    from common.config.sampler import block_rounds

    B, G = traj.completion_ids_BG.shape
    K = traj.block_length if traj.block_length > 0 else G
    g_BG = torch.arange(G, device=traj.completion_ids_BG.device).expand(B, G)
    if traj.block_grid == "sequence":
        offset_B1 = (traj.prompt_mask_BP.sum(1) % K)[:, None].to(g_BG.device)
        g_BG = g_BG + offset_B1
    return g_BG // K, traj.num_steps // block_rounds(G, K, traj.block_grid)


def steps_per_block(traj: Trajectory) -> int:
    """The sampler's steps in each block."""
    return completion_blocks(traj)[1]


def anchor_steps(step_B: torch.Tensor, spb: int, refresh: int | None) -> torch.Tensor:
    """The step whose full forward built the cache that step ``step_B`` read (itself at an anchor step)."""
    step_B = step_B.clamp(min=0)  # -1 marks a padding step: any valid step will do
    first_B = step_B - step_B % spb
    return first_B if not refresh else step_B - (step_B - first_B) % refresh


def replayed_routing(traj: Trajectory, step_B: torch.Tensor, device) -> torch.Tensor:
    """[B, L, R] experts of every column in the forward the sampler scored step ``step_B`` with (a block-causal
    mixture of experts, ``sampler.record_routing``): finished blocks' final routing, the step's block as recorded,
    -1 (routed afresh) after it, where block-causal attention keeps the columns from the scored positions."""
    settled_BLR = traj.extras["routing_settled_BLR"].to(device).long()
    step_BTKR = traj.extras["routing_step_BTKR"].to(device).long()
    B, L, R = settled_BLR.shape
    K, step_B = traj.block_length, step_B.clamp(min=0)
    start_B, cols_BK = step_window(traj, step_B, device)
    before_BL1 = (torch.arange(L, device=device) < start_B[:, None])[..., None]
    routing_BLR = torch.where(before_BL1, settled_BLR, -1)
    block_BKR = step_BTKR[torch.arange(B, device=device), step_B]
    return routing_BLR.scatter(1, cols_BK[..., None].expand(B, K, R), block_BKR)


@dataclass
class StepHidden:
    """Final hidden states the policy computed at each row's step, for columns ``lo_B + [0, Q)``."""

    h_BQD: torch.Tensor
    lo_B: torch.Tensor

    shift: int = 0  # the policy's logit shift: token column c is scored by the hidden state at c - shift

    def rows(self, b_N: torch.Tensor, col_N: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, D] that score the tokens at sequence columns ``col_N`` (the model's logit shift
        applied; each within its row's queried columns)."""
        return self.h_BQD[b_N, col_N - self.shift - self.lo_B[b_N]]


def policy_hidden(model, traj: Trajectory, step_B: torch.Tensor, mask_id: int, device) -> StepHidden:
    """The hidden states the sampler's policy computed at step ``step_B`` of each row, rebuilt with the
    trajectory's cache rule (``extras['cache']``, ``extras['cache_refresh']``); differentiable.

    Without a cache: one full forward of the state. With one: the anchor forward (the state at each row's
    anchor step) producing the keys/values, then the row's query columns at its own step on that cache;
    rows sampled at their anchor step read the anchor forward itself, as the sampler did. Always the same
    two forward calls whatever the rows' steps, so FSDP ranks run the same collectives.
    """
    step_B = step_B.to(device)
    ids_BL, attn_BL, pos_BL = state_inputs(traj, step_B, mask_id, device)
    # a block-causal model's cache holds only finished blocks: the same function as the full forward
    mode = traj.extras.get("cache", "none") if traj.block_grid == "completion" else "none"
    B, L = ids_BL.shape
    if mode == "none":
        routing = traj.extras.get("routing_step_BTKR")
        with nullcontext() if routing is None else model.replaying(replayed_routing(traj, step_B, device)):
            h_BLD = model.hidden_states(ids_BL, attn_BL, pos_BL)
        return StepHidden(h_BLD, torch.zeros(B, dtype=torch.long, device=device), model.logit_shift)

    spb, K, P = steps_per_block(traj), traj.block_length, traj.prompt_ids_BP.shape[1]
    anchor_B = anchor_steps(step_B, spb, traj.extras.get("cache_refresh"))
    anchor_ids_BL, _, _ = state_inputs(traj, anchor_B, mask_id, device)
    h_BLD, kv = model.hidden_states(anchor_ids_BL, attn_BL, pos_BL, return_kv=True)

    # Each row's query columns [lo, hi) are those of its block; rows differ in block, so the batch runs
    # the widest window [lo_B, lo_B + Q) and queries outside a row's own columns only read the cache.
    start_B = P + (anchor_B // spb) * K
    first_B, hi_B = query_columns(mode, start_B, K, L, model.logit_shift)
    # the columns whose keys/values the sampler's cached steps recomputed: its whole window, or, for a block
    # opened on its first position alone (never scored again), the block on (the column before is read only)
    fresh_B = start_B if traj.extras.get("open_block", "schedule") == "first_position" else first_B
    Q = int((hi_B - first_B).max())
    lo_B = torch.minimum(first_B, torch.full_like(first_B, L - Q))
    col_BQ = lo_B[:, None] + torch.arange(Q, device=device)
    keep_BQ = (col_BQ >= fresh_B[:, None]) & (col_BQ < hi_B[:, None])
    q_pos_BQ = None if pos_BL is None else pos_BL.gather(1, col_BQ)
    h_BQD = model.hidden_states(ids_BL.gather(1, col_BQ), attn_BL, q_pos_BQ, kv_cache=kv, query_idx=col_BQ,
                                query_keep=None if bool(keep_BQ.all()) else keep_BQ)
    at_anchor_B11 = (step_B.clamp(min=0) == anchor_B)[:, None, None]
    anchor_BQD = h_BLD.gather(1, col_BQ[..., None].expand(-1, -1, h_BLD.shape[-1]))
    return StepHidden(torch.where(at_anchor_B11, anchor_BQD, h_BQD), lo_B, model.logit_shift)
