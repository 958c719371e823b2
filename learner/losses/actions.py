"""The action of a denoising step, as the learner scores it: which (sample, position, token) rows enter
log pi(a_t | s_t), with the behaviour log-prob and support cut-off each was drawn under.

At step t the sampler draws a token at every still-masked position of the current block and commits
some. If the commit rule reads the draws (low-confidence, a confidence threshold, EOS demotion), the
action is every draw and pi(a_t | s_t) is the product over all of them; if it does not (random, margin,
entropy), the discarded draws are independent of everything that follows and the committed tokens alone
give the exact likelihood, with lower variance (docs/ALGORITHMS.md; tests/test_loss_unbiased.py).

Letters: B samples, G completion length, T steps, S discard slots per position (steps per block - 1),
N scored rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.step_states import completion_blocks, editing, step_window
from common.trajectory import Trajectory
from learner.losses.base import sampled_tokens


@dataclass
class StepRows:
    """Scored rows of one step per sample: sample b_N, completion position g_N, the drawn token, its
    behaviour log-prob and cut-off, and whether it was committed (False: a discarded draw; under token editing,
    whether the position was masked before the step: False for a draw the edit rule read at a decoded one)."""

    b_N: torch.Tensor
    g_N: torch.Tensor
    token_N: torch.Tensor
    old_logp_N: torch.Tensor
    cutoff_N: torch.Tensor
    committed_N: torch.Tensor


def edit_read_steps(micro: Trajectory) -> torch.Tensor:
    """[B, T] bool: the steps of an editing trajectory that read a draw (every step that ran for the row)."""
    return micro.extras["edit_draws_BTK"].ge(0).any(-1)


def scores_discarded(micro: Trajectory, draws: str) -> bool:
    """Whether a step's action includes its discarded draws under the ``draws`` option (auto/all/committed/
    rao_blackwell)."""
    if editing(micro):
        if draws not in ("auto", "all"):
            raise ValueError(f"algorithm.draws={draws}: with token editing the exact action is every draw the step's "
                             "rules read (masked and decoded positions); set algorithm.draws=auto")
        return True
    if draws == "committed":
        return False
    if draws == "rao_blackwell" and micro.discard_rb_logp_BGS is None:
        raise ValueError("algorithm.draws=rao_blackwell needs the sampler's record of it, made only under plain "
                         "low_confidence remasking (no threshold, remasking_temperature or EOS demotion); set "
                         "algorithm.draws=auto")
    if draws in ("all", "rao_blackwell") or micro.commit_reads_draws:
        if micro.discard_ids_BGS is None:
            raise ValueError("the batch has no discarded draws recorded (discard_ids_BGS); regenerate it with the "
                             "current sampler or set algorithm.draws=committed (biased when the commit rule reads draws)")
        return True
    return False


def step_rows(micro: Trajectory, step_B: torch.Tensor, active_B: torch.Tensor, *, discarded: bool, device,
              rao_blackwell: bool = False) -> StepRows:
    """The rows of step ``step_B[b]`` of every active sample: its committed (drawn, not filled) tokens, then,
    with ``discarded``, the draws it made at the block's other still-masked positions (with ``rao_blackwell``
    their behaviour log-prob is that of their uncommitted set, ``common.rao_blackwell``)."""
    step_B, active_B = step_B.to(device), active_B.to(device)
    if editing(micro):
        return _edit_step_rows(micro, step_B, active_B, device)
    unmask_BG = micro.unmask_step_BG.to(device)
    commit_BG = (unmask_BG == step_B[:, None]) & active_B[:, None] & sampled_tokens(micro).to(device)
    b_N, g_N = commit_BG.nonzero(as_tuple=True)
    parts = [(b_N, g_N, micro.completion_ids_BG.to(device)[b_N, g_N], micro.logp_BG.to(device)[b_N, g_N].float(),
              micro.cutoff_BG.to(device)[b_N, g_N].float(), torch.ones_like(b_N, dtype=torch.bool))]
    S = 0 if micro.discard_ids_BGS is None else micro.discard_ids_BGS.shape[2]
    if discarded and S > 0:
        block_BG, steps_per_block = completion_blocks(micro)
        # Slot of step t at position g: how many steps of g's block came before t (outside [0, S): another block).
        slot_BG = step_B[:, None] - block_BG.to(device) * steps_per_block
        inside_BG = (slot_BG >= 0) & (slot_BG < S) & active_B[:, None]
        slot_BG1 = slot_BG.clamp(0, S - 1)[..., None]
        ids_BG = micro.discard_ids_BGS.to(device).gather(2, slot_BG1)[..., 0]
        drawn_BG = inside_BG & (ids_BG >= 0)
        b_D, g_D = drawn_BG.nonzero(as_tuple=True)
        cutoff_BGS = micro.discard_cutoff_BGS
        cutoff_D = (torch.full(b_D.shape, float("-inf"), device=device) if cutoff_BGS is None
                    else cutoff_BGS.to(device).gather(2, slot_BG1)[..., 0][b_D, g_D].float())
        behaviour_BGS = micro.discard_rb_logp_BGS if rao_blackwell else micro.discard_logp_BGS
        logp_D = behaviour_BGS.to(device).gather(2, slot_BG1)[..., 0][b_D, g_D].float()
        parts.append((b_D, g_D, ids_BG[b_D, g_D], logp_D, cutoff_D, torch.zeros_like(b_D, dtype=torch.bool)))
    return StepRows(*(torch.cat(cols) for cols in zip(*parts)))


def _edit_step_rows(micro: Trajectory, step_B: torch.Tensor, active_B: torch.Tensor, device) -> StepRows:
    """Token editing: every draw the step's rules read in its block (the threshold rule at masked positions, the edit
    rule at decoded ones), as the sampler recorded them (``edit_*_BTK``)."""
    step_B = step_B.clamp(min=0)
    pick = lambda key: micro.extras[key].to(device)[torch.arange(len(micro), device=device), step_B]  # noqa: E731
    draws_BK = pick("edit_draws_BTK")
    b_N, k_N = (draws_BK.ge(0) & active_B[:, None]).nonzero(as_tuple=True)
    _, cols_BK = step_window(micro, step_B, device)
    g_N = cols_BK[b_N, k_N] - micro.prompt_ids_BP.shape[1]
    masked_N = micro.unmask_step_BG.to(device)[b_N, g_N] >= step_B[b_N]  # first committed at this step or later
    return StepRows(b_N, g_N, draws_BK[b_N, k_N], pick("edit_logp_BTK")[b_N, k_N].float(),
                    pick("edit_cutoff_BTK")[b_N, k_N].float(), masked_N)

