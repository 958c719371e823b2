"""Uniform-noise canvas decoding (DiffusionGemma): transformers' ``generate``, draw for draw, with a record.

Per canvas: the encoder appends the prompt (or the previous canvas) to its KV cache; the canvas starts as
uniform random tokens; each step the decoder reads canvas + cache (+ the previous step's logits, self-
conditioning), every position is redrawn from the temperature-scaled logits, the lowest-entropy positions
whose summed entropy minus their largest stays under ``entropy_bound`` are accepted (the rule reads the
distributions, never the draws), and the rest are renoised with fresh uniform tokens. A row stops denoising
when its argmax canvas is stable and its mean entropy is under ``confidence_threshold``; the canvas it
outputs is the argmax of its last step, not the draws. The random draws come in the public order (canvas
init, then per step one multinomial and one renoise over the whole batch), so a seed gives its tokens.

Letters: B rows, K canvases, S steps per canvas, C canvas length, V vocabulary.
"""
from __future__ import annotations

import math

import torch
from common.model.dgemma.modeling import EncoderCache, UniformDecoding, decoder_logits, temperature
from common.model.dgemma.record import CanvasRecord
from common.trajectory import Trajectory


def accept(entropy_BC: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Bool [B, C]: the positions the entropy bound accepts (lowest entropies first, while sum - max <= bound)."""
    sorted_BC, order_BC = torch.sort(entropy_BC, dim=-1, descending=False)
    keep_BC = torch.cumsum(sorted_BC, dim=-1) - sorted_BC <= entropy_bound
    return torch.scatter(torch.zeros_like(keep_BC), -1, order_BC, keep_BC)


@torch.no_grad()
def generate_uniform(model, prompt_ids: torch.Tensor, d: UniformDecoding, eos_token_id: int | list[int] | None = None,
                     pad_token_id: int | None = None, prompt_mask: torch.Tensor | None = None) -> CanvasRecord:
    """Decode ``prompt_ids`` [B, P] (``prompt_mask``: 0 on left padding) as ``model.generate`` does with these
    settings and that ``attention_mask``; the record holds its ``sequences`` and what the learner needs to
    rebuild every step. A canvas holding an EOS (any of them)
    ends its row; with ``pad_token_id`` what follows it is padding."""
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=prompt_ids.device).reshape(-1)
    B, P = prompt_ids.shape
    device, C = prompt_ids.device, model.config.canvas_length
    V = model.config.text_config.vocab_size
    K = math.ceil(d.max_new_tokens / C)
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
    ctx = EncoderCache(model, prompt_mask)
    seq = prompt_ids.clone()
    rec = CanvasRecord.empty(B, K, d.steps, C, device)
    rec.prompt_mask = prompt_mask
    finished_seq = torch.zeros(B, dtype=torch.bool, device=device)
    for k in range(K):
        # --- encoder: the prompt, then each finished canvas, into the cache
        mask_mapping, dec_pos = ctx.read(seq if k == 0 else seq[:, -C:])
        # --- denoising loop
        canvas = torch.randint(0, V, (B, C), device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        history = torch.full((d.stability_threshold, B, C), -1, dtype=torch.long, device=device)
        argmax, sc = canvas, None
        for s in range(d.steps):
            rec.canvas[:, k, s] = canvas
            rec.active[:, k, s] = ~done & ~finished_seq
            logits = decoder_logits(model, canvas, sc, ctx.cache, mask_mapping, dec_pos, temperature(d.steps - s, d))
            probs = torch.softmax(logits, -1, dtype=torch.float32)
            draws = torch.multinomial(probs.view(-1, V), 1).view(B, C)
            new_argmax = logits.argmax(-1)
            entropy_BC = torch.distributions.Categorical(logits=logits).entropy()
            accepted = accept(entropy_BC, d.entropy_bound)
            rec.entropy[:, k, s] = entropy_BC.mean(-1)
            top2_BC2 = probs.topk(2, -1).values
            rec.margin[:, k, s] = (top2_BC2[..., 0] - top2_BC2[..., 1]).mean(-1)
            noise = torch.randint(0, V, (B, C), device=device)
            new_canvas = torch.where(accepted, draws, noise)  # the rest is renoised
            rec.draws[:, k, s], rec.accepted[:, k, s] = draws, accepted
            rec.logp[:, k, s] = (torch.log_softmax(logits, -1).gather(-1, draws[..., None])[..., 0] * accepted).sum(-1)
            # rows that stopped keep their canvas, argmax and self-conditioning logits
            held = done[:, None]
            new_argmax = torch.where(held, argmax, new_argmax)
            canvas = torch.where(held, canvas, new_canvas)
            logits = torch.where(held[..., None], sc, logits) if done.any() else logits
            stable = (history == new_argmax[None]).all(-1).all(0) if d.stability_threshold else torch.ones_like(done)
            history = torch.roll(history, -1, 0)
            if d.stability_threshold:
                history[-1] = new_argmax
            confident = torch.distributions.Categorical(logits=logits).entropy().mean(-1) < d.confidence_threshold
            done = done | (stable & confident)
            argmax, sc = new_argmax, logits.to(model.model.decoder.embed_tokens.weight.dtype)
            if done.all():
                break
        # --- append the argmax canvas; rows past an EOS become padding
        seq = torch.cat([seq, argmax], -1)
        was_finished = finished_seq
        finished_seq = finished_seq | _has_eos(seq[:, -C:], eos)
        if pad_token_id is not None and finished_seq.any():
            seq[was_finished, -C:] = pad_token_id
            after_eos = _after_first_eos(seq[:, -C:], eos)
            seq[:, -C:][after_eos] = pad_token_id
        rec.canvases = k + 1
        if finished_seq.all():
            break
    rec.sequences = seq
    return rec


def _has_eos(tokens_BC: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    if eos is None:
        return torch.zeros(tokens_BC.shape[0], dtype=torch.bool, device=tokens_BC.device)
    return torch.isin(tokens_BC, eos).any(-1)


def _after_first_eos(tokens_BC: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, C]: positions after a row's first EOS (the public ``_finalize_canvas`` pads them)."""
    if eos is None:
        return torch.zeros_like(tokens_BC, dtype=torch.bool)
    is_eos = torch.isin(tokens_BC, eos)
    seen = is_eos.cumsum(-1)
    return (seen > 0) & ~((seen == 1) & is_eos)


def decoding_of(sampler_cfg) -> UniformDecoding:
    """The ``sampler:`` section as the public decoder's settings: ``gen_length`` new tokens, canvases of
    ``block_length`` (the model's canvas_length), ``steps_per_block`` steps a canvas, the rest from ``uniform``."""
    u = sampler_cfg.uniform
    return UniformDecoding(max_new_tokens=sampler_cfg.gen_length, steps=sampler_cfg.steps_per_block, t_min=u.t_min,
                           t_max=u.t_max, entropy_bound=u.entropy_bound, stability_threshold=u.stability_threshold,
                           confidence_threshold=u.confidence_threshold)


@torch.no_grad()
def generate_canvases(model, prompt_rows: list[list[int]], sampler_cfg, *, eos_id: int | None, pad_id: int,
                      seed: int) -> Trajectory:
    """``prompt_rows`` decoded as ``generate_uniform`` does, in buckets of equal prompt length, as one
    ``Trajectory`` in row order. No row is padded: the public decoder counts positions by column, so left
    padding would change a row's logits and the learner, which batches rows from other calls, could not
    rebuild them. Bucket of length n is seeded ``seed`` and n (the global RNG, as ``generate`` draws)."""
    d = decoding_of(sampler_cfg)
    C = model.config.canvas_length
    K, S = -(-d.max_new_tokens // C), d.steps
    device = next(model.parameters()).device
    B = len(prompt_rows)
    G = K * C
    completion = torch.full((B, G), pad_id, dtype=torch.long)
    rec = CanvasRecord.empty(B, K, S, C, "cpu")
    for n in sorted({len(r) for r in prompt_rows}):
        rows = [i for i, r in enumerate(prompt_rows) if len(r) == n]
        torch.manual_seed((seed * 1_000_003 + n) % (1 << 62))
        ids = torch.tensor([prompt_rows[i] for i in rows], dtype=torch.long, device=device)
        part = generate_uniform(model, ids, d, eos_token_id=eos_id, pad_token_id=pad_id)
        out = part.sequences[:, n:].cpu()
        completion[rows, :out.shape[1]] = out
        for name in ("canvas", "draws", "accepted", "active", "logp", "entropy", "margin"):
            getattr(rec, name)[rows] = getattr(part, name).cpu()
    return canvas_trajectory(prompt_rows, completion, rec, d, pad_id)


def canvas_trajectory(prompt_rows: list[list[int]], completion_BG: torch.Tensor, rec: CanvasRecord,
                      d: UniformDecoding, pad_id: int) -> Trajectory:
    """The common ``Trajectory`` of canvas rollouts: the steps are the K x S canvas steps (T = K x S; per-step
    mean entropy, mean margin and accepted count), each token's step is its canvas's last active step, and the record the
    learner rebuilds travels in ``extras`` (the ``canvas_*`` columns of ``common.schema``)."""
    from rollout.sampler import pad_rows

    B, K, S, C = rec.canvas.shape
    prompt_ids, prompt_mask = pad_rows(prompt_rows, pad_id)
    steps_BKS = torch.arange(S).expand(B, K, S)
    last_BK = torch.where(rec.active, steps_BKS, -1).amax(-1).clamp(min=0) + torch.arange(K) * S
    zeros = torch.zeros(B, K * C)
    return Trajectory(
        prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask.bool(), completion_ids_BG=completion_BG,
        unmask_step_BG=last_BK.repeat_interleave(C, dim=1), logp_BG=zeros, entropy_BG=zeros.clone(),
        margin_BG=zeros.clone(), cutoff_BG=torch.full((B, K * C), float("-inf")),
        step_entropy_BT=(rec.entropy * rec.active).reshape(B, K * S).float(),
        step_margin_BT=(rec.margin * rec.active).reshape(B, K * S).float(),
        step_committed_BT=(rec.accepted.sum(-1) * rec.active).reshape(B, K * S).long(),
        temperature=d.t_max, block_length=C, commit_reads_draws=False,
        extras={"canvas_BKSC": rec.canvas, "draws_BKSC": rec.draws, "accepted_BKSC": rec.accepted,
                "active_BKS": rec.active, "step_logp_BKS": rec.logp.float(), "canvas_t_range": (d.t_min, d.t_max)})
