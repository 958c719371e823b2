"""Policy-gradient losses: advantages, step selection, ATPO scores, ratio 1 on fresh rollouts, and
split-invariance (1 vs 2 micro-batches, 1 vs 2 ranks).

Letters: B samples, P prompt length, G completion length, T steps, K steps per sample.
"""
import copy

import pytest
import torch

from common.config import AgrpoConfig, AtpoConfig, BgpoConfig, CoupledGrpoConfig, DiffuGrpoConfig, EspoConfig, SpgConfig, Wd1Config
from common.model import build_model, preset_config
from learner.losses import build_loss, select_rows
from learner.losses import steps as S
from learner.losses.advantages import group_advantages
from learner.losses.base import sampler_logprobs
from learner.step_states import state_inputs
from tests.tolerances import fp32_approx

PAD, EOS, MASK = 0, 2, 3


@pytest.fixture(scope="module")
def model():
    return build_model(preset_config("tiny"), seed=0)


def rollout(model, B=8, P=6, G=8, steps=8, block=4, temperature=1.0, seed=0, pad_rows=0, **sampler):
    """Fresh trajectories of the tiny model (rollout.sampler), with group-of-4 rewards."""
    g = torch.Generator().manual_seed(seed)
    prompt_BP = torch.randint(5, 101, (B, P), generator=g)
    mask_BP = torch.ones(B, P, dtype=torch.bool)
    mask_BP[:pad_rows, : P // 2] = False
    prompt_BP = prompt_BP.masked_fill(~mask_BP, PAD)
    from common.config.sampler import SamplerConfig
    from rollout.sampler import generate

    cfg = SamplerConfig(gen_length=G, block_length=block, steps=steps, temperature=temperature, **sampler)
    with torch.no_grad():
        traj = generate(model, prompt_BP, mask_BP, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=seed)
    traj.rewards_B = torch.randn(B, generator=g)
    traj.group_B = torch.arange(B) // 4
    return traj


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


# --- advantages


def test_group_advantages_mean_and_std():
    r_B = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 3.0, 2.0])
    grp_B = torch.tensor([0, 0, 1, 1, 7, 7, 9])  # non-contiguous ids, a singleton group
    a_B = group_advantages(r_B, grp_B, std_normalize=False)
    assert torch.allclose(a_B, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0]))
    a_B = group_advantages(r_B, grp_B, std_normalize=True)
    s = torch.tensor([1.0, 0.0]).std()  # unbiased std of each two-sample group
    assert torch.allclose(a_B[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.allclose(a_B[4:6], torch.tensor([1.0, -1.0]) / (torch.tensor([5.0, 3.0]).std() + 1e-6))
    assert a_B[6] == 0.0
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        group_advantages(r_B, grp_B[:3], std_normalize=False)


# --- step selection


def _eligible(counts):
    T = max(counts) + 2
    return torch.arange(T)[None, :] < torch.tensor(counts)[:, None]


def test_eligible_steps_skip_eos_only_and_filled_steps():
    unmask_BG = torch.tensor([[0, 0, 1, 2, 3, 3]])
    ids_BG = torch.tensor([[9, EOS, EOS, 9, EOS, EOS]])
    assert S.eligible_steps(unmask_BG, ids_BG, 5, EOS).tolist() == [[True, False, True, False, False]]
    assert S.eligible_steps(unmask_BG, ids_BG, 5, None).tolist() == [[True, True, True, True, False]]
    drawn_BG = torch.tensor([[True, True, True, False, True, True]])
    assert S.eligible_steps(unmask_BG, ids_BG, 5, EOS, drawn_BG).tolist() == [[True, False, False, False, False]]
    # AGRPO's release: every step up to the last one with a non-EOS token (EOS-only step 1 included).
    assert S.eligible_steps(unmask_BG, ids_BG, 5, EOS, rule="through_last").tolist() == [[True, True, True, False, False]]
    assert S.eligible_steps(unmask_BG, ids_BG, 5, EOS, drawn_BG, rule="through_last").tolist() == [[True, False, False, False, False]]
    assert S.eligible_steps(unmask_BG, ids_BG, 5, EOS, rule="all").tolist() == [[True, True, True, True, False]]
    only_eos_BG = torch.full_like(ids_BG, EOS)
    assert not S.eligible_steps(unmask_BG, only_eos_BG, 5, EOS, rule="through_last").any()


def test_stratified_draws_cover_every_stratum():
    counts = [10, 4, 3, 0, 7]
    elig_BT = _eligible(counts)
    k = 4
    gen = torch.Generator().manual_seed(0)
    seen = [set() for _ in counts]
    for _ in range(200):
        steps_BK, w_BK = S.stratified_steps(elig_BT, k, gen)
        for i, T_i in enumerate(counts):
            bounds = [(j * T_i // k, (j + 1) * T_i // k) for j in range(k)]
            for j, (lo, hi) in enumerate(bounds):
                if hi == lo:  # empty stratum (T_i < k): padding
                    assert steps_BK[i, j] == -1 and w_BK[i, j] == 0
                else:
                    assert lo <= steps_BK[i, j] < hi and w_BK[i, j] == hi - lo
                    seen[i].add(int(steps_BK[i, j]))
            assert w_BK[i].sum() == T_i  # weights add up to the number of eligible steps
    assert [len(s) for s in seen] == counts  # every step of every stratum gets drawn


@pytest.mark.parametrize("selector", ["uniform", "stratified", "entropy", "proportional"])
def test_selectors_unbiased_for_a_fixed_function(selector):
    """E[sum_k w f(t_k)] = sum_{t eligible} f(t), exactly checked against many draws (no model needed)."""
    counts = [8, 5, 3, 1]
    elig_BT = _eligible(counts)
    B, T = elig_BT.shape
    g = torch.Generator().manual_seed(1)
    f_BT = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.5
    p_BT = torch.rand(B, T, generator=g, dtype=torch.float64) * elig_BT
    gen = torch.Generator().manual_seed(2)
    draws = []
    for _ in range(4000):
        if selector == "uniform":
            st, w = S.uniform_steps(elig_BT, 3, gen)
        elif selector == "stratified":
            st, w = S.stratified_steps(elig_BT, 3, gen)
        elif selector == "entropy":
            ent_BG = torch.rand(B, T, generator=g).clamp(min=0.05)
            st, w = S.proportional_steps(S.entropy_step_probs(ent_BG, torch.arange(T).expand(B, T), elig_BT), 3, gen)
        else:
            st, w = S.proportional_steps(p_BT, 3, gen)
        draws.append((w.double() * f_BT.gather(1, st.clamp(min=0))).sum(1))
    est_NB = torch.stack(draws)
    exact_B = (f_BT * elig_BT).sum(1)
    se_B = est_NB.std(0) / len(draws) ** 0.5
    assert ((est_NB.mean(0) - exact_B).abs() <= 4 * se_B + 1e-6).all()  # weights are float32


def test_topk_takes_the_best_steps_and_all_when_few():
    elig_BT = _eligible([5, 2])
    scores_BT = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0, 0], [0.5, 0.1, 0, 0, 0, 0, 0]])
    steps_BK, w_BK = S.topk_steps(scores_BT, elig_BT, 3)
    assert steps_BK.tolist() == [[1, 3, 2], [0, 1, -1]]
    assert torch.allclose(w_BK, torch.tensor([[5 / 3] * 3, [1.0, 1.0, 0.0]]))


# --- ATPO scores


def test_atpo_scores_on_a_hand_made_profile():
    # One block of 4 steps then one of 2; trajectory 1 has 5 eligible steps.
    H_BT = torch.tensor([[1.0, 1.0, 3.0, 2.0, 5.0, 4.0], [2.0, 2.0, 2.0, 2.0, 2.0, 0.0]])
    M_BT = torch.tensor([[0.9, 0.5, 0.1, 0.5, 0.8, 0.7], [0.6, 0.6, 0.2, 0.6, 0.6, 0.0]])
    block_BT = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, -1]])
    elig_BT = torch.tensor([[True] * 6, [True] * 5 + [False]])
    comp = S.atpo_components(H_BT, M_BT, block_BT)
    assert comp["roec"][0].tolist() == [0.0, 0.0, 2.0, 1.0, 0.0, 1.0]  # 0 at each block's first step
    assert torch.allclose(comp["cm"][0], torch.tensor([0.1, 0.5, 0.9, 0.5, 0.2, 0.3], dtype=torch.float64))
    own = S.atpo_step_scores(H_BT, M_BT, block_BT, elig_BT, score="hybrid", hybrid_weight=0.5, batch_mix=0.0)
    # Row 0: norm(RoEC) = roec / 2; norm(CM) = (cm - 0.1) / 0.8.
    want0 = 0.5 * torch.tensor([0, 0, 1, 0.5, 0, 0.5]) + 0.5 * (torch.tensor([0.1, 0.5, 0.9, 0.5, 0.2, 0.3]) - 0.1) / 0.8
    assert torch.allclose(own[0], want0.double())
    # Row 1: flat entropy -> RoEC normalises to 0; CM peaks at step 2; the ineligible step scores 0.
    assert torch.allclose(own[1], torch.tensor([0, 0, 0.5, 0, 0, 0], dtype=torch.float64))
    mixed = S.atpo_step_scores(H_BT, M_BT, block_BT, elig_BT, score="hybrid", hybrid_weight=0.5, batch_mix=0.5)
    profile_T = (own[0] + own[1]) / 2
    profile_T[5] = own[0, 5]  # only row 0 is eligible at step 5
    assert torch.allclose(mixed[0], 0.5 * own[0] + 0.5 * profile_T)
    assert mixed[1, 5] == 0
    ent = S.atpo_step_scores(H_BT, M_BT, block_BT, elig_BT, score="entropy", hybrid_weight=0.5, batch_mix=0.0)
    assert torch.allclose(ent[0], (H_BT[0].double() - 1) / 4)
    q_BT = S.score_sampling_probs(own, elig_BT, floor=0.1)
    assert torch.allclose(q_BT.sum(1), torch.ones(2, dtype=torch.float64))
    assert (q_BT[elig_BT] >= 0.1 / 6 - 1e-12).all() and q_BT[1, 5] == 0


# --- the learner's log-probs equal the sampler's (ratio 1)


@pytest.mark.parametrize(
    "sampler",
    [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=7, top_p=0.9, remasking="random", pad_rows=3),
        dict(temperature=0.7, logits_eos_inf=True, position_ids="packed", pad_rows=2, steps=4),
        dict(temperature=1.0, threshold=0.05, stop_on_eos_block=True),
        dict(temperature=0.8, top_k=5, remasking="margin", confidence_eos_eot_inf=True, pad_rows=1),
        dict(temperature=1.0, top_p=0.8, threshold=0.02, remasking="low_confidence"),
    ],
)
def test_fresh_rollout_has_ratio_one(model, sampler):
    """Every draw the sampler made, committed or discarded, rescored by the learner, at its recorded
    log-prob (support cut-offs included)."""
    from learner.losses.actions import step_rows

    traj = rollout(model, **sampler)
    P = traj.prompt_ids_BP.shape[1]
    worst, discarded = 0.0, 0
    for t in range(traj.num_steps):
        step_B = torch.full((len(traj),), t)
        ids_BL, attn_BL, pos_BL = state_inputs(traj, step_B, MASK, "cpu")
        rows = step_rows(traj, step_B, torch.ones(len(traj), dtype=torch.bool), discarded=True, device="cpu")
        with torch.no_grad():
            h_ND = model.hidden_states(ids_BL, attn_BL, pos_BL)[rows.b_N, P + rows.g_N]
            logp_N = sampler_logprobs(model.vocab_logits(h_ND), rows.token_N, temperature=traj.temperature,
                                      cutoff_N=rows.cutoff_N, banned_ids=traj.banned_ids)
        worst = max([worst] + (logp_N - rows.old_logp_N).abs().tolist())
        discarded += int((~rows.committed_N).sum())
    assert worst < 1e-4
    assert discarded > 0 or sampler.get("temperature") == 0.0
    # The loss itself sees the same, with (all) and without (committed) the discarded draws.
    for draws in ("all", "committed", "auto"):
        loss = build_loss(AgrpoConfig(k_steps=3, draws=draws), mask_id=MASK, pad_id=PAD, eos_id=EOS)
        m = loss.backward(model, loss.prepare(traj, seed=0), total_samples=len(traj))
        model.zero_grad()
        assert m["tokens"] > 0 and m["clipped_tokens"] == 0 and m["abs_log_ratio_sum"] < 1e-4 * m["tokens"]
        assert (m["discarded_tokens"] > 0) == (draws == "all" or (draws == "auto" and traj.commit_reads_draws)) or discarded == 0


def test_auto_scores_discarded_draws_exactly_where_the_commit_rule_reads_them(model):
    reads = {}
    for sampler in (dict(remasking="random"), dict(remasking="margin"), dict(remasking="entropy"),
                    dict(remasking="low_confidence"), dict(remasking="margin", threshold=0.5),
                    dict(remasking="random", confidence_eos_eot_inf=True)):
        reads[str(sampler)] = rollout(model, B=2, **sampler).commit_reads_draws
    assert list(reads.values()) == [False, False, False, True, True, True], reads
    traj = rollout(model, B=2)
    traj.discard_ids_BGS = None  # a batch from before the draws were recorded
    loss = build_loss(AgrpoConfig(), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    with pytest.raises(ValueError, match="draws=committed"):
        loss.backward(model, loss.prepare(traj, seed=0), total_samples=2)


# --- split invariance


def _perturbed(model, scale=0.05, seed=3):
    """A copy of the policy moved away from the behaviour policy, so ratios differ from 1 and some clip."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return m


def _grads_for_split(loss, policy, batch, splits, ref):
    policy.zero_grad()
    total = {}
    for idx in splits:
        m = loss.backward(policy, select_rows(batch, idx), total_samples=len(batch), ref_model=ref)
        total = {k: total.get(k, 0.0) + v for k, v in m.items()}
    return flat_grad(policy).clone(), total


@pytest.mark.parametrize(
    "cfg",
    [
        AgrpoConfig(k_steps=3, step_sampling="stratified", beta_kl=0.05, clip_eps=0.1),
        AgrpoConfig(k_steps=2, step_sampling="entropy", std_normalize=True),
        AtpoConfig(k_steps=3, selection="sample", clip_eps_high=0.3),
        AtpoConfig(k_steps=2, selection="topk", score="roec"),
        AgrpoConfig(k_steps=2, normalize="sum", eligible_steps="non_eos", draws="committed", beta_kl=0.05, kl="k3"),
        DiffuGrpoConfig(beta_kl=0.04, prompt_mask_prob=0.3),
        DiffuGrpoConfig(normalize="sample_mean", kl="k3_ratio", beta_kl=0.04),
    ],
    ids=lambda c: c.name,
)
def test_loss_and_gradient_do_not_depend_on_the_split(model, cfg):
    traj = rollout(model, B=6, G=8, steps=8, block=4)
    traj.group_B = torch.tensor([0, 0, 0, 1, 1, 1])
    policy, ref = _perturbed(model), model
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=11)
    again = loss.prepare(traj, seed=11)
    for key, v in batch.extras.items():  # prepare is deterministic in its seed
        if isinstance(v, torch.Tensor) and key != "row_id_B":
            assert torch.equal(v, again.extras[key]), key
    if cfg.name == "diffu_grpo":  # d1's "old" log-probs come from the behaviour policy's first pass
        loss.backward(model, batch, total_samples=len(batch), ref_model=ref)
        model.zero_grad()
    g1, m1 = _grads_for_split(loss, policy, batch, [torch.arange(6)], ref)
    g2, m2 = _grads_for_split(loss, policy, batch, [torch.tensor([4]), torch.tensor([0, 5, 2, 1, 3])], ref)
    assert g1.abs().max() > 0 and m1["ratio_sum"] != m1["tokens"]  # off-policy: a real test of the ratios
    # fp32 forwards of different batch shapes round differently (~1e-7), so not bitwise; 1e-6 relative.
    assert torch.allclose(g2, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6, abs=1e-5)
    assert m2["tokens"] == m1["tokens"] and m2["clipped_tokens"] == m1["clipped_tokens"]
    # Two "ranks" (two replicas, each with half the rows) sum to the same gradient.
    replica = copy.deepcopy(policy)
    ga, _ = _grads_for_split(loss, policy, batch, [torch.arange(3)], ref)
    gb, _ = _grads_for_split(loss, replica, batch, [torch.arange(3, 6)], ref)
    assert torch.allclose(ga + gb, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))


FAMILY_ROLLOUTS = {  # each family decoded its own way (tests/test_families.py has their parity)
    "tiny-dream": dict(block=8, transfer="timestep", position_ids="packed", remasking="low_confidence"),
    "tiny-sdar": dict(block=4, block_grid="sequence", position_ids="packed", remasking="entropy"),
}


@pytest.mark.parametrize("preset", list(FAMILY_ROLLOUTS))
@pytest.mark.parametrize("cfg", [AgrpoConfig(k_steps=3, beta_kl=0.05), AtpoConfig(k_steps=2, selection="sample"),
                                 DiffuGrpoConfig(beta_kl=0.04), Wd1Config(), CoupledGrpoConfig(),
                                 SpgConfig(masking="random"), EspoConfig(), BgpoConfig(num_mc=2, strata=2)],
                         ids=lambda c: c.name)
def test_every_estimator_runs_on_every_family_and_ignores_the_split(preset, cfg):
    family_model = build_model(preset_config(preset), seed=0)
    traj = rollout(family_model, B=6, G=8, steps=8, pad_rows=2, **FAMILY_ROLLOUTS[preset])
    traj.group_B = torch.tensor([0, 0, 0, 1, 1, 1])
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=5)
    if cfg.name not in ("agrpo", "atpo"):  # the one-pass losses take their "old" values at the first visit
        loss.backward(family_model, batch, total_samples=len(batch), ref_model=family_model)
        family_model.zero_grad()
    policy = _perturbed(family_model)
    g1, m1 = _grads_for_split(loss, policy, batch, [torch.arange(6)], family_model)
    g2, m2 = _grads_for_split(loss, policy, batch, [torch.tensor([4, 1]), torch.tensor([0, 5, 2, 3])], family_model)
    assert g1.abs().max() > 0 and torch.isfinite(g1).all()
    assert torch.allclose(g2, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))
    assert m2["tokens"] == m1["tokens"] and m2["loss"] == pytest.approx(m1["loss"], rel=1e-6, abs=1e-5)
    if cfg.name in ("agrpo", "atpo"):  # the behaviour policy rescored: ratio 1 on the fresh rollouts
        m0 = loss.backward(family_model, batch, total_samples=len(batch), ref_model=family_model)
        assert m0["abs_log_ratio_sum"] < 1e-5 * m0["tokens"]


@pytest.mark.parametrize(
    "cfg",
    [
        Wd1Config(prompt_mask_prob=0.3, inner_epochs=2),
        Wd1Config(negative=False, std_normalize=True),
        CoupledGrpoConfig(clip_eps=0.1, beta_kl=0.05),
        CoupledGrpoConfig(baseline="mean", std_normalize=True, mask_per_epoch=False, inner_epochs=3),
        SpgConfig(inner_epochs=2),
        SpgConfig(negative_bound="eubo", masking="random", num_t=3, min_t=0.2, max_t=0.9),
        SpgConfig(negative_bound="elbo", masking="block_all", block_length=2),
        EspoConfig(clip_eps=0.05, beta_kl=0.05),
        EspoConfig(num_mc=2, coupled=False, baseline="mean", inner_epochs=1),
        BgpoConfig(num_mc=4, strata=2, clip_eps=0.05, dual_clip=1.02),
        BgpoConfig(num_mc=2, strata=1, normalize="sample_mean", mask_per_epoch=True, inner_epochs=2),
    ],
    ids=lambda c: c.name,
)
def test_surrogate_loss_and_gradient_do_not_depend_on_the_split(model, cfg):
    """The field's sequence-likelihood surrogates: masks drawn in prepare for the whole batch, token means over
    the whole batch, old values cached per row at the first visit; any split gives the same loss and gradient."""
    traj = rollout(model, B=6, G=8, steps=8, block=4)
    traj.group_B = torch.tensor([0, 0, 0, 1, 1, 1])
    policy, ref = _perturbed(model), model
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=11, epoch=cfg.inner_epochs - 1)
    again = loss.prepare(traj, seed=11, epoch=cfg.inner_epochs - 1)
    for key, v in batch.extras.items():  # prepare is deterministic in its seed
        if isinstance(v, torch.Tensor) and key != "row_id_B":
            assert torch.equal(v, again.extras[key]), key
    loss.backward(model, batch, total_samples=len(batch), ref_model=ref)  # first visit: old values, if any
    model.zero_grad()
    g1, m1 = _grads_for_split(loss, policy, batch, [torch.arange(6)], ref)
    g2, m2 = _grads_for_split(loss, policy, batch, [torch.tensor([4]), torch.tensor([0, 5, 2, 1, 3])], ref)
    assert g1.abs().max() > 0
    assert torch.allclose(g2, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6, abs=1e-5)
    assert m2["tokens"] == m1["tokens"]
    replica = copy.deepcopy(policy)
    ga, _ = _grads_for_split(loss, policy, batch, [torch.arange(3)], ref)
    gb, _ = _grads_for_split(loss, replica, batch, [torch.arange(3, 6)], ref)
    assert torch.allclose(ga + gb, g1, rtol=1e-6, atol=1e-6 * float(g1.abs().max()))


# --- per-algorithm details


def test_diffu_grpo_ratio_one_then_cached_old_logp(model):
    traj = rollout(model, B=4, G=8, steps=8, block=4)
    loss = build_loss(DiffuGrpoConfig(prompt_mask_prob=0.5), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=0)
    assert batch.extras["prompt_masked_BP"].any() and not batch.extras["prompt_masked_BP"].all()
    policy = copy.deepcopy(model)
    m = loss.backward(policy, batch, total_samples=4)
    assert m["abs_log_ratio_sum"] == 0.0  # first visit: old = current
    with torch.no_grad():
        next(policy.parameters()).mul_(1.5)  # "an optimizer step"
    m = loss.backward(policy, batch, total_samples=4)
    assert m["abs_log_ratio_sum"] > 0  # later epochs compare with the cached first-visit log-probs
    m = loss.backward(policy, loss.prepare(traj, seed=0), total_samples=4)
    assert m["abs_log_ratio_sum"] == 0.0  # a new prepared batch starts a new cache


def test_errors_say_what_to_fix(model):
    traj = rollout(model, B=4)
    loss = build_loss(AgrpoConfig(beta_kl=0.1), mask_id=MASK, pad_id=PAD)
    batch = loss.prepare(traj, seed=0)
    with pytest.raises(ValueError, match="ref_model"):
        loss.backward(model, batch, total_samples=4)
    loss = build_loss(AgrpoConfig(), mask_id=MASK, pad_id=PAD)
    batch = loss.prepare(traj, seed=0)
    micro = batch.select(slice(0, 2))
    micro.extras = dict(batch.extras)  # what a select that does not slice extras would hand over
    with pytest.raises(ValueError, match="select_rows"):
        loss.backward(model, micro, total_samples=4)
    traj.rewards_B = None
    with pytest.raises(ValueError, match="rewards_B"):
        loss.prepare(traj, seed=0)
    with pytest.raises(ValueError, match="score_floor"):
        AtpoConfig(selection="sample", score_floor=0.0)



def test_step_blocks_ignore_the_filled_tail():
    unmask_BG = torch.tensor([[0, 1, 1, 1]])  # block length 2: step 1 drew position 1, then "filled" 2 and 3
    blk_BG = torch.tensor([[0, 0, 1, 1]])
    assert S.step_blocks(unmask_BG, blk_BG, 3).tolist() == [[0, 1, -1]]
    drawn_BG = torch.tensor([[True, True, False, False]])
    assert S.step_blocks(unmask_BG, blk_BG, 3, drawn_BG).tolist() == [[0, 0, -1]]


# --- inner epochs, normalisation, KL


def test_inner_epochs_draw_fresh_steps_and_keep_the_behaviour_log_probs(model):
    traj = rollout(model, B=4)
    loss = build_loss(AgrpoConfig(k_steps=2, inner_epochs=3), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    assert loss.inner_epochs == 3
    e0, e0_again, e1 = loss.prepare(traj, seed=5), loss.prepare(traj, seed=5, epoch=0), loss.prepare(traj, seed=5, epoch=1)
    assert torch.equal(e0.extras["steps_BK"], e0_again.extras["steps_BK"])
    assert not torch.equal(e0.extras["steps_BK"], e1.extras["steps_BK"])
    assert torch.equal(e0.extras["advantages_B"], e1.extras["advantages_B"])
    # Old log-probs are the sampler's at every epoch: the unchanged policy has ratio 1 in epoch 1 too.
    m = loss.backward(model, e1, total_samples=4)
    model.zero_grad()
    assert m["abs_log_ratio_sum"] < 1e-4 * m["tokens"]


def test_diffu_grpo_epochs_mask_the_prompt_anew_with_first_visit_old_log_probs(model):
    traj = rollout(model, B=4)
    loss = build_loss(DiffuGrpoConfig(prompt_mask_prob=0.5, inner_epochs=3), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batches = [loss.prepare(traj, seed=1, epoch=e) for e in range(3)]
    masks = batches[0].extras["prompt_masked_BEP"]
    assert masks.shape[1] == 3 and not torch.equal(masks[:, 0], masks[:, 1])
    assert all(torch.equal(b.extras["prompt_masked_BP"], masks[:, e]) for e, b in enumerate(batches))
    policy = copy.deepcopy(model)
    assert loss.backward(policy, batches[0], total_samples=4)["abs_log_ratio_sum"] == 0.0
    # Epoch 1 before any update: its old log-probs were taken under epoch 1's mask at the first visit.
    assert loss.backward(policy, batches[1], total_samples=4)["abs_log_ratio_sum"] < 1e-5
    with torch.no_grad():
        next(policy.parameters()).mul_(1.5)
    assert loss.backward(policy, batches[2], total_samples=4)["abs_log_ratio_sum"] > 1e-3


def test_normalisations_follow_the_references(model):
    traj = rollout(model, B=4)
    traj.rewards_B = torch.tensor([1.0, 0.0, 0.0, 0.0])
    traj.group_B = torch.zeros(4, dtype=torch.long)  # advantages 0.75, -0.25, -0.25, -0.25
    # diffu-GRPO token mean (d1): at ratio 1 the loss is -sum_i A_i n_i / sum_i n_i.
    loss = build_loss(DiffuGrpoConfig(), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=0)
    n_B = batch.extras["completion_mask_BG"].sum(1).double()
    m = loss.backward(copy.deepcopy(model), batch, total_samples=4)
    adv_B = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    assert m["loss"] == fp32_approx(float(-(adv_B * n_B).sum() / n_B.sum()))
    # AGRPO step_mean: the weights of a trajectory sum to 1 (the mean over its steps); sum: to T_i.
    mean = build_loss(AgrpoConfig(k_steps=3), mask_id=MASK, pad_id=PAD, eos_id=EOS).prepare(traj, seed=0)
    summed = build_loss(AgrpoConfig(k_steps=3, normalize="sum"), mask_id=MASK, pad_id=PAD, eos_id=EOS).prepare(traj, seed=0)
    T_B = summed.extras["eligible_steps_B"].float()
    assert torch.allclose(mean.extras["step_weights_BK"].sum(1), torch.ones(4))
    assert torch.allclose(summed.extras["step_weights_BK"].sum(1), T_B)


def test_kl_k3_ratio_is_the_release_gradient(model):
    """k3 x ratio and k3 agree in value at ratio 1; their gradients differ (KL(pi||ref) vs KL(ref||pi))."""
    traj = rollout(model, B=4)
    traj.rewards_B = torch.zeros(4)  # no policy term: the gradient is the KL's alone
    ref = _perturbed(model, scale=0.2)
    grads, kls = {}, {}
    for kl in ("k3_ratio", "k3"):
        loss = build_loss(AgrpoConfig(k_steps=2, beta_kl=1.0, kl=kl), mask_id=MASK, pad_id=PAD, eos_id=EOS)
        policy = copy.deepcopy(model)
        m = loss.backward(policy, loss.prepare(traj, seed=0), total_samples=4, ref_model=ref)
        grads[kl], kls[kl] = flat_grad(policy), m["kl_sum"]
    assert kls["k3_ratio"] == pytest.approx(kls["k3"], rel=1e-4)
    assert not torch.allclose(grads["k3_ratio"], grads["k3"], rtol=1e-2)
