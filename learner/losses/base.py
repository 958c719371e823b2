"""The interface every policy-gradient loss implements, and the pieces they share: batch rows and per-sample
extras, the sampled tokens and the sampler's log-prob of each, the clipped objective and k3 KL, and one
backward with its metric sums (the sampler's state at step t is rebuilt in ``learner/step_states.py``).

Letters: B samples, P prompt length, G completion length, L = P + G, T steps, K steps drawn per sample,
N gathered token rows, V vocabulary, D hidden size.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

import torch

from common.trajectory import Trajectory


class PolicyLoss(ABC):
    """``prepare`` the whole batch once (advantages, step draws), then ``backward`` each micro-batch.

    ``backward`` accumulates into the parameters' ``.grad`` the gradient of this micro-batch's share of
    the global-batch loss, normalised by ``total_samples`` (the global batch size), so summing over all
    micro-batches and ranks gives the gradient of the global loss whatever the split. It returns metric
    SUMS (all-reduce them with SUM; ``loss`` sums to the global loss, fractions are sums over ``tokens``).

    ``before_backward(last)``, when given, is called right before each ``.backward()`` with whether it is
    the micro-batch's last one: the learner reduces gradients across ranks only on the last backward of an
    optimizer step, so its collectives do not grow with the passes a loss makes (K sampled steps).
    """

    scores_edits = False  # scores token-editing rollouts (every draw the rules read, in its recorded state)

    def __init__(self, cfg, *, mask_id: int, pad_id: int, eos_id: int | None = None):
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.pad_id = int(pad_id)
        self.eos_id = None if eos_id is None else int(eos_id)
        # None for the ratio-free estimators (wd1, SPG), whose configs have no clip
        self.clip_low = getattr(cfg, "clip_eps", None)
        high = getattr(cfg, "clip_eps_high", None)
        self.clip_high = high if high is not None else self.clip_low

    @abstractmethod
    def prepare(self, batch: Trajectory, *, seed: int, epoch: int = 0) -> Trajectory:
        """Whole-batch work before splitting, for inner epoch ``epoch`` (0..inner_epochs-1; each gets its own
        step draws or prompt mask); returns the batch with per-sample tensors in ``extras``."""

    @abstractmethod
    def backward(self, model, micro: Trajectory, *, total_samples: int, ref_model=None,
                 before_backward=None) -> dict[str, float]:
        """Forward + backward on ``micro`` (rows of a prepared batch); returns metric sums."""

    @property
    def inner_epochs(self) -> int:
        """Optimizer steps the learner takes per batch, each after its own ``prepare(..., epoch=e)``."""
        return self.cfg.inner_epochs

    def _advantages(self, batch: Trajectory) -> torch.Tensor:
        from learner.losses.advantages import group_advantages

        if batch.rewards_B is None or batch.group_B is None:
            raise ValueError("the batch has no rewards_B/group_B: the rollout actor must fill them before the learner")
        return group_advantages(batch.rewards_B, batch.group_B, std_normalize=self.cfg.std_normalize)


def select_rows(batch: Trajectory, index: torch.Tensor | slice) -> Trajectory:
    """Rows of a prepared batch, per-sample ``extras`` included (``Trajectory.select`` slices them)."""
    return batch.select(index)


def per_sample_extra(micro: Trajectory, key: str) -> torch.Tensor:
    """``micro.extras[key]``, checked to be sliced to the micro-batch's rows."""
    if key not in micro.extras:
        raise ValueError(f"micro-batch has no extras[{key!r}]: call loss.prepare on the whole batch first")
    value = micro.extras[key]
    if value.shape[0] != len(micro):
        raise ValueError(
            f"extras[{key!r}] has {value.shape[0]} rows but the micro-batch has {len(micro)}: slice extras "
            "with the rows (learner.losses.select_rows)"
        )
    return value


def sampled_tokens(micro: Trajectory) -> torch.Tensor:
    """[B, G] bool: tokens the policy actually drew (not the EOS tail the sampler filled after stopping)."""
    filled_BG = micro.extras.get("filled_BG")
    if filled_BG is None:
        return torch.ones_like(micro.completion_ids_BG, dtype=torch.bool)
    return ~per_sample_extra(micro, "filled_BG").bool()


def sampler_logprobs(
    logits_NV: torch.Tensor,
    token_N: torch.Tensor,
    *,
    temperature: float,
    cutoff_N: torch.Tensor | None,
    banned_ids: tuple[int, ...],
) -> torch.Tensor:
    """log p~(token) in fp32 under the sampler's distribution: banned ids removed, logits below the
    support cut-off removed, softmax at ``temperature`` (T = 1 statistics for greedy rollouts, as in
    ``rollout.kernels.reference.sample_rows_reference``)."""
    x_NV = logits_NV.float()
    if banned_ids:
        x_NV = x_NV.index_fill(1, torch.tensor(banned_ids, device=x_NV.device), float("-inf"))
    if cutoff_N is not None:
        x_NV = x_NV.masked_fill(x_NV < cutoff_N.to(x_NV.device).float()[:, None], float("-inf"))
    if temperature > 0:
        x_NV = x_NV / temperature
    return x_NV.gather(1, token_N[:, None])[:, 0] - torch.logsumexp(x_NV, dim=-1)


def clipped_pg(logp_N, old_logp_N, adv_N, clip_low: float, clip_high: float):
    """Per-token PPO-clip loss -min(r A, clip(r, 1-lo, 1+hi) A) and the ratio r, low/high-clipped flags."""
    ratio_N = torch.exp(logp_N - old_logp_N)
    loss_N = -torch.minimum(ratio_N * adv_N, ratio_N.clamp(1 - clip_low, 1 + clip_high) * adv_N)
    low_N = (ratio_N < 1 - clip_low) & (adv_N < 0)
    high_N = (ratio_N > 1 + clip_high) & (adv_N > 0)
    return loss_N, ratio_N.detach(), low_N, high_N


def k3_kl(logp_N: torch.Tensor, ref_logp_N: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp (>= 0)."""
    d_N = ref_logp_N - logp_N
    return torch.exp(d_N) - d_N - 1


class MetricSums:
    """Accumulates metric sums as Python floats (one ``.item()`` per value at the end)."""

    def __init__(self):
        self._t: dict[str, torch.Tensor | float] = defaultdict(float)

    def add(self, name: str, value) -> None:
        self._t[name] = self._t[name] + (value.detach().double() if isinstance(value, torch.Tensor) else float(value))

    def token_stats(self, ratio_N, low_N, high_N, kl_N=None) -> None:
        self.add("tokens", ratio_N.numel())
        self.add("clip_low_tokens", low_N.sum())
        self.add("clip_high_tokens", high_N.sum())
        self.add("clipped_tokens", (low_N | high_N).sum())
        self.add("ratio_sum", ratio_N.sum())
        self.add("ratio_sq_sum", (ratio_N.double() ** 2).sum())
        self.add("abs_log_ratio_sum", ratio_N.log().abs().sum())
        if kl_N is not None:
            self.add("kl_sum", kl_N.detach().sum())

    def result(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._t.items()}


def backward_once(loss: torch.Tensor, before_backward, samples: int) -> MetricSums:
    """A one-pass loss's backward (the micro-batch's last, so the learner reduces its gradients) and the
    metric sums every loss reports: the loss and the samples."""
    if before_backward is not None:
        before_backward(True)
    loss.backward()
    m = MetricSums()
    m.add("loss", loss)
    m.add("samples", samples)
    return m
