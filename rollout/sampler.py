"""The iterative-unmasking sampler of every model family, recording everything the learner needs.

x = [prompt | MASK x G] is decoded block by block; each of a block's ``steps / num_blocks`` steps runs the
model once, scores only the block's still-masked positions (their hidden states are gathered before the
output head, so the vocabulary projection is [N, D] -> [N, V], never [B, L, D] -> [B, L, V]), draws a token
for each through the fused kernel ``rollout.kernels.sample_rows`` and commits some of them (by confidence,
at random, by margin, by entropy, by a confidence threshold, or Dream's per-position ``origin`` rule; with
``edit_threshold``, LLaDA2.1's token editing, the step scores the whole block and may also replace committed tokens).
What differs between families is configuration, not code: where the logits of a position sit (the model's
``logit_shift``: Dream's column i - 1), where blocks start (``block_grid``: at the completion for LLaDA and
Dream, every K positions from the prompt's start for SDAR, so a row's first block can hold its prompt's
tail and rows of a batch have their blocks at different columns) and how many tokens a step commits
(``transfer``: LLaDA's linear split, Dream's timestep schedule).
With ``cache`` the model runs the full sequence only at a block's first step (and every ``cache_refresh``
steps) and otherwise only the block (dual) or the block and suffix (prefix) on the kept keys/values: a
different policy from ``none``, recorded with the trajectory and rebuilt exactly by the learner
(``learner.step_states.policy_hidden``).

Letters: B samples, P prompt length, G completion length, L = P + G, K block length, R scored positions
per sample in this step, N = B * R scored rows, D model width, V vocabulary, T denoising steps.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from common.config.sampler import SamplerConfig
from common.model.family import family_of
from common.rao_blackwell import commit_floor, uncommitted_logp
from common.step_layout import block_starts, packed_positions, query_columns
from common.trajectory import Trajectory
from rollout.kernels import sample_rows, support_cutoff

_MASK32 = 0xFFFFFFFF
_RANDOM_REMASK_SALT = 0x5EED0F5  # keeps random remasking independent of the kernel's Gumbel noise
_REMASK_GUMBEL_SALT = 0x6A1E7E3  # the remasking temperature's Gumbel noise, independent of both
# Ranks EOS/EoT below every real score but above the -inf of positions that are not candidates.
_BANNED_SCORE = -1e30


def transfer_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """LLaDA's linear schedule: tokens committed at each step of a block, an even split with the remainder first."""
    base, remainder = divmod(block_length, steps_per_block)
    return [base + (1 if i < remainder else 0) for i in range(steps_per_block)]


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A counter-based 32-bit integer hash on int64 tensors holding values in [0, 2^32); no overflow."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def counter_uniform(seed: int, row_ids_N: torch.Tensor, salt: int = _RANDOM_REMASK_SALT) -> torch.Tensor:
    """Uniform [0, 1) float32 per row id, a pure function of (seed, row id): independent of batch composition."""
    key = _hash32(torch.full_like(row_ids_N, (seed ^ salt) & _MASK32))
    key = _hash32(((row_ids_N >> 32) & _MASK32) ^ key)
    key = _hash32((row_ids_N & _MASK32) ^ key)
    return (key >> 8).to(torch.float32) * (1.0 / (1 << 24))


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → left-padded ids [B, P] and attention mask [B, P] (``left_pad``)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    ids, mask = left_pad(ids, mask, pad_id)
    return ids, mask.long()


def left_pad(prompt_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor | None, pad_id: int):
    """Move every row's real tokens to the right end (order kept); returns (ids filled with pad_id, mask)."""
    if attention_mask_BP is None:
        return prompt_ids_BP.clone(), torch.ones_like(prompt_ids_BP, dtype=torch.bool)
    mask_BP = attention_mask_BP.bool()
    order_BP = torch.argsort(mask_BP.to(torch.int8), dim=1, stable=True)  # padding first, real tokens in order
    mask_BP = mask_BP.gather(1, order_BP)
    ids_BP = prompt_ids_BP.gather(1, order_BP).masked_fill(~mask_BP, pad_id)
    return ids_BP, mask_BP


def _forward_fn(model, mode: str):
    """The model's hidden-state forward, torch.compiled once per (model, mode) when asked.

    The compiled callables live on the model, so they go away with it and weight updates in place reuse them.
    """
    if mode == "none":
        return model.hidden_states
    compiled = model.__dict__.setdefault("_unmask_compiled_forward", {})
    if mode not in compiled:
        # dynamic=None: the first new prompt length recompiles once with dynamic shapes, not on every length
        compiled[mode] = torch.compile(model.hidden_states, mode=mode, dynamic=None)
    return compiled[mode]


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: SamplerConfig,
    *,
    mask_id: int,
    eos_id: int,
    eot_id: int | None = None,
    pad_id: int = 0,
    seed: int = 0,
    row_offset: int = 0,
) -> Trajectory:
    """Sample completions for ``prompt_ids`` [B, P] (left- or right-padded per ``attention_mask``) and record them.

    With temperature 0 and low-confidence remasking the committed tokens equal LLaDA's reference
    ``generate()``. Padded batches: prompts are left-padded first; with ``position_ids='absolute'`` (the
    reference's choice) each column keeps position 0..L-1, so a padded prompt decodes like the reference
    given the same left-padded input, but not necessarily like the same prompt unpadded; ``'packed'``
    numbers real tokens only and makes the output independent of padding. The noise of sample b at step t,
    completion position j is keyed by ((row_offset + b) * T + t) * G + j, so it never repeats and does not
    depend on the rest of the batch.

    Beyond the reference: the mask token is never drawn by default (``ban_mask_token``); with
    ``confidence_eos_eot_inf`` EOS/EoT rank last in every remasking rule (the reference's statement only
    zeroes EoT's probability); ``threshold`` commits max(#confidence > tau, ceil(masked / steps left), 1)
    so a block always finishes within its steps, and steps a row no longer needs record 0 committed.
    ``extras`` holds ``filled_BG`` (EOS filled by ``stop_on_eos_block``, never sampled), ``position_ids`` and
    the cache rule (``cache``, ``cache_refresh``): the learner needs them all to rebuild the sampled
    distributions (with editing also ``edit_*_BTK``: each step's block before it and the draws its rules read, from
    which the learner rebuilds every state and action, and ``step_edited_BT``, a count); ``cfg_scale`` only says guidance was on (a guided rollout is for evaluation: `unmask train`
    refuses it, the learner rebuilds no guidance). The draws a step
    made and did not commit are recorded too (``discard_*_BGS``): under a commit rule that reads them they
    are part of the action the learner scores.
    """
    if pad_id == mask_id:
        raise ValueError(f"pad_id {pad_id} equals mask_id; give the tokenizer a distinct pad token")
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    prompt_BP, prompt_mask_BP = left_pad(prompt_ids, attention_mask, pad_id)
    if bool((prompt_BP.eq(mask_id) & prompt_mask_BP).any()):
        raise ValueError(f"a prompt contains the mask token {mask_id}; prompts must be fully observed")

    if config.record_routing and not family_of(model).routed:
        raise ValueError(f"sampler.record_routing: {family_of(model).name} has no experts to route; set it false")
    decoder = _Decoder(model, prompt_BP, prompt_mask_BP, config, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                       seed=seed, row_offset=row_offset)
    for block in range(config.num_rounds):
        decoder.decode_block(block)
        if config.stop_on_eos_block or config.stop_after_eos:
            end_B = block_starts(prompt_mask_BP, block, config.block_length, config.block_grid) + config.block_length
            if config.stop_on_eos_block:
                decoder.active_B = _stop_eos_rows(decoder.x_BL, decoder.active_B, end_B - decoder.P,
                                                  config.block_length, eos_id, decoder.rec)
            else:  # SDAR's stopping criteria: its eos ids are the end of text and the end of turn
                stops = (eos_id,) + ((eot_id,) if eot_id is not None else ())
                decoder.active_B = _stop_after_eos(decoder.x_BL, decoder.active_B, end_B - decoder.P, stops, eos_id,
                                                   decoder.rec)
            if not bool(decoder.active_B.any()):
                break
    return decoder.trajectory()


class _Decoder:
    """One decode's fixed inputs and running state: ``decode_block`` runs a block's steps, ``trajectory``
    packs the records."""

    def __init__(self, model, prompt_BP, prompt_mask_BP, config: SamplerConfig, *, mask_id: int, eos_id: int,
                 eot_id: int | None, seed: int, row_offset: int):
        device = prompt_BP.device
        B, P = prompt_BP.shape
        G, K, spb = config.gen_length, config.block_length, config.steps_per_block
        T = config.num_rounds * config.steps_per_round
        self.model, self.config, self.mask_id, self.seed = model, config, mask_id, seed
        self.prompt_BP, self.prompt_mask_BP, self.B, self.P = prompt_BP, prompt_mask_BP, B, P
        self.shift = model.logit_shift  # the logits of column c score the token at c + shift
        self.x_BL = torch.cat([prompt_BP, torch.full((B, G), mask_id, dtype=torch.long, device=device)], dim=1)
        if config.block_grid == "sequence" and P + G < K:
            raise ValueError(f"block_grid: sequence needs prompt + gen_length >= block_length ({P} + {G} < {K})")
        # --- model inputs that stay fixed for the whole decode
        padded = not bool(prompt_mask_BP.all())
        attn_BL = torch.cat([prompt_mask_BP, torch.ones(B, G, dtype=torch.bool, device=device)], 1) if padded else None
        pos_BL = packed_positions(attn_BL) if config.position_ids == "packed" and padded else None
        if config.cfg_scale > 0:
            attn_BL = None if attn_BL is None else torch.cat([attn_BL, attn_BL])
            pos_BL = None if pos_BL is None else torch.cat([pos_BL, pos_BL])
        self.attn_BL, self.pos_BL = attn_BL, pos_BL
        self.forward = _forward_fn(model, config.compile_forward)
        self.rec = _Records(B, G, T, device, discard_slots=spb - 1)
        if config.edit_threshold is not None:
            self.rec.start_editing(T, K)
        if config.record_routing:
            self.rec.start_routing(P + G, K, len(model.moe_layers) * model.config.num_experts_per_tok)
        self.active_B = torch.ones(B, dtype=torch.bool, device=device)
        self.banned = ((eos_id,) if config.logits_eos_inf else ()) + ((mask_id,) if config.ban_mask_token else ())
        self.demoted = tuple(i for i in (eos_id, eot_id) if i is not None) if config.confidence_eos_eot_inf else ()
        # low-confidence ranking alone: each discarded draw's Rao-Blackwellised score is recorded too
        self.rao_blackwell = (config.remasking == "low_confidence" and config.threshold is None
                              and config.remasking_temperature == 0 and not self.demoted)
        self.schedule = transfer_schedule(K, spb)
        self.timesteps = torch.linspace(1, config.eps, spb + 1, device=device)  # Dream's, per block
        # uniform: every row's block starts at the same column and holds K masked positions at its first step
        self.uniform = config.block_grid == "completion"
        # block-causal cache: one KV cache for the whole decode, finished blocks kept (see _block_causal_hidden)
        self.kv = None
        assert self.uniform or model.logit_shift == 0, "block-causal families score a token at its own column"
        self.key_pos_BL = None if pos_BL is not None else torch.arange(P + G, device=device).expand(B, -1)
        self.row_base_B1 = ((torch.arange(B, device=device) + row_offset) * (T * G))[:, None]

    def decode_block(self, block: int) -> None:
        """The block's steps; its cache (``config.cache``) is built by the full forward at its anchor steps."""
        config, K, spb = self.config, self.config.block_length, self.config.steps_per_block
        refresh, kv = self.config.cache_refresh or spb, self.kv
        start_B = block_starts(self.prompt_mask_BP, block, K, config.block_grid)
        if config.edit_threshold is not None:
            return self._edit_block(block, start_B)
        fixed = self.uniform and config.threshold is None and config.transfer == "linear"
        for i in range(spb):
            if i == 0 and config.open_block == "first_position":  # the block's first position alone
                width, n_B = 1, 1
            elif fixed:  # every row has exactly this many masked positions: no host sync
                width, n_B = K - sum(self.schedule[:i]), self.schedule[i]
            else:
                remaining_B = self._window(start_B)[2].sum(1)
                width = int(remaining_B.max())  # host sync: finished blocks (or rows) are skipped
                if width == 0:
                    break
                n_B = self._counts(i, remaining_B)
            kv = self._step(block, i, start_B, width, n_B, kv, anchor=i % refresh == 0)
        if not self.uniform:
            self.kv = kv  # the sequence grid keeps one cache across blocks

    def _edit_block(self, block: int, start_B) -> None:
        """LLaDA2.1's joint threshold decoding of a block (sequence grid): every step scores the whole block,
        commits masked positions by the threshold rule and edits committed ones (``_step``); a row whose block has
        no mask left spends a post-edit step, at most ``max_post_edit_steps``, and its block ends at the first such
        step that changes nothing (the public ``generate``'s loop, per row)."""
        config, kv = self.config, self.kv
        # rows whose block may still change: not stopped (those are all EOS), and not past the end (a row whose prompt
        # fills whole blocks leaves the last round empty)
        edit_B = self.active_B & (start_B < self.x_BL.shape[1])
        post_B = torch.zeros_like(start_B)
        _, block_BK, masked_BK = self._window(start_B)
        for i in range(config.steps_per_round):
            remaining_B = masked_BK.sum(1)
            idle_B = edit_B & remaining_B.eq(0)
            post_B += idle_B
            edit_B &= post_B <= config.max_post_edit_steps
            if not bool(edit_B.any()):  # host sync
                break
            n_B = self._counts(i, remaining_B) if i < config.steps_per_block else 0  # masks end within the steps
            kv = self._step(block, i, start_B, config.block_length, n_B, kv, anchor=False, edit_B=edit_B)
            _, after_BK, masked_BK = self._window(start_B)  # also the next step's block
            edit_B &= ~idle_B | after_BK.ne(block_BK).any(1)
            block_BK = after_BK
        self.kv = kv

    def _window(self, start_B):
        """The block's columns [B, K] per row, its tokens, and which of them are masked completion positions.
        Columns past the sequence's end (a row's last block on the sequence grid) point K columns back, at
        its previous block: distinct from the block's own columns and never masked."""
        K, L = self.config.block_length, self.x_BL.shape[1]
        cols_BK = start_B[:, None] + torch.arange(K, device=start_B.device)
        cols_BK = torch.where(cols_BK < L, cols_BK, cols_BK - K)
        block_BK = self.x_BL.gather(1, cols_BK)
        return cols_BK, block_BK, block_BK.eq(self.mask_id) & (cols_BK >= self.P)

    def _counts(self, i: int, remaining_B: torch.Tensor) -> torch.Tensor:
        """Tokens each row commits at step i of a block (never more than it has masked)."""
        config, spb = self.config, self.config.steps_per_block
        if config.transfer == "timestep":
            if i == spb - 1:
                return remaining_B
            t, s = self.timesteps[i], self.timesteps[i + 1]
            return (remaining_B.float() * (1 - s / t)).long()  # Dream's int(masked * (1 - s / t)), in fp32
        n_B = torch.full_like(remaining_B, self.schedule[i])
        if config.threshold is not None and config.threshold_floor == "remaining":
            steps_left = spb - i
            n_B = ((remaining_B + steps_left - 1) // steps_left).clamp(min=1)
        return torch.minimum(n_B, remaining_B)

    def _step(self, block: int, i: int, start_B, width: int, n_B, kv, anchor: bool, edit_B=None):
        """One denoising step: forward, output head on the block's masked rows, sample, commit, record. With
        ``edit_B`` (rows that may edit; ``width`` is then the block, so every column is scored) a committed
        completion token is also replaced by its draw when that differs and is confident enough (LLaDA2.1's T2T)."""
        config, x_BL, B = self.config, self.x_BL, self.B
        t, shift = block * config.steps_per_round + i, self.shift
        cols_BK, block_BK, masked_BK = self._window(start_B)
        # masked positions first, in position order (stable sort)
        idx_BR = torch.argsort(masked_BK.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        valid_BR = masked_BK.gather(1, idx_BR)
        col_BR = cols_BK.gather(1, idx_BR)
        # --- forward (full, or the cached query columns), then the output head on the block's masked rows only
        hidx_BR = col_BR - shift  # where each scored row's hidden state sits in h
        if config.cache == "none" or not self.uniform:
            fwd_cols_BQ = None  # the forward's columns (None: all of them)
            with self.model.routing() if config.record_routing else nullcontext() as tape:
                if config.cache == "none":
                    h_BLD = _hidden(self.forward, x_BL, self.attn_BL, self.pos_BL, config, self.P, self.mask_id)
                else:
                    h_BLD, kv, first, fwd_cols_BQ = self._block_causal_hidden(cols_BK, kv, i)
                    hidx_BR = idx_BR + first
            if tape is not None:
                self.rec.write_routing(t, tape.recorded, fwd_cols_BQ, cols_BK, start_B)
        elif anchor:
            h_BLD, kv = _hidden(self.model.hidden_states, x_BL, self.attn_BL, self.pos_BL, config, self.P, self.mask_id,
                                return_kv=True)
        else:  # the completion grid: one block start for all rows
            lo, hi = query_columns(config.cache, int(start_B[0]), config.block_length, x_BL.shape[1],
                                   0 if config.open_block == "first_position" else shift)
            h_BLD = _cached_hidden(self.model, x_BL, self.attn_BL, self.pos_BL, kv, lo, hi)
            hidx_BR = hidx_BR - lo
        logits_NV = _block_logits(self.model, h_BLD, hidx_BR, config.cfg_scale, B)
        for token in self.banned:
            logits_NV[:, token] = float("-inf")

        # --- sample every scored row
        G = config.gen_length
        pos_BR = col_BR - self.P  # completion positions (negative only on rows that are not candidates)
        row_ids_N = (self.row_base_B1 + (pos_BR.clamp(min=0) + t * G)).reshape(-1)  # ((row_offset + b) * T + t) * G + pos
        cutoff_N = _robust_cutoff(logits_NV, support_cutoff(logits_NV, config.temperature, config.top_k, config.top_p))
        stats = sample_rows(logits_NV, config.temperature, self.seed, row_ids_N, cutoff_N, kernel=config.kernel)
        token_BR = stats.token_N.view(B, width)
        p_transfer = None
        if config.remasking == "origin":
            p_transfer = 1.0 if i == config.steps_per_block - 1 else 1 - self.timesteps[i + 1] / self.timesteps[i]
        commit_BR = _choose(config, stats, token_BR, valid_BR, n_B, self.demoted, self.seed, row_ids_N, p_transfer, pos_BR,
                            logits_NV)

        # --- write tokens and records; a scored position that is not committed keeps its token (a row
        # with fewer masked positions than ``width`` also gathers committed ones: never re-mask them)
        held_BR, write_BR, read_BR = block_BK.gather(1, idx_BR), commit_BR, None
        if edit_B is not None:  # the block's own completion columns (not ones wrapped back from past the end)
            editable_BR = ~valid_BR & (col_BR >= self.P) & (col_BR >= start_B[:, None]) & edit_B[:, None]
            edit_BR = editable_BR & token_BR.ne(held_BR) & (stats.confidence_N.view(B, width) > config.edit_threshold)
            read_BR = valid_BR | editable_BR
            self.rec.write_edit_step(t, idx_BR, block_BK, read_BR, edit_BR, token_BR, stats, cutoff_N)
            write_BR = commit_BR | edit_BR
        x_BL.scatter_(1, col_BR, torch.where(write_BR, token_BR, held_BR))
        self.rec.write(t, pos_BR, valid_BR, commit_BR, stats, cutoff_N, read_BR)
        discarded_BR = valid_BR & ~commit_BR
        rb_N = None
        if self.rao_blackwell:  # scored on the discarded rows only: the others' values are never read
            sample_N, pos_N = torch.arange(B, device=pos_BR.device).repeat_interleave(width), pos_BR.reshape(-1)
            floor_B, last_B = commit_floor(stats.confidence_N, commit_BR.reshape(-1), pos_N, sample_N, B)
            rows = discarded_BR.reshape(-1).nonzero().squeeze(1)
            rb_N = logits_NV.new_zeros(B * width, dtype=torch.float32)
            rb_N[rows] = uncommitted_logp(logits_NV[rows], floor_B[sample_N[rows]], last_B[sample_N[rows]], pos_N[rows],
                                          config.temperature, None if cutoff_N is None else cutoff_N[rows])
        if i < config.steps_per_block:  # post-edit steps have no masked position, so no discarded draw
            self.rec.write_discarded(i, pos_BR, discarded_BR, token_BR, stats, cutoff_N, rb_N)
        return kv

    def _block_causal_hidden(self, cols_BK, kv, i: int):
        """The sequence grid's cache (block-causal models): a block reads only itself and finished blocks, so
        one full forward at the decode's first step keeps every column's keys/values, and every later step runs
        only its block's columns on that cache (writing their fresh keys/values in), the first step of a block
        also its previous block's, whose tokens were committed since. The same function of the state as the full
        forward (what the public decoder's store_kv cache computes too): the learner rebuilds it with one.
        Returns (hidden states, cache, offset of the block's first column in them, the columns run: None for all)."""
        x_BL, K = self.x_BL, self.config.block_length
        if kv is None:
            h_BLD, kv = self.model.hidden_states(x_BL, self.attn_BL, self.pos_BL, return_kv=True)
            return h_BLD, kv, cols_BK[:, :1], None
        cols_BQ = torch.cat([cols_BK - K, cols_BK], 1) if i == 0 else cols_BK
        pos_BQ = None if self.pos_BL is None else self.pos_BL.gather(1, cols_BQ)
        h_BQD = self.model.hidden_states(x_BL.gather(1, cols_BQ), self.attn_BL, pos_BQ, kv_cache=kv, query_idx=cols_BQ,
                                         key_position_ids=self.pos_BL if self.pos_BL is not None else self.key_pos_BL)
        return h_BQD, kv, K if i == 0 else 0, cols_BQ

    def trajectory(self) -> Trajectory:
        config, rec, P, G = self.config, self.rec, self.P, self.config.gen_length
        if bool(self.x_BL[:, P:].eq(self.mask_id).any()):
            raise RuntimeError("the model drew the mask token, leaving positions undecoded; set ban_mask_token")
        return Trajectory(
            prompt_ids_BP=self.prompt_BP,
            prompt_mask_BP=self.prompt_mask_BP,
            completion_ids_BG=self.x_BL[:, P:].clone(),
            unmask_step_BG=rec.unmask_step_BG.contiguous(),
            logp_BG=rec.token_stat(0),
            entropy_BG=rec.token_stat(1),
            margin_BG=rec.token_stat(2),
            cutoff_BG=rec.token_stat(3),
            step_entropy_BT=rec.step_stats_2BT[0].contiguous(),
            step_margin_BT=rec.step_stats_2BT[1].contiguous(),
            step_committed_BT=rec.step_committed_BT,
            temperature=config.temperature,
            block_length=config.block_length,
            banned_ids=self.banned,
            discard_ids_BGS=rec.discard_ids_BGS[:, :G, :-1].contiguous(),
            discard_logp_BGS=rec.discard_logp_BGS[:, :G, :-1].contiguous(),
            discard_cutoff_BGS=None if rec.discard_cutoff_BGS is None else rec.discard_cutoff_BGS[:, :G, :-1].contiguous(),
            discard_rb_logp_BGS=None if rec.discard_rb_logp_BGS is None else rec.discard_rb_logp_BGS[:, :G, :-1].contiguous(),
            commit_reads_draws=commit_reads_draws(config) or bool(self.demoted),
            block_grid=config.block_grid,
            extras={"filled_BG": rec.filled_BG, "position_ids": config.position_ids, "cfg_scale": config.cfg_scale,
                    "cache": config.cache, "cache_refresh": config.cache_refresh, "open_block": config.open_block,
                    **rec.routing_extras(),
                    **rec.edit_extras()},
        )


def _hidden(forward, x_BL, attn_BL, pos_BL, config: SamplerConfig, P: int, mask_id: int, **kv):
    """Final hidden states [B, L, D], or [2B, L, D] (conditional, then prompt-masked) under guidance."""
    if config.cfg_scale > 0:
        un_x_BL = x_BL.clone()
        un_x_BL[:, :P] = mask_id  # LLaDA masks every prompt column, padding included
        x_BL = torch.cat([x_BL, un_x_BL])
    if config.compile_forward == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
    return forward(x_BL, attn_BL, pos_BL, **kv)


def _cached_hidden(model, x_BL, attn_BL, pos_BL, kv, lo: int, hi: int) -> torch.Tensor:
    """Hidden states [X, hi - lo, D] of columns [lo, hi) on the block's cache (X = B, or 2B under guidance:
    the prompt-masked half has the same tokens there, since only prompt columns differ)."""
    X = kv.keys[0].shape[0]
    ids_XQ = x_BL[:, lo:hi].repeat(X // x_BL.shape[0], 1)
    col_XQ = torch.arange(lo, hi, device=x_BL.device).expand(X, -1)
    pos_XQ = None if pos_BL is None else pos_BL[:, lo:hi]
    return model.hidden_states(ids_XQ, attn_BL, pos_XQ, kv_cache=kv, query_idx=col_XQ)


def _block_logits(model, h_BLD: torch.Tensor, idx_BR: torch.Tensor, cfg_scale: float, B: int):
    """Logits [B * R, V] of the hidden states at columns ``idx_BR`` of ``h``; guidance combines the two
    halves in fp32."""
    D, R = h_BLD.shape[-1], idx_BR.shape[1]
    idx_XR = idx_BR if h_BLD.shape[0] == B else idx_BR.repeat(2, 1)  # X = B, or 2B under guidance
    idx_XRD = idx_XR[..., None].expand(-1, R, D)
    h_XRD = h_BLD.gather(1, idx_XRD)
    logits = model.vocab_logits(h_XRD.reshape(-1, D))
    if cfg_scale > 0:
        cond, uncond = logits.float().chunk(2)
        return uncond + (cfg_scale + 1) * (cond - uncond)
    return logits


def _robust_cutoff(logits_NV: torch.Tensor, cutoff_N: torch.Tensor | None) -> torch.Tensor | None:
    """Move the cut-off from the smallest kept logit to halfway to the largest dropped one (same support).

    The learner recomputes logits with other kernels; a cut-off equal to a kept logit loses that token
    to one ulp of difference, the midpoint only to half the gap. -inf where nothing is dropped.
    """
    if cutoff_N is None:
        return None
    x_NV = logits_NV.float()
    below_N = x_NV.masked_fill(x_NV >= cutoff_N[:, None], float("-inf")).amax(dim=-1)
    return torch.where(torch.isneginf(below_N), below_N, (cutoff_N + below_N) * 0.5)


def commit_reads_draws(config: SamplerConfig) -> bool:
    """Whether the commit rule looks at the drawn tokens (then the draws are the action and the exact score
    needs the discarded ones too): low_confidence ranks them, a threshold compares the drawn token's
    confidence, except under top_prob, whose order and threshold read the distribution only."""
    return config.remasking == "low_confidence" or (config.threshold is not None and config.remasking != "top_prob")


def _remask_score(remasking: str, stats, seed: int, row_ids_N: torch.Tensor, pos_N: torch.Tensor,
                  logits_NV: torch.Tensor) -> torch.Tensor:
    """Higher is committed first."""
    if remasking == "sequential":
        return -pos_N.float()
    if remasking == "top_prob":  # the distribution's top probability at temperature 1 (the drawn token's at T=0)
        return torch.softmax(logits_NV.float(), dim=-1).amax(dim=-1)
    if remasking == "low_confidence":
        return stats.confidence_N.float()
    if remasking == "margin":
        return stats.margin_N.float()
    if remasking == "entropy":
        return -stats.entropy_N.float()
    if remasking == "random":
        return counter_uniform(seed, row_ids_N)
    raise ValueError(f"unknown remasking {remasking!r}; choose low_confidence, top_prob, random, margin, entropy or "
                     "sequential")


def _choose(config: SamplerConfig, stats, token_BR, valid_BR, n_B, demoted, seed, row_ids_N,
            p_transfer=None, pos_BR=None, logits_NV=None) -> torch.Tensor:
    """Positions to commit [B, R]: each row's n_B (an int, or [B]) best-scored candidates, plus all above
    the confidence threshold; under ``origin`` each candidate independently with probability ``p_transfer``."""
    B, R = token_BR.shape
    if config.remasking == "origin":
        return valid_BR & (counter_uniform(seed, row_ids_N).view(B, R) < p_transfer)
    raw_BR = score_BR = _remask_score(config.remasking, stats, seed, row_ids_N, pos_BR.reshape(-1), logits_NV).view(B, R)
    if config.remasking_temperature > 0:  # sampling without replacement ~ softmax(score / temperature)
        u_BR = counter_uniform(seed, row_ids_N, _REMASK_GUMBEL_SALT).view(B, R)
        score_BR = score_BR / config.remasking_temperature - torch.log(-torch.log(u_BR))
    for token in demoted:
        score_BR = score_BR.masked_fill(token_BR.eq(token), _BANNED_SCORE)
    score_BR = score_BR.masked_fill(~valid_BR, float("-inf"))
    # Vectorised per-row top-n: rank of each position in its row's order (stable: ties go left first).
    order_BR = torch.argsort(score_BR, dim=1, descending=True, stable=True)
    rank_BR = torch.empty_like(order_BR).scatter_(1, order_BR, torch.arange(R, device=order_BR.device).expand(B, R))
    commit_BR = valid_BR & (rank_BR < (n_B if isinstance(n_B, int) else n_B[:, None]))
    if config.threshold is not None:  # on the remasking's own statistic under top_prob (so it reads no draw)
        above_BR = raw_BR if config.remasking == "top_prob" else stats.confidence_N.view(B, R)
        commit_BR |= valid_BR & (above_BR > config.threshold)
    return commit_BR


class _Records:
    """The per-token (_BG) and per-step (_BT) records of one decode, filled in place step by step.

    Per-token statistics share one [4, B, G + 1] tensor (logp, entropy, margin, cut-off) so a step writes
    them with one scatter; column G is a spare that absorbs the writes of non-candidate rows. Discarded
    draws go to [B, G + 1, S + 1] tensors (S = steps per block - 1; slot S is the spare of a block's last
    step, which commits every position left).
    """

    def __init__(self, B: int, G: int, T: int, device, discard_slots: int):
        self.G = G
        self.discard_ids_BGS = torch.full((B, G + 1, discard_slots + 1), -1, dtype=torch.long, device=device)
        self.discard_logp_BGS = torch.zeros(B, G + 1, discard_slots + 1, dtype=torch.float32, device=device)
        self.discard_cutoff_BGS: torch.Tensor | None = None  # allocated at the first step with a support cut-off
        self.discard_rb_logp_BGS: torch.Tensor | None = None  # allocated when the rule allows Rao-Blackwellisation
        self.stats_FBG = torch.zeros(4, B, G + 1, dtype=torch.float32, device=device)
        self.stats_FBG[3] = float("-inf")  # cut-off: the whole vocabulary unless top-k/top-p cut it
        self.step_BG = torch.full((B, G + 1), -1, dtype=torch.long, device=device)
        self.filled_BG = torch.zeros(B, G, dtype=torch.bool, device=device)
        self.step_stats_2BT = torch.zeros(2, B, T, dtype=torch.float32, device=device)
        self.step_committed_BT = torch.zeros(B, T, dtype=torch.long, device=device)
        self.routing_settled_BLR: torch.Tensor | None = None  # allocated by start_routing
        self.routing_step_BTKR: torch.Tensor | None = None
        self.step_edited_BT: torch.Tensor | None = None  # the editing record (allocated by start_editing)
        self.edit: dict[str, torch.Tensor] | None = None

    @property
    def unmask_step_BG(self) -> torch.Tensor:
        return self.step_BG[:, : self.G]

    def token_stat(self, f: int) -> torch.Tensor:
        return self.stats_FBG[f, :, : self.G].contiguous()

    def write(self, t: int, pos_BR, valid_BR, commit_BR, stats, cutoff_N, stat_BR=None) -> None:
        """Record step t: the candidates' statistics, and their means over the block's still-masked rows (or over
        ``stat_BR``: with token editing, every position whose draw the step's rules read).

        Every candidate is written each step; a position stops being a candidate once committed, so the
        value it keeps is the one of its commit step.
        """
        B, R = pos_BR.shape
        dest_BR = torch.where(valid_BR, pos_BR, self.G)
        per_row = [stats.logp_N, stats.entropy_N, stats.margin_N] + ([cutoff_N] if cutoff_N is not None else [])
        values_FBR = torch.stack(per_row).float().view(len(per_row), B, R)
        self.stats_FBG[: len(per_row)].scatter_(2, dest_BR.expand(len(per_row), B, R), values_FBR)
        self.step_BG.scatter_(1, dest_BR, t)
        valid_f_BR = (valid_BR if stat_BR is None else stat_BR).float()
        n_valid_B = valid_f_BR.sum(1).clamp(min=1)
        self.step_stats_2BT[:, :, t] = (values_FBR[1:3] * valid_f_BR).sum(-1) / n_valid_B
        self.step_committed_BT[:, t] = commit_BR.sum(1)

    def start_routing(self, L: int, K: int, R: int) -> None:
        """Routing records (R = MoE layers x experts per token, layer-major; -1 where none was recorded):
        ``settled_BLR`` each column's experts once its block is finished (final: block-causal attention keeps
        later blocks from it), ``step_BTKR`` the step's block columns in the forward that scored step t."""
        B, T = self.step_committed_BT.shape
        device = self.step_BG.device
        self.routing_settled_BLR = torch.full((B, L + 1, R), -1, dtype=torch.int16, device=device)  # L: a spare
        self.routing_step_BTKR = torch.full((B, T, K, R), -1, dtype=torch.int16, device=device)

    def write_routing(self, t: int, recorded: list[torch.Tensor], fwd_cols_BQ, cols_BK, start_B) -> None:
        B, K = cols_BK.shape
        r_BQR = torch.cat([r.view(B, -1, r.shape[-1]) for r in recorded], dim=2).to(torch.int16)
        Q, L = r_BQR.shape[1], self.routing_settled_BLR.shape[1] - 1
        full = fwd_cols_BQ is None
        cols_BQ = torch.arange(L, device=cols_BK.device).expand(B, L) if full else fwd_cols_BQ
        dest_BQ = torch.where(cols_BQ < start_B[:, None], cols_BQ, L)  # finished blocks' columns only
        self.routing_settled_BLR.scatter_(1, dest_BQ[..., None].expand_as(r_BQR), r_BQR)
        at_BK = cols_BK if full else (Q - K) + torch.arange(K, device=cols_BK.device).expand(B, K)  # the block: last
        self.routing_step_BTKR[:, t] = r_BQR.gather(1, at_BK[..., None].expand(B, K, r_BQR.shape[-1]))

    def routing_extras(self) -> dict:
        if self.routing_step_BTKR is None:
            return {}
        return {"routing_settled_BLR": self.routing_settled_BLR[:, :-1].contiguous(),
                "routing_step_BTKR": self.routing_step_BTKR}

    def start_editing(self, T: int, K: int) -> None:
        """Token editing's record, per step and block column (k of the block's window): the token held before the
        step, the draw the step's rules read there (-1: none; a masked position's draw is read by the threshold
        rule, a committed one's by the edit rule), its behaviour log-prob and support cut-off; and how many tokens
        each step edited."""
        B, device = self.step_BG.shape[0], self.step_BG.device
        self.step_edited_BT = torch.zeros(B, T, dtype=torch.long, device=device)
        self.edit = {"edit_before_BTK": torch.zeros(B, T, K, dtype=torch.long, device=device),
                     "edit_draws_BTK": torch.full((B, T, K), -1, dtype=torch.long, device=device),
                     "edit_logp_BTK": torch.zeros(B, T, K, dtype=torch.float32, device=device),
                     "edit_cutoff_BTK": torch.full((B, T, K), float("-inf"), dtype=torch.float32, device=device)}

    def write_edit_step(self, t: int, idx_BR, block_BK, read_BR, edit_BR, token_BR, stats, cutoff_N) -> None:
        B, R = idx_BR.shape
        self.step_edited_BT[:, t] = edit_BR.sum(1)
        self.edit["edit_before_BTK"][:, t] = block_BK
        self.edit["edit_draws_BTK"][:, t].scatter_(1, idx_BR, torch.where(read_BR, token_BR, -1))
        self.edit["edit_logp_BTK"][:, t].scatter_(1, idx_BR, stats.logp_N.float().view(B, R))
        if cutoff_N is not None:
            self.edit["edit_cutoff_BTK"][:, t].scatter_(1, idx_BR, cutoff_N.float().view(B, R))

    def edit_extras(self) -> dict:
        return {} if self.edit is None else {"step_edited_BT": self.step_edited_BT, **self.edit}

    def write_discarded(self, slot: int, pos_BR, discarded_BR, token_BR, stats, cutoff_N, rb_N=None) -> None:
        """Record the draws of step ``slot`` of the block that were not committed (they stay masked), and with
        ``rb_N`` their Rao-Blackwellised behaviour log-probs (``common.rao_blackwell``)."""
        B, R = pos_BR.shape
        dest_BR = torch.where(discarded_BR, pos_BR, self.G)
        self.discard_ids_BGS[:, :, slot].scatter_(1, dest_BR, token_BR)
        self.discard_logp_BGS[:, :, slot].scatter_(1, dest_BR, stats.logp_N.float().view(B, R))
        if rb_N is not None:
            if self.discard_rb_logp_BGS is None:
                self.discard_rb_logp_BGS = torch.zeros_like(self.discard_logp_BGS)
            self.discard_rb_logp_BGS[:, :, slot].scatter_(1, dest_BR, rb_N.float().view(B, R))
        if cutoff_N is not None:
            if self.discard_cutoff_BGS is None:
                self.discard_cutoff_BGS = torch.full_like(self.discard_logp_BGS, float("-inf"))
            self.discard_cutoff_BGS[:, :, slot].scatter_(1, dest_BR, cutoff_N.float().view(B, R))


def _stop_eos_rows(x_BL, active_B, end_B, K: int, eos_id: int, rec: _Records) -> torch.Tensor:
    """Rows whose just-finished block (completion positions [end - K, end)) is all EOS stop (LLaDA's rule)."""
    G = rec.G
    g_BG = torch.arange(G, device=x_BL.device)[None, :]
    block_BG = (g_BG >= end_B[:, None] - K) & (g_BG < end_B[:, None])
    all_eos_B = (x_BL[:, -G:].eq(eos_id) | ~block_BG).all(1)
    return _fill_after(x_BL, active_B & all_eos_B, active_B, end_B, eos_id, rec)


def _stop_after_eos(x_BL, active_B, end_B, stop_ids: tuple[int, ...], eos_id: int, rec: _Records) -> torch.Tensor:
    """Rows whose decoded completion (positions before ``end_B``) holds a stop id stop (SDAR's stopping criteria);
    the rest of the completion becomes EOS."""
    decoded_BG = torch.arange(rec.G, device=x_BL.device)[None, :] < end_B[:, None]
    comp_BG = x_BL[:, -rec.G:]
    stopped_BG = torch.zeros_like(decoded_BG)
    for token in stop_ids:
        stopped_BG |= comp_BG.eq(token)
    return _fill_after(x_BL, active_B & (stopped_BG & decoded_BG).any(1), active_B, end_B, eos_id, rec)


def _fill_after(x_BL, done_B, active_B, end_B, eos_id: int, rec: _Records) -> torch.Tensor:
    """Stopped rows: the completion after ``end_B`` becomes EOS, counted as committed at the last step that
    committed a decoded token (they were never sampled: logp/entropy/margin 0, ``filled_BG`` True), so every
    completion token keeps a step. Returns the rows still active."""
    G = rec.G
    decoded_BG = torch.arange(G, device=x_BL.device)[None, :] < end_B[:, None]
    fill_BG = ~decoded_BG & done_B[:, None]
    if not bool(fill_BG.any()):
        return active_B & ~done_B
    x_BL[:, -G:] = x_BL[:, -G:].masked_fill(fill_BG, eos_id)
    last_step_B = torch.where(decoded_BG, rec.unmask_step_BG, -1).max(1).values
    rec.unmask_step_BG.copy_(torch.where(fill_BG, last_step_B[:, None], rec.unmask_step_BG))
    rec.step_committed_BT.scatter_add_(1, last_step_B[:, None].clamp(min=0), fill_BG.sum(1, keepdim=True))
    rec.filled_BG |= fill_BG
    return active_B & ~done_B
