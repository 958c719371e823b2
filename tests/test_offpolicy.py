"""The decoupled off-policy correction (learner/losses/offpolicy.py) and the staleness metrics: today's loss at
lag 0, the formula on a hand-computed case, plain importance sampling when nothing truncates or clips, and
micro-batch / rank invariance with stale rows."""
import copy
import math

import pytest
import torch

from common.config import AgrpoConfig, AtpoConfig
from learner.losses import build_loss
from learner.losses.base import MetricSums
from learner.losses.offpolicy import LAG_KEY, add_weight_sums, decoupled_pg, lag_metrics, policy_lag, weight_summary
from tests.test_losses import EOS, MASK, PAD, _grads_for_split, _perturbed, model, rollout  # noqa: F401 (fixture)


def _batch(model, cfg, lag_B, seed=11):
    traj = rollout(model, B=6, G=8, steps=8, block=4)
    traj.group_B = torch.tensor([0, 0, 0, 1, 1, 1])
    traj.extras[LAG_KEY] = torch.as_tensor(lag_B)
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    return loss, loss.prepare(traj, seed=seed)


def test_decoupled_pg_on_a_hand_computed_case():
    # token 0: w = 0.4/0.1 = 4 -> cap 2; r = 0.5/0.4 = 1.25 > 1.2 with A > 0: clipped, no gradient.
    # token 1: w = 0.3/0.6 = 0.5; r = 0.27/0.3 = 0.9 with A < 0: unclipped; loss -0.5 * 0.9 * (-2) = 0.9.
    # token 2: w = 0.2/0.1 = 2 (= cap, not truncated); r = 0.1/0.2 = 0.5 < 0.8 with A < 0: clipped at 0.8.
    logp = torch.tensor([0.5, 0.27, 0.1]).log().requires_grad_()
    prox, behav = torch.tensor([0.4, 0.3, 0.2]).log(), torch.tensor([0.1, 0.6, 0.1]).log()
    adv = torch.tensor([1.0, -2.0, -1.0])
    loss, ratio, low, high = decoupled_pg(logp, prox, behav, adv, 0.2, 0.2, cap=2.0)
    assert loss.tolist() == pytest.approx([-2 * 1.2 * 1.0, 0.5 * 0.9 * 2.0, 2 * 0.8 * 1.0], rel=1e-6)
    assert ratio.tolist() == pytest.approx([1.25, 0.9, 0.5], rel=1e-6)
    assert high.tolist() == [True, False, False] and low.tolist() == [False, False, True]
    loss.sum().backward()
    # d/dlogp of -w r A is -w r A where unclipped; 0 where clipped
    assert logp.grad.tolist() == pytest.approx([0.0, 0.5 * 0.9 * 2.0, 0.0], rel=1e-6)
    m = MetricSums()  # the weights' sums: 4 (above the cap), 0.5, 2 (at it)
    add_weight_sums(m, torch.exp(prox - behav), cap=2.0)
    assert m.result() == pytest.approx({"stale_tokens": 3, "is_weight_sum": 6.5, "is_weight_sq_sum": 20.25,
                                        "is_truncated_tokens": 1}, rel=1e-6)


@pytest.mark.parametrize("cfg", [AgrpoConfig(k_steps=3, beta_kl=0.05, clip_eps=0.1), AtpoConfig(k_steps=2, selection="sample")],
                         ids=lambda c: c.name)
def test_lag_zero_is_todays_loss_bitwise(model, cfg):
    policy = _perturbed(model, scale=0.2)  # ratios away from 1, some clipped
    loss_none, batch = _batch(model, cfg, torch.zeros(6, dtype=torch.long))
    loss_dec, batch_dec = _batch(model, cfg.model_copy(update={"correction": "decoupled"}), torch.zeros(6, dtype=torch.long))
    g_none, m_none = _grads_for_split(loss_none, policy, batch, [torch.arange(6)], model)
    g_dec, m_dec = _grads_for_split(loss_dec, policy, batch_dec, [torch.arange(6)], model)
    assert m_none["clipped_tokens"] > 0 and m_none["stale_tokens"] == 0
    assert torch.equal(g_none, g_dec)
    assert m_none == m_dec


def test_stale_rows_get_plain_importance_sampling_when_nothing_truncates_or_clips(model):
    """At the step's start pi = pi_prox, so with no cap the decoupled gradient of a stale draw is
    w A grad log pi = (pi/pi_behav) A grad log pi: the gradient of the unclipped behaviour-ratio objective."""
    policy = _perturbed(model, scale=0.2)
    lag = torch.ones(6, dtype=torch.long)
    wide = AgrpoConfig(k_steps=3, clip_eps=1e6)
    loss_is, batch = _batch(model, wide, lag)
    loss_dec, batch_dec = _batch(model, wide.model_copy(update={"correction": "decoupled", "is_weight_cap": 1e30}), lag)
    g_is, m_is = _grads_for_split(loss_is, policy, batch, [torch.arange(6)], None)
    g_dec, m_dec = _grads_for_split(loss_dec, policy, batch_dec, [torch.arange(6)], None)
    assert g_is.abs().max() > 0 and m_is["abs_log_ratio_sum"] > 1e-2 * m_is["tokens"]  # really off-policy
    assert torch.allclose(g_dec, g_is, rtol=1e-5, atol=1e-6 * float(g_is.abs().max()))
    # the importance weights are the behaviour ratios; the ratios against the proximal policy are 1
    assert m_dec["stale_tokens"] == m_is["tokens"] == m_dec["tokens"]
    assert m_dec["is_weight_sum"] == pytest.approx(m_is["ratio_sum"], rel=1e-6)
    assert m_dec["ratio_sum"] == pytest.approx(m_dec["tokens"], rel=1e-6) and m_dec["clipped_tokens"] == 0


def test_truncation_scales_each_stale_draw_to_the_cap(model):
    """With cap c the stale draws' weights are min(w, c): the gradient equals the importance-sampling one with
    every weight above c brought down to c, computed here draw by draw."""
    policy = _perturbed(model, scale=0.2)
    lag = torch.tensor([0, 0, 0, 2, 2, 2])
    cfg = AgrpoConfig(k_steps=2, correction="decoupled", is_weight_cap=1.05)
    loss, batch = _batch(model, cfg, lag)
    g, m = _grads_for_split(loss, policy, batch, [torch.arange(6)], None)
    assert 0 < m["is_truncated_tokens"] < m["stale_tokens"]
    # the same gradient from the definition: fresh rows coupled (clip 0.2), stale rows  min(w, c) A grad log pi
    from learner.losses.actions import scores_discarded, step_rows
    from learner.step_states import policy_hidden
    policy.zero_grad()
    P = batch.prompt_ids_BP.shape[1]
    total = torch.zeros(())
    for j in range(batch.extras["steps_BK"].shape[1]):
        step_B, w_B = batch.extras["steps_BK"][:, j], batch.extras["step_weights_BK"][:, j]
        rows = step_rows(batch, step_B, w_B > 0, discarded=scores_discarded(batch, cfg.draws), device="cpu")
        hidden = policy_hidden(policy, batch, step_B, MASK, "cpu")
        logp = loss._logp(policy, hidden.rows(rows.b_N, P + rows.g_N), batch, rows)
        adv = batch.extras["advantages_B"][rows.b_N]
        r = torch.exp(logp - rows.old_logp_N)
        stale = lag[rows.b_N] != 0
        fresh_term = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
        stale_term = -(r.detach().clamp(max=1.05) * logp * adv)  # the gradient of w A log pi, w fixed
        total = total + (w_B[rows.b_N] * torch.where(stale, stale_term, fresh_term)).sum() / 6
    total.backward()
    g_ref = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in policy.parameters()])
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.abs().max()))


def test_decoupled_ignores_the_split_and_the_ranks(model):
    policy = _perturbed(model, scale=0.2)
    cfg = AtpoConfig(k_steps=3, selection="sample", correction="decoupled", is_weight_cap=1.1)
    loss, batch = _batch(model, cfg, torch.tensor([1, 1, 1, 0, 0, 0]))
    g1, m1 = _grads_for_split(loss, policy, batch, [torch.arange(6)], None)
    g2, m2 = _grads_for_split(loss, policy, batch, [torch.tensor([4]), torch.tensor([0, 5, 2, 1, 3])], None)
    assert m1["is_truncated_tokens"] > 0
    assert torch.allclose(g2, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))
    for key in ("stale_tokens", "is_truncated_tokens", "clipped_tokens"):
        assert m2[key] == m1[key]
    assert m2["is_weight_sq_sum"] == pytest.approx(m1["is_weight_sq_sum"], rel=1e-6)
    replica = copy.deepcopy(policy)
    ga, _ = _grads_for_split(loss, policy, batch, [torch.arange(3)], None)
    gb, _ = _grads_for_split(loss, replica, batch, [torch.arange(3, 6)], None)
    assert torch.allclose(ga + gb, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))


def test_decoupled_needs_the_lag_and_one_inner_epoch(model):
    cfg = AgrpoConfig(k_steps=2, correction="decoupled")
    loss, batch = _batch(model, cfg, torch.zeros(6, dtype=torch.long))
    del batch.extras[LAG_KEY]
    with pytest.raises(ValueError, match="policy lag"):
        loss.backward(model, batch, total_samples=6)
    with pytest.raises(ValueError, match="inner_epochs 1"):
        AgrpoConfig(correction="decoupled", inner_epochs=2)


def test_lag_metrics_per_group_and_the_weight_summary():
    lag_B = policy_lag(torch.tensor([5, 5, 4, 4, 3, 3, 5, 5, 6, 6]), version=5)  # 6: after a rollback
    out = lag_metrics(lag_B, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    assert out == pytest.approx({"policy_lag_mean": 0.4, "policy_lag_max": 2.0, "stale_group_share": 0.6,
                   "groups_lag_-1": 1.0, "groups_lag_0": 2.0, "groups_lag_1": 1.0, "groups_lag_2": 1.0})
    s = weight_summary({"stale_tokens": 4.0, "is_weight_sum": 4.0, "is_weight_sq_sum": 6.0, "is_truncated_tokens": 1.0})
    assert s == {"is_weight_mean": 1.0, "is_weight_std": math.sqrt(0.5), "is_truncated_share": 0.25}
    assert weight_summary({"tokens": 3.0}) == {}


def test_the_run_plot_shows_staleness_when_the_steps_report_it(tmp_path):
    import json

    from driver.plots import plot_run

    run = tmp_path / "tiny-async"
    run.mkdir()
    records = [{"step": 1, "loss": 0.0, "reward": 0.1, "accuracy": 0.1, "policy_lag_mean": 0.0, "policy_lag_max": 0.0,
                "stale_group_share": 0.0},
               {"step": 2, "loss": 0.0, "reward": 0.2, "accuracy": 0.2, "policy_lag_mean": 0.5, "policy_lag_max": 1.0,
                "stale_group_share": 0.5, "is_weight_mean": 1.1, "is_weight_std": 0.3, "is_truncated_share": 0.02}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (run / "plots" / "staleness.png") in plot_run(run)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.0, "reward": 0.1, "accuracy": 0.1}) + "\n")
    (run / "plots" / "staleness.png").unlink()
    assert (run / "plots" / "staleness.png") not in plot_run(run)


def test_the_learner_stamps_the_lag_and_reports_the_staleness_of_each_step(local_group, model):
    import functools

    from common.config import LearnerConfig, ModelConfig
    from learner.worker import LearnerRank

    cfg = AgrpoConfig(k_steps=2, correction="decoupled")
    rank = LearnerRank(LearnerConfig(num_cpus_per_rank=0.5, lr=1e-3), ModelConfig(preset="tiny"), rank=0,
                       world_size=1, loss_factory=functools.partial(build_loss, cfg, mask_id=MASK, pad_id=PAD,
                                                                    eos_id=EOS), seed=0)
    rank.setup("127.0.0.1", 0)
    batch = rollout(model, B=8)  # two groups of 4, sampled by version 0
    batch.policy_version_B = torch.zeros(8, dtype=torch.long)
    fresh = rank.step(batch, step_seed=0)
    assert (fresh["policy_lag_max"], fresh["stale_group_share"], fresh["groups_lag_0"]) == (0.0, 0.0, 2.0)
    assert fresh["stale_tokens"] == 0 and "is_weight_mean" not in fresh
    stale = rank.step(batch, step_seed=1)  # the learner is at version 1 now
    assert (stale["policy_lag_mean"], stale["stale_group_share"], stale["groups_lag_1"]) == (1.0, 1.0, 2.0)
    assert stale["stale_tokens"] == stale["scored_tokens"] > 0
    assert stale["is_weight_mean"] > 0 and stale["is_weight_std"] > 0 and 0 <= stale["is_truncated_share"] <= 1
