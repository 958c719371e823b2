"""Policy-gradient losses behind one interface (``PolicyLoss``), built from the ``algorithm:`` section.

    loss = build_loss(cfg, mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id)
    for epoch in range(loss.inner_epochs):                     # one optimizer step each
        prepared = loss.prepare(batch, seed=step, epoch=epoch)  # whole batch, before splitting
        for micro in micro_batches:                            # rows via learner.losses.select_rows
            metrics = loss.backward(model, micro, total_samples=global_batch_size, ref_model=ref)
"""
from __future__ import annotations

from learner.losses.agrpo import AgrpoLoss
from learner.losses.atpo import AtpoLoss
from learner.losses.base import PolicyLoss, select_rows
from learner.losses.bgpo import BgpoLoss
from learner.losses.coupled_grpo import CoupledGrpoLoss
from learner.losses.diffu_grpo import DiffuGrpoLoss
from learner.losses.espo import EspoLoss
from learner.losses.justgrpo import JustGrpoLoss
from learner.losses.spg import SpgLoss
from learner.losses.tracerl import TraceRLLoss
from learner.losses.uniform_agrpo import UniformAgrpoLoss, UniformAtpoLoss
from learner.losses.wd1 import Wd1Loss

LOSSES: dict[str, type[PolicyLoss]] = {
    "agrpo": AgrpoLoss,
    "atpo": AtpoLoss,
    "diffu_grpo": DiffuGrpoLoss,
    "wd1": Wd1Loss,
    "coupled_grpo": CoupledGrpoLoss,
    "spg": SpgLoss,
    "espo": EspoLoss,
    "bgpo": BgpoLoss,
    "tracerl": TraceRLLoss,
    "justgrpo": JustGrpoLoss,
}


# Token editing (LLaDA2.1): AGRPO and ATPO score every draw a step's rules read, in the state the sampler recorded
# (exact; ATPO's step statistics are then over those draws). The surrogates have no edit form.
EDIT_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.scores_edits)

# Uniform-noise canvases (DiffusionGemma) have no mask token: their estimators, by algorithm name.
CANVAS_LOSSES: dict[str, type[PolicyLoss]] = {"agrpo": UniformAgrpoLoss, "atpo": UniformAtpoLoss}


def build_loss(cfg, *, mask_id: int | None, pad_id: int, eos_id: int | None = None,
               canvases: bool = False, editing: bool = False) -> PolicyLoss:
    """The loss for an ``algorithm:`` variant (``common.config.algorithm``). ``eos_id`` defines the eligible
    steps (those committing a non-EOS token) and d1's completion mask; None treats EOS like any token.
    ``canvases``: the policy decodes uniform-noise canvases (DiffusionGemma); ``editing``: its rollouts edit
    decoded tokens (LLaDA2.1, ``sampler.edit_threshold``)."""
    if editing and cfg.name not in EDIT_LOSSES:
        raise ValueError(f"algorithm.name={cfg.name} does not score token editing (sampler.edit_threshold); choose "
                         f"one of {sorted(EDIT_LOSSES)} or unset edit_threshold")
    if canvases:
        if cfg.name not in CANVAS_LOSSES:
            raise ValueError(f"algorithm.name={cfg.name} has no form for uniform-noise canvases (DiffusionGemma) yet; "
                             f"choose one of {sorted(CANVAS_LOSSES)}")
        return CANVAS_LOSSES[cfg.name](cfg, mask_id=-1, pad_id=pad_id, eos_id=eos_id)
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown algorithm {cfg.name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id)


__all__ = [
    "CANVAS_LOSSES", "EDIT_LOSSES", "LOSSES", "AgrpoLoss", "AtpoLoss", "BgpoLoss", "CoupledGrpoLoss", "DiffuGrpoLoss", "EspoLoss", "JustGrpoLoss", "PolicyLoss", "SpgLoss", "TraceRLLoss", "UniformAgrpoLoss", "UniformAtpoLoss", "Wd1Loss",
    "build_loss",
    "select_rows",
]
