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


def accept(logits_BCV: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Bool [B, C]: the positions the entropy bound accepts (lowest entropies first, while sum - max <= bound)."""
    entropy_BC = torch.distributions.Categorical(logits=logits_BCV).entropy()
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
            draws = torch.multinomial(torch.softmax(logits, -1, dtype=torch.float32).view(-1, V), 1).view(B, C)
            new_argmax = logits.argmax(-1)
            accepted = accept(logits, d.entropy_bound)
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
