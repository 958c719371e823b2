"""What a uniform-noise rollout records for the learner (letters as in ``rollout.uniform_sampler``).

Per canvas k and step s: the canvas the decoder saw, every position's draw, the accepted set, whether the
row was still denoising, and the behaviour log-probability of the accepted draws (the action). The renoise
tokens are the next step's canvas at the positions not accepted; the temperature is the schedule's at s; the
self-conditioning logits are the previous step's, which the learner recomputes (with or without their
gradient) rather than storing [C, V] per step. The encoder's input is ``sequences`` (after EOS padding),
exactly what the sampler encoded before each canvas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CanvasRecord:
    canvas: torch.Tensor  # long [B, K, S, C]: the canvas the decoder read at each step
    draws: torch.Tensor  # long [B, K, S, C]: the multinomial draw at every position
    accepted: torch.Tensor  # bool [B, K, S, C]: positions the entropy bound accepted
    active: torch.Tensor  # bool [B, K, S]: the row was still denoising (not stopped, no EOS in an earlier canvas)
    logp: torch.Tensor  # float [B, K, S]: log-prob of the accepted draws under the scaled logits
    entropy: torch.Tensor | None = None  # float [B, K, S]: mean entropy of the scaled distributions over the canvas
    margin: torch.Tensor | None = None  # float [B, K, S]: their mean top1 - top2 probability (ATPO's confidence margin)
    sequences: torch.Tensor | None = None  # long [B, P + canvases * C]: the prompt and the argmax canvases
    prompt_mask: torch.Tensor | None = None  # bool [B, P]: real prompt tokens (0: left padding); None: all real
    canvases: int = 0  # canvases decoded (K or fewer when every row ended)

    @classmethod
    def empty(cls, B: int, K: int, S: int, C: int, device) -> "CanvasRecord":
        long = dict(dtype=torch.long, device=device)
        return cls(canvas=torch.zeros(B, K, S, C, **long), draws=torch.zeros(B, K, S, C, **long),
                   accepted=torch.zeros(B, K, S, C, dtype=torch.bool, device=device),
                   active=torch.zeros(B, K, S, dtype=torch.bool, device=device),
                   logp=torch.zeros(B, K, S, device=device), entropy=torch.zeros(B, K, S, device=device),
                   margin=torch.zeros(B, K, S, device=device))
