"""The in-memory form of rollouts, shared by the sampler (producer), the Arrow schema and the learner.

Letters: B samples, P prompt length (left-padded), G completion length, T denoising steps.
The wire format (Arrow) lives in ``common.schema``; this is what both ends hold as torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Trajectory:
    """Everything a batch of rollouts recorded; enough for the learner to rebuild every state exactly.

    Per completion token (``_BG``): the global step (0..T-1) at which it was committed, its log-prob
    under the distribution it was drawn from (temperature + support), the entropy and top1-top2
    probability margin of that distribution, and the support cut-off (a raw-logit threshold between the
    smallest logit top-k/top-p kept and the largest it dropped, so "keep logits >= cutoff" rebuilds the
    support despite rounding; -inf when the whole vocabulary was eligible). Per step (``_BT``): mean
    entropy and mean margin over the block's still-masked positions before the step (with token editing over
    every position whose draw the step's rules read), and how many tokens the step committed.

    Discarded draws (``_BGS``, S = steps per block - 1): at every step the sampler draws a token at each
    still-masked position of the block and commits only some; slot s of position g holds the token drawn
    there at the s-th step of g's block (only steps before g's commit step have one; -1 elsewhere), with
    its behaviour log-prob and support cut-off. When the commit rule reads the draws
    (``commit_reads_draws``: low-confidence scores, a confidence threshold, EOS demotion) they are part
    of the action, and the exact score function needs them (docs/ALGORITHMS.md).
    """

    prompt_ids_BP: torch.Tensor  # int64, left-padded with the pad id
    prompt_mask_BP: torch.Tensor  # bool, True on real prompt tokens
    completion_ids_BG: torch.Tensor  # int64
    unmask_step_BG: torch.Tensor  # int64, step index in [0, T)
    logp_BG: torch.Tensor  # float32
    entropy_BG: torch.Tensor  # float32
    margin_BG: torch.Tensor  # float32
    cutoff_BG: torch.Tensor  # float32, -inf where the full vocabulary was the support
    step_entropy_BT: torch.Tensor  # float32
    step_margin_BT: torch.Tensor  # float32
    step_committed_BT: torch.Tensor  # int64
    temperature: float = 0.0
    block_length: int = 0
    banned_ids: tuple[int, ...] = ()  # token ids whose logits the sampler set to -inf (LLaDA's logits_eos_inf)
    discard_ids_BGS: torch.Tensor | None = None  # int64, -1 where position g drew nothing at slot s
    discard_logp_BGS: torch.Tensor | None = None  # float32 behaviour log-prob of each discarded draw
    discard_cutoff_BGS: torch.Tensor | None = None  # float32 support cut-off of each draw (None: no top-k/top-p)
    discard_rb_logp_BGS: torch.Tensor | None = None  # float32 behaviour log P~(B) of each discarded draw's
    # uncommitted set (common.rao_blackwell; None unless the rule is plain low-confidence ranking)
    commit_reads_draws: bool = True  # the commit rule looked at the drawn tokens (the draws are the action)
    block_grid: str = "completion"  # where blocks start: the completion ("completion") or every K positions ("sequence")
    # Filled after generation by the rollout actor:
    rewards_B: torch.Tensor | None = None  # float32
    group_B: torch.Tensor | None = None  # int64: samples of one prompt share a group index
    policy_version_B: torch.Tensor | None = None  # int64
    extras: dict = field(default_factory=dict)

    @property
    def sequences_BL(self) -> torch.Tensor:
        """[prompt | completion], the contract's ``sequences``."""
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BG], dim=1)

    @property
    def num_steps(self) -> int:
        return self.step_entropy_BT.shape[1]

    def __len__(self) -> int:
        return self.completion_ids_BG.shape[0]

    def select(self, index: torch.Tensor | slice) -> "Trajectory":
        """Rows ``index`` of every per-sample tensor, those in ``extras`` (leading dim B) included."""
        B = len(self)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        out["extras"] = {k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                         for k, v in self.extras.items()}
        return Trajectory(**out)

    def to(self, device: torch.device | str) -> "Trajectory":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        out["extras"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()}
        return Trajectory(**out)
