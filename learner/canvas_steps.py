"""The learner's rebuild of a uniform-noise rollout: the log-probability of each step's action (the draws at
the accepted positions) under the current parameters, from a ``CanvasRecord``; and the loop the canvas losses
backpropagate through, one prompt length at a time, in step with the other learner ranks.

A step's state is (prompt and earlier canvases in the encoder cache, the canvas it reads, the previous step's
logits it is self-conditioned on). The acceptance rule reads only the distributions and the renoise is
uniform, so the accepted draws are the whole action and committed-only scoring is exact given the state. The
self-conditioning logits depend on the parameters through every earlier step of the canvas: ``exact=True``
carries that gradient (the chain rebuilt with its graph), ``exact=False`` stops it at each step (the surrogate).

Letters: B rows, K canvases, S steps per canvas, C canvas length, P prompt length.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from common.model.dgemma.modeling import EncoderCache, UniformDecoding, decoder_logits, temperature
from common.model.dgemma.record import CanvasRecord
from common.trajectory import Trajectory


def acting_steps(active_BKS: torch.Tensor) -> torch.Tensor:
    """Bool [B, K, S]: of a record's active steps, those whose action reaches the output. A canvas outputs the
    argmax of its last step's logits, so that step's draws are discarded: every active step but each canvas's last."""
    last = active_BKS & ~torch.nn.functional.pad(active_BKS[..., 1:], (0, 1), value=False)
    return active_BKS & ~last


def step_logps(model, prompt_ids: torch.Tensor, rec: CanvasRecord, d: UniformDecoding, exact: bool = True,
               scored: torch.Tensor | None = None, passes_KS: torch.Tensor | None = None) -> torch.Tensor:
    """Float [B, K, S]: log pi(action | state) of the ``scored`` steps (default: the active ones), zero elsewhere.
    ``passes_KS`` (default: the steps some row scores) are the steps differentiated, each with a term in the output
    (zero where not scored), so that a plan learner ranks share makes the same graph on each. A canvas runs up to
    its last such step; the steps before it that are not in ``passes_KS`` run without gradient unless ``exact``."""
    scored = rec.active if scored is None else scored & rec.active
    passes_KS = scored.any(0) if passes_KS is None else passes_KS
    P, C = prompt_ids.shape[1], model.config.canvas_length
    mask = rec.prompt_mask if rec.prompt_mask is not None else torch.ones_like(prompt_ids, dtype=torch.bool)
    ctx = EncoderCache(model, mask)
    out = torch.zeros(rec.logp.shape, device=prompt_ids.device)
    for k in range(int(passes_KS.any(1).nonzero().max()) + 1 if passes_KS.any() else 0):
        mask_mapping, pos = ctx.read(rec.sequences[:, :P] if k == 0 else rec.sequences[:, P + (k - 1) * C:P + k * C])
        wanted = passes_KS[k].nonzero()
        if len(wanted) == 0:
            continue
        sc = None
        for s in range(int(wanted[-1]) + 1):
            grad = torch.is_grad_enabled() and (exact or bool(passes_KS[k, s]))
            with torch.set_grad_enabled(grad):
                logits = decoder_logits(model, rec.canvas[:, k, s], sc, ctx.cache, mask_mapping, pos,
                                        temperature(d.steps - s, d))
                if passes_KS[k, s]:
                    logp_BC = torch.log_softmax(logits, -1).gather(-1, rec.draws[:, k, s, :, None])[..., 0]
                    out[:, k, s] = (logp_BC * rec.accepted[:, k, s]).sum(-1) * scored[:, k, s]
            sc = logits if exact else logits.detach()
    return out


def idle_step_logps(model, passes_KS: torch.Tensor, d: UniformDecoding, exact: bool) -> torch.Tensor:
    """``step_logps``'s forwards for ``passes_KS`` on one row of a one-token prompt, nothing scored: zero, with
    the graph of a real rebuild (a learner rank's turn when it has no rows of that prompt length)."""
    K, S = passes_KS.shape
    C, device = model.config.canvas_length, passes_KS.device
    zeros = torch.zeros(1, K, S, C, dtype=torch.long, device=device)
    rec = CanvasRecord(canvas=zeros, draws=zeros, accepted=zeros.bool(), active=zeros[..., 0].bool(),
                       logp=torch.zeros(1, K, S, device=device),
                       sequences=torch.zeros(1, 1 + K * C, dtype=torch.long, device=device))
    return step_logps(model, rec.sequences[:, :1], rec, d, exact, rec.active, passes_KS).sum()


def prompt_buckets(micro: Trajectory) -> list[tuple[int, torch.Tensor]]:
    """(prompt length, row indices) of each length in a canvas batch, shortest first: the sampler decoded each
    length unpadded (positions count columns), so the learner rebuilds each apart."""
    lengths_B = micro.prompt_mask_BP.sum(1)
    return [(n, (lengths_B == n).nonzero()[:, 0]) for n in sorted(set(lengths_B.tolist()))]


def backward_by_prompt_length(micro: Trajectory, plan: Callable[[torch.Tensor], torch.Tensor],
                              loss: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                              idle: Callable[[torch.Tensor], torch.Tensor], before_backward=None) -> float:
    """One forward + backward per prompt length, the same passes on every learner rank; returns the summed loss.

    ``plan(rows)``: a bool tensor (same shape on every rank) of the forwards a bucket's loss makes. The ranks take
    the elementwise OR of their i-th buckets' plans (one all-reduce); the i-th pass of every rank then runs that
    plan: ``loss(n, rows, plan)`` on its i-th bucket (zero weight where it scores nothing), or ``idle(plan)``, a
    zero-weight loss with the same forwards, when it has fewer buckets. FSDP's collectives follow the forwards and
    backwards, so they pair up. ``before_backward(last)`` is called before each backward, as the learner wants."""
    buckets = prompt_buckets(micro)
    plans = [plan(rows) for _, rows in buckets]
    # a prompt length is between 0 and the padded width P: at most P + 1 buckets on any rank
    agreed = torch.zeros(micro.prompt_ids_BP.shape[1] + 1, *plans[0].shape, dtype=torch.int32,
                         device=micro.prompt_ids_BP.device)
    agreed[:len(plans)] = torch.stack(plans)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    turns = agreed.flatten(1).any(1).nonzero()[:, 0].tolist()
    total = 0.0
    for j, i in enumerate(turns):
        value = loss(*buckets[i], agreed[i].bool()) if i < len(buckets) else idle(agreed[i].bool())
        if before_backward is not None:
            before_backward(j == len(turns) - 1)
        value.backward()
        total += float(value.detach())
    return total
