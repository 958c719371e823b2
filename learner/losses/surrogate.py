"""What the sequence-likelihood surrogates share (wd1, coupled-GRPO, SPG, ESPO): masked inputs, the per-token
log-probs of the clean tokens under them, d1's completion mask, group weights and baselines, the first-visit
cache of "old" values.

These estimators never rebuild the sampler's states: they score the final completion under masks they draw
themselves (``prepare``, from the seed, for the whole batch, so every split sees the same masks).

Letters: B samples, P prompt length, G completion length, L = P + G, E inner epochs, N passes per sample, V vocab.
"""
from __future__ import annotations

import itertools

import torch

from common.step_layout import packed_positions
from common.trajectory import Trajectory
from learner.losses.advantages import group_advantages
from learner.losses.base import PolicyLoss

_BATCH_KEYS = itertools.count()


def token_logprobs(model, ids_BL: torch.Tensor, attn_BL: torch.Tensor, pos_BL, tokens_BG: torch.Tensor) -> torch.Tensor:
    """log p(tokens_BG[:, j] | ids_BL) at the last G positions, fp32 log-softmax of the raw logits (temperature 1,
    full vocabulary, as d1 and every public surrogate score). The one place the one-pass losses (diffu-GRPO and
    these) read logits; a shifted family's (Dream's) sit a column early (the model's ``logit_shift``)."""
    G, L, shift = tokens_BG.shape[1], ids_BL.shape[1], model.logit_shift
    logits_BGV = model.vocab_logits(model.hidden_states(ids_BL, attn_BL, pos_BL)[:, L - G - shift:L - shift]).float()
    return logits_BGV.gather(2, tokens_BG[..., None])[..., 0] - torch.logsumexp(logits_BGV, dim=-1)


def masked_logprobs(model, micro: Trajectory, masked_NBL: torch.Tensor, mask_id: int,
                    attend_BG: torch.Tensor | None = None) -> torch.Tensor:
    """[N, B, G] log-probs of the clean completion tokens, one forward of the N x B masked copies of the rows
    (``masked_NBL`` True = replaced by the mask id; prompt padding stays excluded from attention, and so do the
    completion positions where ``attend_BG`` is False: BGPO's tail after the first EOS)."""
    device = next(model.parameters()).device
    N, B, L = masked_NBL.shape
    comp_BG = micro.completion_ids_BG.to(device)
    clean_BL = torch.cat([micro.prompt_ids_BP.to(device), comp_BG], 1)
    ids_NBL = clean_BL.expand(N, B, L).masked_fill(masked_NBL.to(device), mask_id)
    attend_BG = torch.ones_like(comp_BG, dtype=torch.bool) if attend_BG is None else attend_BG.to(device).bool()
    attn_BL = torch.cat([micro.prompt_mask_BP.to(device).bool(), attend_BG], 1)
    attn_NBL = attn_BL.expand(N, B, L)
    # positions as the sampler numbered them (see learner.step_states.state_inputs)
    packed = micro.extras.get("position_ids", "absolute") == "packed"
    pos = packed_positions(attn_NBL.reshape(N * B, L)) if packed else None
    tokens = comp_BG.expand(N, B, -1).reshape(N * B, -1)
    logp = token_logprobs(model, ids_NBL.reshape(N * B, L), attn_NBL.reshape(N * B, L), pos, tokens)
    return logp.view(N, B, -1)


def first_eos_mask(completion_ids_BG: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """[B, G] bool: tokens up to and including the first EOS (the public codes' completion_mask; all without EOS)."""
    if eos_id is None:
        return torch.ones_like(completion_ids_BG, dtype=torch.bool)
    is_eos_BG = completion_ids_BG == eos_id
    return (is_eos_BG.long().cumsum(1) - is_eos_BG.long()) == 0


def group_ids(group_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index per sample and each sample's group size."""
    _, gid_B = torch.unique(group_B, return_inverse=True)
    size_B = torch.bincount(gid_B)[gid_B]
    return gid_B, size_B


def group_softmax(x_B: torch.Tensor, group_B: torch.Tensor) -> torch.Tensor:
    """softmax of ``x_B`` within each group (wd1 softmaxes its advantages over the group)."""
    gid_B, _ = group_ids(group_B)
    x = x_B.double()
    n = int(gid_B.max()) + 1
    max_N = torch.full((n,), float("-inf"), dtype=x.dtype).scatter_reduce(0, gid_B, x, "amax")
    e_B = torch.exp(x - max_N[gid_B])
    return (e_B / torch.zeros(n, dtype=x.dtype).index_add_(0, gid_B, e_B)[gid_B]).float()


def baseline_advantages(batch: Trajectory, *, baseline: str, std_normalize: bool) -> torch.Tensor:
    """DiffuCoder's and ESPO's advantages: r_i minus the mean of the other rewards of the group (leave_one_out,
    = n/(n-1) x (r_i - group mean)) or of all of them (mean), optionally / (group std + 1e-4) (scale_rewards)."""
    if batch.rewards_B is None or batch.group_B is None:
        raise ValueError("the batch has no rewards_B/group_B: the rollout actor must fill them before the learner")
    adv_B = group_advantages(batch.rewards_B, batch.group_B, std_normalize=std_normalize, eps=1e-4)
    if baseline == "leave_one_out":
        _, n_B = group_ids(batch.group_B)
        adv_B = adv_B * (n_B.float() / (n_B - 1).clamp(min=1).float())
    return adv_B


def epoch_draws(cfg, epoch: int) -> int:
    """Which inner epoch's masks this epoch uses (every epoch its own, or epoch 0's with mask_per_epoch off)."""
    return epoch if getattr(cfg, "mask_per_epoch", True) else 0


class FirstVisitCache:
    """Old values (log-probs, ELBOs) of each prepared row under every epoch's masks, taken at the row's first
    visit (the policy before this batch's updates), as the public codes take them at generation time."""

    def __init__(self):
        self._key = None
        self._values: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, micro: Trajectory, epoch: int, current: torch.Tensor | None, score_epoch) -> torch.Tensor:
        """[B, ...] old values for ``epoch``; ``score_epoch(e)`` computes a (no-grad) value of epoch e's masks,
        ``current`` is this epoch's value from the pass with gradient (detached here; None: scored like the other
        epochs, for a loss that needs its old values before its passes with gradient)."""
        key = micro.extras.get("batch_key")
        if key != self._key:
            self._key, self._values = key, {}
        rows = micro.extras["row_id_B"].tolist()
        if any((r, epoch) not in self._values for r in rows):
            for e in range(int(micro.extras["num_epochs"])):
                if e == epoch and current is not None:
                    values = current.detach()
                else:
                    with torch.no_grad():
                        values = score_epoch(e)
                for i, r in enumerate(rows):
                    self._values.setdefault((r, e), values[i].clone())
        return torch.stack([self._values[(r, epoch)] for r in rows])


class MaskedSurrogateLoss(PolicyLoss):
    """Base of the surrogates: ``prepare`` copies the batch and adds what every one of them needs (row ids and a
    batch key for the old-value cache, the epoch, d1's completion mask and the batch's mean scored tokens per
    sample for token means over the whole batch); subclasses add their advantages and masks."""

    def __init__(self, cfg, *, mask_id: int, pad_id: int, eos_id: int | None = None):
        super().__init__(cfg, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id)
        self._prepared_key: int | None = None
        self._old = FirstVisitCache()

    def _prepare_common(self, batch: Trajectory, epoch: int) -> Trajectory:
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        device = batch.completion_ids_BG.device
        if epoch == 0 or self._prepared_key is None:
            self._prepared_key = next(_BATCH_KEYS)
        cmask_BG = first_eos_mask(batch.completion_ids_BG, self.eos_id)
        out.extras["completion_mask_BG"] = cmask_BG
        out.extras["tokens_per_sample"] = float(cmask_BG.sum()) / max(len(batch), 1)
        out.extras["row_id_B"] = torch.arange(len(batch), device=device)
        out.extras["epoch"] = int(epoch)
        out.extras["num_epochs"] = int(self.cfg.inner_epochs)
        out.extras["batch_key"] = self._prepared_key
        return out

    @staticmethod
    def _check(total_samples: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be the global batch size (> 0), got {total_samples}")
