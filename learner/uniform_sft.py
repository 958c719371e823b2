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
    sc_logits = None
    if self_cond_B.any():
        with torch.no_grad():
            sc_logits = model(input_ids=prefix_BL, decoder_input_ids=noisy_BC, **keys).logits
    logits = model(input_ids=prefix_BL, decoder_input_ids=noisy_BC, self_conditioning_logits=sc_logits,
                   self_conditioning_mask=self_cond_B if sc_logits is not None else None, **keys).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), target_BC.reshape(-1))


class UniformNoiseSFT:
    """``uniform_sft_loss`` behind the learner's interface (``unmask sft`` of a DiffusionGemma base). Rows are
    trained unpadded, in buckets of equal prompt length, as the sampler decodes them (positions count columns);
    each bucket draws its canvas, noise and self-conditioning from the step seed and its prompt length."""

    def prepare(self, batch, *, seed: int, epoch: int = 0):
        out = batch.select(slice(None))
        out.extras = {**batch.extras, "sft_seed": int(seed)}
        return out

    def backward(self, model, micro, *, total_samples: int, ref_model=None, before_backward=None) -> dict[str, float]:
        device = next(model.parameters()).device
        lengths_B = micro.prompt_mask_BP.sum(1)
        buckets = sorted(set(lengths_B.tolist()))
        total = 0.0
        for i, n in enumerate(buckets):
            rows = (lengths_B == n).nonzero()[:, 0]
            prompt = micro.prompt_ids_BP[rows, micro.prompt_ids_BP.shape[1] - n:].to(device)
            gen = torch.Generator().manual_seed(micro.extras["sft_seed"] * 1_000_003 + n)
            loss = uniform_sft_loss(model, prompt, micro.completion_ids_BG[rows].to(device), gen) * len(rows) / total_samples
            if before_backward is not None:
                before_backward(i == len(buckets) - 1)
            loss.backward()
            total += float(loss.detach())
        return {"loss": total, "samples": float(len(micro))}
