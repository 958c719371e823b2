"""The masked-diffusion SFT loss of every family, with the same interface as the RL losses so SFT runs on the
learner group.

Per sample: t ~ U(eps, 1); every completion token is masked independently with probability t; the prompt
is never masked. On the sequence grid (block diffusion, SDAR) one block of the completion is drawn per
sample and only its tokens are masked and scored: under block-causal attention a block is predicted from
clean earlier blocks, as it is decoded, and later blocks cannot reach it; the loss is scaled by the number
of blocks, so it estimates the sum over all blocks (SDAR's public training scores every block at once on a
doubled [noisy | clean] sequence instead). Loss = sum over masked tokens of CE / t, divided by the sample's completion length, then
by the global batch size. The completion is every position of ``completion_ids_BG``: LLaDA pads answers with
EOS to the generation length and trains on that EOS run (it is how the model learns to stop). Positions,
not token ids, decide what counts: LLaDA's tokenizer has pad == eos (126081), so dropping "pad" ids would
drop every EOS.

Letters: B samples, P prompt length, G completion length, L = P + G, N masked tokens, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.step_layout import packed_positions
from common.trajectory import Trajectory
from learner.losses.base import per_sample_extra


class MaskedDiffusionSFT:
    """``prepare`` draws t and the mask for the whole batch; ``backward`` trains on one micro-batch."""

    def __init__(self, *, mask_id: int, eps: float = 1e-3, position_ids: str = "absolute",
                 block_grid: str = "completion", block_length: int = 0):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"SFT eps must be in (0, 1), got {eps}")
        self.mask_id, self.eps = int(mask_id), float(eps)
        self.position_ids, self.block_grid, self.block_length = position_ids, block_grid, int(block_length)

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Draw ``sft_t_B`` and ``sft_masked_BG`` into ``extras`` (same seed, same draw on every rank); SFT takes
        one pass per batch (``epoch`` is always 0)."""
        gen = torch.Generator().manual_seed(int(seed))
        B, G = batch.completion_ids_BG.shape
        t_B = self.eps + (1.0 - self.eps) * torch.rand(B, generator=gen)
        masked_BG = torch.rand(B, G, generator=gen) < t_B[:, None]
        scale_B = torch.ones(B)
        if self.block_grid == "sequence":  # one block per sample, the others clean (see the module docstring)
            offset_B1 = (batch.prompt_mask_BP.sum(1) % self.block_length)[:, None]
            block_BG = (torch.arange(G)[None, :] + offset_B1) // self.block_length
            scale_B = (block_BG[:, -1] + 1).float()
            pick_B = (torch.rand(B, generator=gen) * scale_B).long()
            masked_BG &= block_BG == pick_B[:, None]
        extras = {**batch.extras, "sft_t_B": t_B, "sft_masked_BG": masked_BG, "sft_scale_B": scale_B}
        out = batch.select(slice(None))
        out.extras = extras
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """Forward + backward of this micro-batch's share of the global mean loss; returns metric sums."""
        device = next(model.parameters()).device
        t_B = per_sample_extra(micro, "sft_t_B").to(device)
        masked_BG = per_sample_extra(micro, "sft_masked_BG").to(device)
        comp_BG = micro.completion_ids_BG.to(device)
        prompt_BP = micro.prompt_ids_BP.to(device)
        P = prompt_BP.shape[1]
        ids_BL = torch.cat([prompt_BP, comp_BG.masked_fill(masked_BG, self.mask_id)], dim=1)
        attn_BL = torch.cat([micro.prompt_mask_BP.to(device).bool(), torch.ones_like(comp_BG, dtype=torch.bool)], 1)
        pos_BL = packed_positions(attn_BL) if self.position_ids == "packed" else None  # as the sampler numbers them

        hidden_BLD = model.hidden_states(ids_BL, attn_BL, pos_BL)
        rows_B, cols_N = masked_BG.nonzero(as_tuple=True)
        # only masked rows reach the vocabulary; the model's logit shift says where each row's logits sit
        logits_NV = model.vocab_logits(hidden_BLD[rows_B, P + cols_N - model.logit_shift])
        ce_N = F.cross_entropy(logits_NV.float(), comp_BG[rows_B, cols_N], reduction="none")
        per_sample_B = torch.zeros(len(micro), device=device).index_add(0, rows_B, ce_N / t_B[rows_B])
        # the completion length: every position, EOS run included (x the blocks on the sequence grid)
        per_sample_B = per_sample_B * per_sample_extra(micro, "sft_scale_B").to(device) / comp_BG.shape[1]
        if before_backward is not None:
            before_backward(True)
        (per_sample_B.sum() / total_samples).backward()
        # The logged loss is the global mean, whatever ``total_samples`` the caller passed for weighting.
        return {
            "loss": float(per_sample_B.detach().sum()) / total_samples if total_samples else 0.0,
            "samples": float(len(micro)),
            "masked_tokens": float(len(ce_N)),
            "masked_ce_sum": float(ce_N.detach().sum()),
        }


def build_sft_loss(*, mask_id: int, eps: float = 1e-3, position_ids: str = "absolute", block_grid: str = "completion",
                   block_length: int = 0, canvases: bool = False):
    """The SFT loss object (a ``loss_factory`` for ``LearnerGroup`` can return this); the sampler's position and
    block-grid settings, so training sees the states decoding will. ``canvases``: a uniform-noise family
    (DiffusionGemma), trained with its own objective (``learner.uniform_sft``)."""
    if canvases:
        from learner.uniform_sft import UniformNoiseSFT

        return UniformNoiseSFT()
    return MaskedDiffusionSFT(mask_id=mask_id, eps=eps, position_ids=position_ids, block_grid=block_grid,
                              block_length=block_length)
