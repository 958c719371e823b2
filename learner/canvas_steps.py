"""The learner's rebuild of a uniform-noise rollout: the log-probability of each step's action (the draws at
the accepted positions) under the current parameters, from a ``CanvasRecord``.

A step's state is (prompt and earlier canvases in the encoder cache, the canvas it reads, the previous step's
logits it is self-conditioned on). The acceptance rule reads only the distributions and the renoise is
uniform, so the accepted draws are the whole action and committed-only scoring is exact given the state. The
self-conditioning logits depend on the parameters through every earlier step of the canvas: ``exact=True``
carries that gradient (the chain rebuilt with its graph), ``exact=False`` stops it at each step (the surrogate).
"""
from __future__ import annotations

import torch

from common.model.dgemma.modeling import EncoderCache, UniformDecoding, decoder_logits, temperature
from common.model.dgemma.record import CanvasRecord


def acting_steps(active_BKS: torch.Tensor) -> torch.Tensor:
    """Bool [B, K, S]: of a record's active steps, those whose action reaches the output. A canvas outputs the
    argmax of its last step's logits, so that step's draws are discarded: every active step but each canvas's last."""
    last = active_BKS & ~torch.nn.functional.pad(active_BKS[..., 1:], (0, 1), value=False)
    return active_BKS & ~last


def step_logps(model, prompt_ids: torch.Tensor, rec: CanvasRecord, d: UniformDecoding, exact: bool = True,
               scored: torch.Tensor | None = None) -> torch.Tensor:
    """Float [B, K, S]: log pi(action | state) of the ``scored`` steps (default: the active ones), zero elsewhere.
    Steps before the last scored step of a canvas run without gradient unless ``exact`` needs it."""
    scored = rec.active if scored is None else scored & rec.active
    P, C = prompt_ids.shape[1], model.config.canvas_length
    mask = rec.prompt_mask if rec.prompt_mask is not None else torch.ones_like(prompt_ids, dtype=torch.bool)
    ctx = EncoderCache(model, mask)
    out = torch.zeros(rec.logp.shape, device=prompt_ids.device)
    for k in range(rec.canvases):
        mask_mapping, pos = ctx.read(rec.sequences[:, :P] if k == 0 else rec.sequences[:, P + (k - 1) * C:P + k * C])
        wanted = scored[:, k].any(0).nonzero()
        if len(wanted) == 0:
            continue
        sc = None
        for s in range(int(wanted[-1]) + 1):
            grad = torch.is_grad_enabled() and (exact or bool(scored[:, k, s].any()))
            with torch.set_grad_enabled(grad):
                logits = decoder_logits(model, rec.canvas[:, k, s], sc, ctx.cache, mask_mapping, pos,
                                        temperature(d.steps - s, d))
                if scored[:, k, s].any():
                    logp_BC = torch.log_softmax(logits, -1).gather(-1, rec.draws[:, k, s, :, None])[..., 0]
                    out[:, k, s] = (logp_BC * rec.accepted[:, k, s]).sum(-1) * scored[:, k, s]
            sc = logits if exact else logits.detach()
    return out
