"""AGRPO: a Monte-Carlo estimate of  E[A(tau) * sum_t c_i grad log pi(a_t | s_t)]  from k steps per
trajectory (c_i = 1/T_i by default, as AGRPO's release; definitions and the exactness argument:
docs/ALGORITHMS.md).

Letters: B samples, P prompt length, G completion length, T steps, K steps drawn per sample,
N gathered token rows, V vocabulary.
"""
from __future__ import annotations

import torch

from common.rao_blackwell import commit_floor, uncommitted_logp
from common.trajectory import Trajectory
from learner.step_states import policy_hidden
from learner.losses import steps as step_sel
from learner.losses.actions import edit_read_steps, editing, scores_discarded, step_rows
from learner.losses.base import (
    MetricSums,
    PolicyLoss,
    clipped_pg,
    k3_kl,
    per_sample_extra,
    sampled_tokens,
    sampler_logprobs,
)
from learner.losses.offpolicy import LAG_KEY, add_weight_sums, decoupled_pg


class StepwiseLoss(PolicyLoss):
    """Clipped-ratio policy gradient on the actions (draws) of K selected steps per trajectory.

    Subclasses choose the steps (``select_steps``); the objective, normalisation and the per-step
    backward are shared, so AGRPO and ATPO differ only in where the budget goes.
    """

    scores_edits = True

    def select_steps(self, batch: Trajectory, eligible_BT: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Advantages and the K (step, weight) pairs of every sample; deterministic in (``seed``, ``epoch``):
        each inner epoch draws its own steps."""
        out = batch.select(slice(None))
        out.extras = dict(batch.extras)
        if editing(batch):  # every step that read a draw: EOS-only steps too (a step may edit anywhere in its block)
            eligible_BT = edit_read_steps(batch)
        else:
            eligible_BT = step_sel.eligible_steps(
                batch.unmask_step_BG, batch.completion_ids_BG, batch.num_steps, self.eos_id, sampled_tokens(batch),
                rule=self.cfg.eligible_steps,
            )
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        steps_BK, weights_BK = self.select_steps(batch, eligible_BT.cpu(), gen)
        if self.cfg.normalize == "step_mean":  # the weights estimate the sum over T_i steps; make it the mean
            weights_BK = weights_BK / eligible_BT.cpu().sum(1, keepdim=True).clamp(min=1)
        device = batch.completion_ids_BG.device
        out.extras["advantages_B"] = self._advantages(batch).to(device)
        out.extras["steps_BK"] = steps_BK.to(device)
        out.extras["step_weights_BK"] = weights_BK.to(device)
        out.extras["eligible_steps_B"] = eligible_BT.sum(1).to(device)
        out.extras["inner_epoch"] = int(epoch)
        return out

    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """One forward + backward per selected step column (K of them, always, so every FSDP rank runs
        the same collectives even when its rows have padding there)."""
        if total_samples <= 0:
            raise ValueError(f"total_samples must be the global batch size (> 0), got {total_samples}")
        if self.cfg.beta_kl > 0 and ref_model is None:
            raise ValueError("beta_kl > 0 needs ref_model (the frozen reference policy)")
        lag_B = micro.extras.get(LAG_KEY)
        decoupled = self.cfg.correction == "decoupled"
        if decoupled and lag_B is None:
            raise ValueError(f"algorithm.correction=decoupled needs each row's policy lag (extras[{LAG_KEY!r}], which "
                             "the learner sets from policy_version_B); set correction none to train without it")
        # The policy at this step's start (the proximal one) is the one computing logp_N in inner epoch 0.
        first_epoch = micro.extras.get("inner_epoch", 0) == 0
        adv_B = per_sample_extra(micro, "advantages_B")
        steps_BK = per_sample_extra(micro, "steps_BK")
        weights_BK = per_sample_extra(micro, "step_weights_BK")
        device = next(model.parameters()).device
        P = micro.prompt_ids_BP.shape[1]
        discarded = scores_discarded(micro, self.cfg.draws)
        rao_blackwell = discarded and self.cfg.draws == "rao_blackwell"
        m = MetricSums()
        for j in range(steps_BK.shape[1]):
            step_B, w_B = steps_BK[:, j].to(device), weights_BK[:, j].to(device)
            rows = step_rows(micro, step_B, w_B > 0, discarded=discarded, device=device, rao_blackwell=rao_blackwell)
            b_N, g_N = rows.b_N, rows.g_N
            # Project only the rows the step drew: [N, V] instead of [B, L, V] logits.
            # The hidden states the sampler computed at each row's step, its cache rule included (exact).
            hidden = policy_hidden(model, micro, step_B, self.mask_id, device)
            logp_N = self._logp(model, hidden.rows(b_N, P + g_N), micro, rows)
            adv_N = adv_B.to(device)[b_N].float()
            # Per-draw ratios: at the behaviour policy d(sum_j r_j A) = A grad log pi(a_t|s_t) exactly.
            stale_N = None if lag_B is None else lag_B.to(device)[b_N] != 0
            if decoupled:  # fresh rows: proximal = behaviour policy, so w = 1 and the loss is the coupled one
                prox_N = torch.where(stale_N, logp_N.detach(), rows.old_logp_N)
                tok_loss_N, ratio_N, low_N, high_N = decoupled_pg(
                    logp_N, prox_N, rows.old_logp_N, adv_N, self.clip_low, self.clip_high, self.cfg.is_weight_cap)
            else:
                tok_loss_N, ratio_N, low_N, high_N = clipped_pg(logp_N, rows.old_logp_N, adv_N, self.clip_low, self.clip_high)
            if stale_N is not None and first_epoch:  # the stale draws' pi_prox / pi_behav, whichever correction
                add_weight_sums(m, torch.exp(logp_N.detach() - rows.old_logp_N)[stale_N], self.cfg.is_weight_cap)
            kl_N = None
            if self.cfg.beta_kl > 0:
                with torch.no_grad():
                    ref_h = policy_hidden(ref_model, micro, step_B, self.mask_id, device).rows(b_N, P + g_N)
                    ref_N = self._logp(ref_model, ref_h, micro, rows)
                kl_N = k3_kl(logp_N, ref_N)
                if self.cfg.kl == "k3_ratio":  # AGRPO's release: the behaviour draws' estimate of KL(pi || ref)
                    kl_N = kl_N * torch.exp(logp_N - rows.old_logp_N)
                tok_loss_N = tok_loss_N + self.cfg.beta_kl * kl_N
            loss = (w_B[b_N] * tok_loss_N).sum() / total_samples
            if before_backward is not None:
                before_backward(j == steps_BK.shape[1] - 1)
            loss.backward()  # per step: activation memory does not grow with K
            m.add("loss", loss)
            m.add("steps", (w_B > 0).sum())
            m.add("discarded_tokens", (~rows.committed_N).sum())
            m.token_stats(ratio_N, low_N, high_N, kl_N)
        m.add("samples", len(micro))
        return m.result()

    def _logp(self, model, h_ND, micro, rows):
        """log pi of each row's part of the action: its drawn token's, or under draws=rao_blackwell a discarded
        row's uncommitted set's (read from this step's committed rows of the same sample)."""
        logits_NV = model.vocab_logits(h_ND)
        logp_N = sampler_logprobs(logits_NV, rows.token_N, temperature=micro.temperature, cutoff_N=rows.cutoff_N,
                                  banned_ids=tuple(micro.banned_ids))
        if self.cfg.draws != "rao_blackwell" or bool(rows.committed_N.all()):
            return logp_N
        x_NV = logits_NV.float()
        if micro.banned_ids:
            x_NV = x_NV.index_fill(1, torch.tensor(micro.banned_ids, device=x_NV.device), float("-inf"))
        conf_N = torch.softmax(x_NV.detach(), -1).gather(1, rows.token_N[:, None])[:, 0]
        floor_B, last_B = commit_floor(conf_N, rows.committed_N, rows.g_N, rows.b_N, int(rows.b_N.max()) + 1)
        d_N = ~rows.committed_N
        rb_D = uncommitted_logp(x_NV[d_N], floor_B[rows.b_N[d_N]], last_B[rows.b_N[d_N]], rows.g_N[d_N],
                                micro.temperature, rows.cutoff_N[d_N])
        return logp_N.masked_scatter(d_N, rb_D)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Inner epoch 0 keeps the step seed (the draws of one-epoch runs do not change); later epochs get their own."""
    return int(seed) if epoch == 0 else (int(seed) * 1_000_003 + epoch * 0x9E3779B1) % (1 << 62)


class AgrpoLoss(StepwiseLoss):
    """AGRPO: steps drawn uniformly (i.i.d. or stratified) or by entropy importance sampling; unbiased."""

    def select_steps(self, batch, eligible_BT, gen):
        return step_sel.agrpo_steps(self.cfg.step_sampling, eligible_BT, self.cfg.k_steps, gen, lambda: (
            step_sel.entropy_step_probs(batch.entropy_BG, batch.unmask_step_BG, eligible_BT)))
