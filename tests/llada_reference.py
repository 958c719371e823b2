"""Our re-implementation of LLaDA's public reference sampler (``generate.py`` in GSAI-ML/LLaDA).

It keeps the reference's semantics and its costs on purpose (full-sequence logits every step,
float64 Gumbel noise over every position, a per-row top-k loop), because the equivalence tests and
``benchmarks.bench_sampler`` measure our sampler against exactly this behaviour.

Differences from the original, all of which leave its greedy low-confidence output unchanged:
- EOS / EoT ids are arguments instead of LLaDA-8B's hard-coded 126081 / 126348;
- classifier-free guidance without an attention mask works (the original raises NameError there).

Letters: B batch, P prompt length, G gen_length, L = P + G, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gumbel_perturb(logits_BLV: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: exp(logits) / (-log u) ** temperature (argmax = a sample)."""
    if temperature == 0:
        return logits_BLV
    logits_BLV = logits_BLV.to(torch.float64)
    u = torch.rand_like(logits_BLV, dtype=torch.float64)
    return logits_BLV.exp() / (-torch.log(u)) ** temperature


def num_transfer_tokens(block_mask_BK: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps [B, steps]: an even split, remainder first (linear schedule)."""
    n_B1 = block_mask_BK.sum(dim=1, keepdim=True)
    counts = torch.zeros(n_B1.shape[0], steps, dtype=torch.int64, device=block_mask_BK.device) + n_B1 // steps
    remainder = n_B1 % steps
    for b in range(n_B1.shape[0]):
        counts[b, : remainder[b]] += 1
    return counts


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int = 126081,
    eot_id: int = 126348,
) -> torch.Tensor:
    """LLaDA's reference semi-autoregressive sampler; returns x = [prompt | completion] [B, L].

    ``prompt`` is left-padded when ``attention_mask`` is given; positions are 0..L-1 regardless.
    """
    B, P = prompt.shape
    device = prompt.device
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype, device=device)], dim=-1
        )
    prompt_index = x != mask_id  # includes padding, as in the original

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    for block in range(num_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        counts_BS = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(torch.cat([x, un_x], dim=0), attention_mask=both_mask).logits
                cond, uncond = torch.chunk(logits, 2, dim=0)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=attention_mask).logits

            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            noisy = gumbel_perturb(logits, temperature)
            x0 = torch.argmax(noisy, dim=-1)
            if confidence_eos_eot_inf:
                # The original's exact statement: the EoT write lands on the logits the confidence is computed
                # from; the EOS write on the noisy copy, which at temperature 0 is the logits tensor itself.
                noisy[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0[..., None])[..., 0]
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, device=device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -torch.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for b in range(B):
                _, chosen = torch.topk(confidence[b], k=int(counts_BS[b, i]))
                transfer[b, chosen] = True
            x[transfer] = x0[transfer]
    return x
