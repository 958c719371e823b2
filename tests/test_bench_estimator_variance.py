"""The variance benchmark's moments (benchmarks/bench_estimator_variance.py) against per-sample gradients stacked
by hand and the whole batch's gradient from one backward."""
import pytest
import torch

from benchmarks.bench_estimator_variance import cosine, per_sample_moments, summarise
from common.config import AgrpoConfig, CoupledGrpoConfig
from learner.losses import build_loss, select_rows
from tests.test_losses import EOS, MASK, PAD, _perturbed, flat_grad, model, rollout  # noqa: F401 (fixture)


@pytest.mark.parametrize("cfg", [AgrpoConfig(k_steps=3), CoupledGrpoConfig()], ids=lambda c: c.name)
def test_moments_match_stacked_per_sample_gradients(model, cfg):  # noqa: F811 (fixture)
    traj = rollout(model, B=6, G=8, steps=8, block=4)
    policy = _perturbed(model)  # off the behaviour policy and the reference: the KL term has a gradient
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    m = per_sample_moments(policy, loss, traj, seed=5, ref_model=model)
    s = summarise(m)

    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)  # a fresh loss: no cached old values
    batch = loss.prepare(traj, seed=5)
    rows = []
    for i in range(len(batch)):
        policy.zero_grad()
        loss.backward(policy, select_rows(batch, torch.tensor([i])), total_samples=1, ref_model=model)
        rows.append(flat_grad(policy).double().clone())
    g_ND = torch.stack(rows)
    assert m["n"] == 6 and m["seconds"] > 0
    assert s["var"] == pytest.approx(float(g_ND.var(dim=0).sum()), rel=1e-9)
    assert s["mean_sq"] == pytest.approx(float(g_ND.mean(0).square().sum()), rel=1e-9)
    # The per-sample gradients are shares of the batch's loss: their mean is its gradient.
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    policy.zero_grad()
    loss.backward(policy, loss.prepare(traj, seed=5), total_samples=6, ref_model=model)
    whole = flat_grad(policy).double()
    assert torch.allclose(g_ND.mean(0), whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
    assert cosine(m, m) == pytest.approx(1.0)
    assert cosine(m, {"sum": [-t for t in m["sum"]]}) == pytest.approx(-1.0)
