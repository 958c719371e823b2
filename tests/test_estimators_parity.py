"""The field's estimators against their public code: each fixture under tests/fixtures/estimators/<name>/ was
made by its make_fixture.py, which runs the public loss code (fetched, never committed) on our tiny model with
fixed inputs and records the masks it drew, its loss and its gradient. Here the same inputs and masks go
through our loss; loss and gradient must agree to float precision (fp32; the public code's reductions differ
in order, so 1e-5 relative, not bitwise).

Letters: B samples, P prompt length, G completion length, E inner epochs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import BgpoConfig, CoupledGrpoConfig, EspoConfig, JustGrpoConfig, SpgConfig, TraceRLConfig, Wd1Config
from common.trajectory import Trajectory
from learner.losses import build_loss
from tests.fixtures.estimators import public_harness as H

FIXTURES = Path(__file__).parent / "fixtures" / "estimators"
RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return H.tiny_model()


def load_fixture(name: str, model) -> dict:
    rec = H.load(FIXTURES / name / "fixture.json")
    assert rec["model_checksum"] == pytest.approx(H.model_checksum(model), rel=1e-12), (
        f"the tiny model built from seed {rec['model_seed']} is not the one {name}'s fixture was made with: "
        f"rerun tests/fixtures/estimators/{name}/make_fixture.py"
    )
    return rec


def fixture_batch(rec: dict, block_length: int = 4) -> Trajectory:
    """The fixture's inputs as a Trajectory (the step records are unused by these losses)."""
    prompt_BP = torch.tensor(rec["prompt_ids"])
    comp_BG = torch.tensor(rec["completion_ids"])
    B, G = comp_BG.shape
    zeros_BG = torch.zeros(B, G)
    return Trajectory(
        prompt_ids_BP=prompt_BP, prompt_mask_BP=torch.ones_like(prompt_BP, dtype=torch.bool), completion_ids_BG=comp_BG,
        unmask_step_BG=torch.zeros(B, G, dtype=torch.long), logp_BG=zeros_BG, entropy_BG=zeros_BG, margin_BG=zeros_BG,
        cutoff_BG=torch.full((B, G), float("-inf")), step_entropy_BT=torch.zeros(B, 1), step_margin_BT=torch.zeros(B, 1),
        step_committed_BT=torch.zeros(B, 1, dtype=torch.long), temperature=1.0, block_length=block_length,
        rewards_B=torch.tensor(rec["rewards"]), group_B=torch.tensor(rec["groups"]),
    )


def assert_matches(ours: dict, public: dict, model, what: str, loss_scale: float = 0.0):
    """Loss and gradient summary (norm, 8 random projections, three slices) within RTOL of the public ones.
    ``loss_scale``: the size of the terms the loss sums when they cancel (advantages of both signs), which
    is what fp32 rounding is relative to."""
    got = H.grad_summary(model)
    scale = public["grad"]["norm"]
    assert ours["loss"] == pytest.approx(public["loss"], rel=RTOL, abs=max(1e-7, RTOL * loss_scale)), what
    assert got["norm"] == pytest.approx(scale, rel=RTOL), what
    assert torch.allclose(torch.tensor(got["proj"]), torch.tensor(public["grad"]["proj"]), rtol=RTOL, atol=RTOL * scale), what
    for name, values in public["grad"]["slices"].items():
        assert torch.allclose(torch.tensor(got["slices"][name]), torch.tensor(values), rtol=RTOL, atol=RTOL * scale), (what, name)


def max_diffs(ours: dict, public: dict, model) -> tuple[float, float]:
    """(relative loss difference, max relative projection difference): what the report quotes."""
    got = H.grad_summary(model)
    dl = abs(ours["loss"] - public["loss"]) / max(abs(public["loss"]), 1e-12)
    dg = max(abs(a - b) / public["grad"]["norm"] for a, b in zip(got["proj"], public["grad"]["proj"]))
    return dl, dg


# --- wd1


@pytest.mark.parametrize("negative", [True, False])
@pytest.mark.parametrize("epoch", [0, 1])
def test_wd1_matches_public_code(tiny, negative, epoch):
    rec = load_fixture("wd1", tiny)
    public = rec["runs"][f"{'negative' if negative else 'positive_only'}_epoch{epoch}"]
    cfg = Wd1Config(negative=negative, prompt_mask_prob=rec["p_mask_prompt"], inner_epochs=2)
    loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(fixture_batch(rec), seed=0, epoch=epoch)
    batch.extras["prompt_masked_BP"] = torch.tensor(public["prompt_masked_BP"], dtype=torch.bool)
    tiny.zero_grad()
    m = loss.backward(tiny, batch, total_samples=len(batch))
    assert_matches(m, public, tiny, f"wd1 negative={negative} epoch={epoch}")
    tiny.zero_grad()


# --- coupled-GRPO


@pytest.mark.parametrize("setting", ["recipe", "tight_clip"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_coupled_grpo_matches_public_code(tiny, setting, epoch):
    rec = load_fixture("coupled_grpo", tiny)
    s = rec["settings"][setting]
    policy = H.perturbed(tiny, seed=rec["policy_noise_seed"])
    cfg = CoupledGrpoConfig(clip_eps=s["epsilon"], beta_kl=s["beta"], inner_epochs=2)
    loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(fixture_batch(rec), seed=0, epoch=epoch)
    assert torch.allclose(batch.extras["advantages_B"], torch.tensor(rec["advantages"]))
    # the public draws, for every epoch (the old values of all epochs are taken at the first visit)
    runs = [rec["runs"][f"{setting}_epoch{e}"] for e in range(2)]
    t_E = torch.tensor([r["mask_ratio"] for r in runs], dtype=torch.float64)
    masks_BEG = torch.stack([torch.tensor(r["completion_masked_BG"]) for r in runs], 1).bool()
    batch.extras["mask_ratio_BE"] = t_E.expand(len(batch), 2).contiguous()
    batch.extras["completion_masked_BEG"] = masks_BEG
    batch.extras["mask_ratio_B"] = batch.extras["mask_ratio_BE"][:, epoch].contiguous()
    batch.extras["completion_masked_BG"] = masks_BEG[:, epoch].contiguous()
    loss.backward(tiny, batch, total_samples=len(batch), ref_model=tiny)  # first visit, rollout policy: old values
    tiny.zero_grad()
    m = loss.backward(policy, batch, total_samples=len(batch), ref_model=tiny)
    assert m["abs_log_ratio_sum"] > 0 and m["kl_sum"] > 0  # a real test of ratios and KL
    assert (m["clipped_tokens"] > 0) == (setting == "tight_clip")
    # the tight clip leaves a loss of ~1e-4 from terms of ~|A|: fp32 rounding is relative to those
    scale = float(batch.extras["advantages_B"].abs().mean())
    assert_matches(m, runs[epoch], policy, f"coupled_grpo {setting} epoch={epoch}", loss_scale=scale)


# --- SPG

SPG_RUNS = ["block_random_mix", "block_random_eubo", "block_random_elbo", "block_random_zero", "block_all_mix",
            "random_mix", "all_mix"]


def spg_config(rec: dict, run: str) -> SpgConfig:
    knobs = rec["runs"][run]["knobs"]
    return SpgConfig(
        masking=knobs["forward_type"], negative_bound=knobs["logp_estimation"], num_t=knobs["num_t"],
        min_t=knobs["min_t"], max_t=knobs["max_t"], eubo_beta=rec["common"]["eubo_beta"],
        mix_weight=rec["common"]["mix_weight"], prompt_mask_prob=rec["common"]["p_mask_prompt"], inner_epochs=2)


@pytest.mark.parametrize("run", SPG_RUNS)
def test_spg_matches_public_code(tiny, run):
    rec = load_fixture("spg", tiny)
    public = rec["runs"][run]
    loss = build_loss(spg_config(rec, run), mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(fixture_batch(rec, block_length=rec["block_length"]), seed=0, epoch=1)
    assert batch.extras["spg_masked_BNL"].shape == torch.tensor(public["masked_BNL"]).shape
    batch.extras["spg_masked_BNL"] = torch.tensor(public["masked_BNL"], dtype=torch.bool)
    # the loss sums -A_i n_i est_i with A of both signs (est ~ -log V): it cancels to ~1e-3 of its terms,
    # and p^beta (exp of the log-prob here, softmax there) rounds differently; the terms' size sets the tolerance
    batch.extras["advantages_B"] = batch.extras["advantages_B"].abs()
    scale = abs(loss.backward(tiny, batch, total_samples=len(batch))["loss"])
    batch.extras["advantages_B"] = loss.prepare(fixture_batch(rec), seed=0, epoch=1).extras["advantages_B"]
    tiny.zero_grad()
    m = loss.backward(tiny, batch, total_samples=len(batch))
    assert_matches(m, public, tiny, f"spg {run}", loss_scale=scale)
    tiny.zero_grad()


@pytest.mark.parametrize("masking", ["block_random", "block_all", "random", "all"])
def test_spg_masks_are_distributed_like_the_public_ones(tiny, masking):
    """Our mask draws (a generator of our own) against the public forward_process's: per (sample, position)
    masking frequency over 4000 draws each, within 5 standard errors of the difference."""
    rec = load_fixture("spg", tiny)
    run = {"block_random": "block_random_mix", "block_all": "block_all_mix", "random": "random_mix", "all": "all_mix"}[masking]
    loss = build_loss(spg_config(rec, run), mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = fixture_batch(rec, block_length=rec["block_length"])
    cmask_BG = loss.prepare(batch, seed=0).extras["completion_mask_BG"]
    n = rec["mask_frequency"]["seeds"]
    gen = torch.Generator().manual_seed(0)
    freq = sum(loss._draw_masks(batch, cmask_BG, rec["block_length"], gen).double().mean(1) for _ in range(n)) / n
    public = torch.tensor(rec["mask_frequency"][masking], dtype=torch.float64)
    num_t = loss.cfg.num_t
    se = ((freq * (1 - freq) + public * (1 - public)) / (n * num_t)).sqrt()
    assert ((freq - public).abs() <= 5 * se + 1e-12).all(), (freq - public).abs().max()


# --- ESPO


@pytest.mark.parametrize("setting", ["train_yaml", "countdown"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_espo_matches_public_code(tiny, setting, epoch):
    rec = load_fixture("espo", tiny)
    s = rec["settings"][setting]
    policy = H.perturbed(tiny, seed=rec["policy_noise_seed"])
    cfg = EspoConfig(clip_eps=s["epsilon"], beta_kl=s["beta"], num_mc=s["num_mc"], inner_epochs=2)
    loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(fixture_batch(rec), seed=0, epoch=epoch)
    assert torch.allclose(batch.extras["advantages_B"], torch.tensor(rec["advantages"]))
    masks = rec["runs"][f"{setting}_masks"]
    assert batch.extras["espo_masked_BEMG"].shape == torch.tensor(masks["masked_BEMG"]).shape
    batch.extras["espo_masked_BEMG"] = torch.tensor(masks["masked_BEMG"], dtype=torch.bool)
    batch.extras["espo_ratio_BEM"] = torch.tensor(masks["ratio_BEM"])
    loss.backward(tiny, batch, total_samples=len(batch), ref_model=tiny)  # first visit, rollout policy: old ELBOs
    tiny.zero_grad()
    m = loss.backward(policy, batch, total_samples=len(batch), ref_model=tiny)
    assert m["abs_log_ratio_sum"] > 0 and m["kl_sum"] > 0
    # the loss is the mean of rho_i A_i with A of both signs (it cancels to ~1e-3 of its terms), and rho_i reads
    # ELBOs of ~ -80 summed in another order: fp32 rounding is relative to the terms, mean |A_i|
    scale = float(batch.extras["advantages_B"].abs().mean())
    assert_matches(m, rec["runs"][f"{setting}_epoch{epoch}"], policy, f"espo {setting} epoch={epoch}", loss_scale=scale)


def test_espo_masks_are_distributed_like_the_public_ones(tiny):
    """Stratified mask counts and uniform positions: per (sample, position) masking frequency over 4000 draws of
    ours and of the public forward_process, within 5 standard errors (the batch is one stratification unit in both)."""
    rec = load_fixture("espo", tiny)
    n = rec["mask_frequency"]["seeds"]
    loss = build_loss(EspoConfig(inner_epochs=n, num_mc=1), mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    masks_BEMG = loss.prepare(fixture_batch(rec), seed=0).extras["espo_masked_BEMG"]
    freq = masks_BEMG.double().mean((1, 2))
    public = torch.tensor(rec["mask_frequency"]["frequency_BG"], dtype=torch.float64)
    se = ((freq * (1 - freq) + public * (1 - public)) / n).sqrt()
    assert ((freq - public).abs() <= 5 * se + 1e-12).all(), (freq - public).abs().max()
    # stratification: the batch's total masked count barely varies (independent counts would give ~6 x 24)
    totals = masks_BEMG.double().sum((0, 3)).reshape(-1)
    assert float(totals.mean()) == pytest.approx(rec["mask_frequency"]["total_mean"], rel=0.02)
    assert float(totals.var()) == pytest.approx(rec["mask_frequency"]["total_var"], rel=0.15)


# --- BGPO


def bgpo_against_public(model, rec: dict, setting: str):
    """Our BGPO on a fixture setting's inputs and public masks: old ELBOs of every mask from the rollout policy
    (``model``), then one backward per mask under the updated policy. Returns (metrics, prepared batch, policy)."""
    s, run = rec["settings"][setting], rec["runs"][setting]
    policy = H.perturbed(model, seed=s["noise_seed"], scale=s["noise"])
    cfg = BgpoConfig(num_mc=s["mc_num"], strata=s["n_l"], clip_eps=s["clip"], dual_clip=s["clip_c"])
    loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(fixture_batch(rec), seed=0)
    masked_BEMG = torch.tensor(run["masked_BMG"], dtype=torch.bool)[:, None]
    assert batch.extras["bgpo_masked_BEMG"].shape == masked_BEMG.shape
    batch.extras["bgpo_masked_BEMG"] = masked_BEMG
    batch.extras["bgpo_ratio_BEM"] = torch.tensor(run["ratio_BM"])[:, None]
    loss.backward(model, batch, total_samples=len(batch))  # first visit, rollout policy: old ELBOs
    model.zero_grad()
    return loss.backward(policy, batch, total_samples=len(batch)), batch, policy


@pytest.mark.parametrize("setting", ["recipe", "strata_tight_clip"])
def test_bgpo_matches_public_code(tiny, setting):
    """DARE's actor and loss against ours on its masks (the tail after the first EOS out of attention on both
    sides); tests/fixtures/estimators/bgpo/diffs.py prints how close."""
    rec = load_fixture("bgpo", tiny)
    run = rec["runs"][setting]
    m, batch, policy = bgpo_against_public(tiny, rec, setting)
    assert torch.allclose(batch.extras["advantages_B"], torch.tensor(rec["advantages"]))
    assert m["abs_log_ratio_sum"] > 0
    # the public clip fractions are token-weighted means, ours counts (sample, mask) terms: both zero or both not
    assert (m["clipped_tokens"] > 0) == (run["pg_clipfrac"] > 0)
    assert (m["dual_clipped"] > 0) == (run["pg_clipfrac_lower"] > 0) == (setting == "strata_tight_clip")
    scale = float(batch.extras["advantages_B"].abs().mean())
    assert_matches(m, run, policy, f"bgpo {setting}", loss_scale=scale)


def test_bgpo_masks_are_distributed_like_the_public_ones(tiny):
    """Stratified counts over [1, n] (n = tokens up to the first EOS) and uniform positions among those n: per
    (sample, position) masking frequency within 5 standard errors of the public draws', and each sample's total
    count over its 16 masks with the public mean and variance (0 where n divides into the 16 strata)."""
    rec = load_fixture("bgpo", tiny)
    f = rec["mask_frequency"]
    n = f["seeds"]
    loss = build_loss(BgpoConfig(inner_epochs=n, mask_per_epoch=True, num_mc=f["num_mc"], strata=f["strata"]),
                      mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    masks_BEMG = loss.prepare(fixture_batch(rec), seed=0).extras["bgpo_masked_BEMG"]
    freq = masks_BEMG.double().mean((1, 2))
    public = torch.tensor(f["frequency_BG"], dtype=torch.float64)
    assert torch.equal(freq == 0, public == 0)  # nothing after the first EOS
    se = ((freq * (1 - freq) + public * (1 - public)) / (n * f["num_mc"])).sqrt()
    assert ((freq - public).abs() <= 5 * se + 1e-12).all(), (freq - public).abs().max()
    totals_EB = masks_BEMG.double().sum((2, 3)).T
    assert torch.allclose(totals_EB.mean(0), torch.tensor(f["total_mean_B"], dtype=torch.float64), rtol=0.01)
    public_var = torch.tensor(f["total_var_B"], dtype=torch.float64)
    assert torch.equal(totals_EB.var(0) == 0, public_var == 0)
    assert torch.allclose(totals_EB.var(0), public_var, rtol=0.35)


# --- JustGRPO


def stepped_batch(rec: dict, unmask_BG: torch.Tensor, logp_BG: torch.Tensor, *, temperature: float, block_length: int,
                  block_grid: str = "completion") -> Trajectory:
    """The fixture's inputs with a decoding record (unmask steps, behaviour log-probs), the full vocabulary drawn."""
    prompt_BP = torch.tensor(rec["prompt_ids"])
    comp_BG = torch.tensor(rec["completion_ids"])
    B, G = comp_BG.shape
    T = int(unmask_BG.max()) + 1
    committed_BT = torch.zeros(B, T, dtype=torch.long).scatter_add_(1, unmask_BG, torch.ones_like(unmask_BG))
    zeros_BG = torch.zeros(B, G)
    return Trajectory(
        prompt_ids_BP=prompt_BP, prompt_mask_BP=torch.ones_like(prompt_BP, dtype=torch.bool), completion_ids_BG=comp_BG,
        unmask_step_BG=unmask_BG, logp_BG=logp_BG, entropy_BG=zeros_BG, margin_BG=zeros_BG,
        cutoff_BG=torch.full((B, G), float("-inf")), step_entropy_BT=torch.zeros(B, T), step_margin_BT=torch.zeros(B, T),
        step_committed_BT=committed_BT, temperature=temperature, block_length=block_length, block_grid=block_grid,
        banned_ids=(), commit_reads_draws=False, rewards_B=torch.tensor(rec["rewards"]), group_B=torch.tensor(rec["groups"]),
    )


@pytest.mark.parametrize("run", ["T1.0", "T0.7"])
def test_justgrpo_matches_public_code(tiny, run):
    """Left-to-right decoding, one token a step: every step scored at its state, 1/(G n_valid) weights, the public
    advantages (unbiased std + 1e-4); the public "old" log-prob is the current one, the behaviour record here."""
    rec = load_fixture("justgrpo", tiny)
    public = rec["runs"][run]
    policy = H.perturbed(tiny, seed=rec["policy_noise_seed"])
    comp_BG = torch.tensor(rec["completion_ids"])
    B, G = comp_BG.shape
    batch = stepped_batch(rec, torch.arange(G).expand(B, G).contiguous(), torch.tensor(public["token_logp_BG"]),
                          temperature=public["temperature"], block_length=1)
    loss = build_loss(JustGrpoConfig(), mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    batch = loss.prepare(batch, seed=0)
    assert torch.allclose(batch.extras["advantages_B"], torch.tensor(rec["advantages"]))
    policy.zero_grad()
    m = loss.backward(policy, batch, total_samples=len(batch))
    assert m["steps"] == B * G and m["abs_log_ratio_sum"] < 1e-4 * m["tokens"]
    scale = float(batch.extras["advantages_B"].abs().mean())  # the loss sums A_i of both signs to ~0
    assert_matches(m, public, policy, f"justgrpo {run}", loss_scale=scale)


# --- TraceRL


@pytest.mark.parametrize("run", ["sdar_shrink1_post0", "sdar_shrink2_all", "llada_shrink1_post0", "llada_shrink3_post2",
                                 "sdar_tight_clip", "llada_tight_clip"])
def test_tracerl_matches_public_code(tiny, run):
    """Both public scripts: SDAR's rounds over the [prompt | response | noisy response] layout with its 4-d mask
    against our per-step state rebuilds on tiny-sdar (block-causal), LLaDA's one noisy copy per (merged) step on
    tiny LLaDA; old log-probs at the first visit (the rollout policy), then the loss under the updated policy."""
    from common.model import build_model, preset_config

    rec = load_fixture("tracerl", tiny)
    public = rec["runs"][run]
    variant = public["variant"]
    if variant == "sdar":
        base = build_model(preset_config("tiny-sdar"), seed=rec["model_seed"]).float()
        assert rec["sdar_model_checksum"] == pytest.approx(H.model_checksum(base), rel=1e-12)
    else:
        base = tiny
    policy = H.perturbed(base, seed=rec["policy_noise_seed"])
    rec = {**rec, "prompt_ids": public["prompt_ids"], "completion_ids": public["completion_ids"]}
    unmask_BG = torch.tensor(public["unmask_step"])
    batch = stepped_batch(rec, unmask_BG, torch.zeros(unmask_BG.shape), temperature=1.0,
                          block_length=rec["blocks"][variant], block_grid="sequence" if variant == "sdar" else "completion")
    cfg = TraceRLConfig(variant=variant, shrink=public["shrink"], post_num=public["post_num"], clip_eps=public["eps"],
                        inner_epochs=2)
    loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
    first = loss.prepare(batch, seed=0, epoch=0)
    assert torch.allclose(first.extras["advantages_B"], torch.tensor(rec["advantages"]))
    loss.backward(base, first, total_samples=len(first))  # first visit, rollout policy: the old log-probs
    base.zero_grad()
    prepared = loss.prepare(batch, seed=0, epoch=1)
    policy.zero_grad()
    m = loss.backward(policy, prepared, total_samples=len(prepared))
    assert m["abs_log_ratio_sum"] > 0 and m["kl_sum"] > 0
    assert (m["clipped_tokens"] > 0) == run.endswith("tight_clip")
    scale = float(prepared.extras["advantages_B"].abs().mean())
    assert_matches(m, public, policy, f"tracerl {run}", loss_scale=scale)


@pytest.mark.parametrize("name", ["tracerl", "justgrpo"])
def test_trajectory_estimators_are_micro_batch_invariant(tiny, name):
    """The whole batch in one backward and in micro-batches of 4 + 2 rows (what ranks and micro-batches get) give
    the same loss and gradient: the row normalisers are the whole batch's, set in prepare."""
    from learner.losses import select_rows

    rec = load_fixture("justgrpo", tiny)
    comp_BG = torch.tensor(rec["completion_ids"])
    B, G = comp_BG.shape
    g_G = torch.arange(G)
    step_G = g_G if name == "justgrpo" else g_G // 4 * 4 + (g_G * 3) % 4  # blocks of 4 in a scrambled order
    unmask_BG = step_G.expand(B, G).contiguous()
    batch = stepped_batch(rec, unmask_BG, torch.tensor(rec["runs"]["T1.0"]["token_logp_BG"]), temperature=1.0, block_length=4)
    cfg = JustGrpoConfig() if name == "justgrpo" else TraceRLConfig(variant="llada")
    results = []
    for splits in ([slice(0, B)], [slice(0, 4), slice(4, B)]):
        loss = build_loss(cfg, mask_id=H.MASK, pad_id=H.PAD, eos_id=H.EOS)
        prepared = loss.prepare(batch, seed=0)
        tiny.zero_grad()
        total = sum(loss.backward(tiny, select_rows(prepared, s), total_samples=B)["loss"] for s in splits)
        results.append((total, H.grad_summary(tiny)))
    tiny.zero_grad()
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-7)
    assert torch.allclose(torch.tensor(g1["proj"]), torch.tensor(g2["proj"]), rtol=1e-5, atol=1e-6 * g1["norm"])
