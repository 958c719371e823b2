"""Supervised training of a uniform-noise canvas model (DiffusionGemma) on (prompt, completion) pairs.

The family's own corruption: one canvas of the completion (the same index for the whole batch) is the
target; the encoder reads the prompt and the clean canvases before it; each target position is replaced by
a uniform random token with probability t ~ U(0, 1) per row; half the rows (in expectation) are
self-conditioned on the logits of a first, gradient-free pass over the same noisy canvas, the others get
none, as the first denoising step does. The loss is the cross-entropy of the clean canvas at every position.

Letters: B rows, P prompt length, G completion length, C canvas length, V vocabulary.
"""
from __future__ import annotations

import torch

from learner.canvas_steps import backward_by_prompt_length


def uniform_sft_loss(model, prompt_ids_BP: torch.Tensor, completion_ids_BG: torch.Tensor,
                     gen: torch.Generator, prompt_mask_BP: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of one randomly chosen canvas (``G`` must be a multiple of the canvas length);
    ``prompt_mask_BP`` (0 on left padding) hides padding from the encoder and decoder, as in decoding."""
    B, G = completion_ids_BG.shape
    C, V = model.config.canvas_length, model.config.text_config.vocab_size
    if G % C:
        raise ValueError(f"completion length {G} must be a multiple of the model's canvas_length {C}")
    device = completion_ids_BG.device
    k = int(torch.randint(G // C, (1,), generator=gen))
    target_BC = completion_ids_BG[:, k * C:(k + 1) * C]
    prefix_BL = torch.cat([prompt_ids_BP, completion_ids_BG[:, :k * C]], 1)
    t_B = torch.rand(B, 1, generator=gen).to(device)
    noise_BC = torch.randint(V, (B, C), generator=gen).to(device)
    noisy_BC = torch.where(torch.rand(B, C, generator=gen).to(device) < t_B, noise_BC, target_BC)
    self_cond_B = (torch.rand(B, generator=gen) < 0.5).to(device)
    keys = {}
    if prompt_mask_BP is not None:
        clean_BL = torch.ones_like(prefix_BL[:, prompt_ids_BP.shape[1]:], dtype=torch.bool)
        enc_BL = torch.cat([prompt_mask_BP.bool(), clean_BL], 1)
        keys = dict(attention_mask=enc_BL, decoder_attention_mask=torch.nn.functional.pad(enc_BL, (0, C), value=True))
    # the gradient-free pass runs even when no row reads it (they get zeros, as with no logits): every call
    # makes the same two forwards, which learner ranks rely on to stay in step
    with torch.no_grad():
        sc_logits = model(input_ids=prefix_BL, decoder_input_ids=noisy_BC, **keys).logits
    logits = model(input_ids=prefix_BL, decoder_input_ids=noisy_BC, self_conditioning_logits=sc_logits,
                   self_conditioning_mask=self_cond_B, **keys).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), target_BC.reshape(-1))


class UniformNoiseSFT:
    """``uniform_sft_loss`` behind the learner's interface (``unmask sft`` of a DiffusionGemma base). Rows are
    trained unpadded, in buckets of equal prompt length, as the sampler decodes them (positions count columns);
    each bucket draws its canvas, noise and self-conditioning from the step seed and its prompt length. A learner
    rank with fewer buckets than another makes zero-weight passes (``canvas_steps.backward_by_prompt_length``)."""

    def prepare(self, batch, *, seed: int, epoch: int = 0):
        out = batch.select(slice(None))
        out.extras = {**batch.extras, "sft_seed": int(seed)}
        return out

    def backward(self, model, micro, *, total_samples: int, ref_model=None, before_backward=None) -> dict[str, float]:
        P = micro.prompt_ids_BP.shape[1]

        def loss(n, rows, _):
            gen = torch.Generator().manual_seed(micro.extras["sft_seed"] * 1_000_003 + n)
            return uniform_sft_loss(model, micro.prompt_ids_BP[rows, P - n:], micro.completion_ids_BG[rows],
                                    gen) * len(rows) / total_samples

        def idle(_):  # one row, one prompt token, one canvas: the same two forwards, zero weight
            tokens = torch.zeros(1, 1 + model.config.canvas_length, dtype=torch.long, device=micro.prompt_ids_BP.device)
            return uniform_sft_loss(model, tokens[:, :1], tokens[:, 1:], torch.Generator().manual_seed(0)) * 0.0

        total = backward_by_prompt_length(micro, lambda rows: torch.ones(1, dtype=torch.bool), loss, idle,
                                          before_backward)
        return {"loss": total, "samples": float(len(micro))}
