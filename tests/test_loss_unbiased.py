"""The k-step estimators are unbiased for the full sum over eligible steps: averaged over many seeded
draws, AGRPO's (uniform / stratified / entropy) and ATPO's sampled gradient matches the exact
gradient  -1/B sum_i A_i sum_{t eligible} grad log pi(a_t | s_t)  within its standard error.

The exact per-(sample, step) gradients g_{i,t} are computed once by an independent implementation
(full-vocabulary forward, masks rebuilt inline). Each draw's estimate is then  sum w_{i,t} g_{i,t}
with w from the real ``loss.prepare``; that ``loss.backward`` produces exactly this combination is
checked on a few draws. Letters: B samples, T steps, D parameters, N draws.
"""
import pytest
import torch

from common.config import AgrpoConfig, AtpoConfig
from learner.losses import build_loss
from tests.test_losses import EOS, MASK, PAD, flat_grad, rollout

B, G, STEPS, BLOCK = 8, 8, 8, 4


@pytest.fixture(scope="module")
def setup():
    from common.model import build_model, preset_config

    model = build_model(preset_config("tiny"), seed=0)
    traj = rollout(model, B=B, G=G, steps=STEPS, block=BLOCK, temperature=1.0, seed=5)
    gm_XD, eligible_BT = _exact_step_grads(model, traj)
    return model, traj, gm_XD, eligible_BT


def _exact_step_grads(model, traj):
    """[B*T, D] gradient of -A_i/B * log pi(a_t|s_t) for every eligible (i, t); zero rows elsewhere."""
    P, T = traj.prompt_ids_BP.shape[1], traj.num_steps
    r_B = traj.rewards_B
    adv_B = torch.stack([r_B[i] - r_B[traj.group_B == traj.group_B[i]].mean() for i in range(B)])
    D = sum(p.numel() for p in model.parameters())
    gm_XD = torch.zeros(B * T, D)
    eligible_BT = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        for t in range(T):
            sel_G = traj.unmask_step_BG[i] == t
            if not bool((traj.completion_ids_BG[i][sel_G] != EOS).any()):
                continue
            eligible_BT[i, t] = True
            comp_G = traj.completion_ids_BG[i].masked_fill(traj.unmask_step_BG[i] >= t, MASK)
            ids_1L = torch.cat([traj.prompt_ids_BP[i], comp_G])[None]
            model.zero_grad()
            logits_NV = model(ids_1L).logits[0, P:][sel_G].float()
            logits_NV[:, list(traj.banned_ids)] = float("-inf")  # e.g. the mask id, which the sampler never draws
            logits_NV = logits_NV.masked_fill(logits_NV < traj.cutoff_BG[i][sel_G][:, None], float("-inf"))
            logp_N = torch.log_softmax(logits_NV / traj.temperature, -1).gather(1, traj.completion_ids_BG[i][sel_G][:, None])
            (-adv_B[i] / B * logp_N.sum()).backward()
            gm_XD[i * T + t] = flat_grad(model)
    model.zero_grad()
    return gm_XD, eligible_BT


def _weights(batch) -> torch.Tensor:
    """[B*T] total weight each (sample, step) gets in one prepared draw."""
    steps_BK, w_BK = batch.extras["steps_BK"], batch.extras["step_weights_BK"]
    T = batch.num_steps
    w_BT = torch.zeros(B, T, dtype=torch.float64)
    w_BT.scatter_add_(1, steps_BK.clamp(min=0), torch.where(steps_BK >= 0, w_BK.double(), 0.0))
    return w_BT.reshape(-1)


def _mc(loss, traj, gm_XD, draws: int):
    W_NX = torch.stack([_weights(loss.prepare(traj, seed=s)) for s in range(draws)])
    gm = gm_XD.double()
    mean_D = W_NX.mean(0) @ gm
    cov_XX = torch.cov(W_NX.T) if draws > 1 else torch.zeros(W_NX.shape[1], W_NX.shape[1], dtype=torch.float64)
    se2_D = ((cov_XX @ gm) * gm).sum(0) / draws  # variance of the mean, per parameter
    return mean_D, se2_D


CONFIGS = [
    AgrpoConfig(k_steps=2, step_sampling="uniform"),
    AgrpoConfig(k_steps=2, step_sampling="stratified"),
    AgrpoConfig(k_steps=2, step_sampling="entropy"),
    AtpoConfig(k_steps=2, selection="sample", score="hybrid"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{getattr(c, 'step_sampling', getattr(c, 'selection', ''))}")
def test_mc_gradient_matches_the_exact_full_sum(setup, cfg):
    model, traj, gm_XD, eligible_BT = setup
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    exact_D = gm_XD.double().sum(0)
    # The real backward computes exactly sum w g for a draw (on-policy: every ratio is 1).
    for seed in (0, 1):
        batch = loss.prepare(traj, seed=seed)
        w_BT = _weights(batch).view(B, -1)
        assert not bool(w_BT[~eligible_BT].any()), "a step that committed only EOS got weight"
        model.zero_grad()
        loss.backward(model, batch, total_samples=B)
        want_D = (_weights(batch) @ gm_XD.double()).float()
        assert torch.allclose(flat_grad(model), want_D, rtol=1e-4, atol=1e-5 * float(want_D.abs().max()))
    model.zero_grad()
    # Many draws: the mean estimate sits within its standard error of the exact gradient.
    mean_D, se2_D = _mc(loss, traj, gm_XD, draws=2000)
    err2 = float(((mean_D - exact_D) ** 2).sum())
    assert err2 <= 9 * float(se2_D.sum())  # E[err2] = sum se2: a 3-sigma bound on the norm
    rel = err2**0.5 / float(exact_D.norm())
    cos = float(torch.nn.functional.cosine_similarity(mean_D, exact_D, dim=0))
    assert rel < 0.1 and cos > 0.995, (rel, cos)  # measured: rel 0.034-0.042, cos > 0.999 at 2000 draws


def test_topk_is_biased_and_the_check_would_see_it(setup):
    """Negative control: ATPO top-k (deterministic) misses the exact gradient by far more than the
    sampled estimators' error, so the check above has the power to catch a bias."""
    model, traj, gm_XD, _ = setup
    loss = build_loss(AtpoConfig(k_steps=2, selection="topk"), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    mean_D, _ = _mc(loss, traj, gm_XD, draws=1)
    exact_D = gm_XD.double().sum(0)
    assert float((mean_D - exact_D).norm()) / float(exact_D.norm()) > 0.2
