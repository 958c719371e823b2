"""Exactness of the policy-gradient estimators, against independent ground truths.

1. The score function (which draws make a step's action), by exact enumeration. A tiny LLaDA with a
   6-token vocabulary decodes G = 2 or 3 tokens in one block of 2 steps (temperature 1 or 0.7, one case
   with a top-k support). Every draw sequence the sampler
   can make is enumerated with its probability, computed here from plain ``model(ids).logits`` and the
   commit rule written out again; autograd on  E[R] = sum_tau P(tau) R(tau)  gives the exact gradient.
   The learner's real loss (``prepare`` + ``backward``), run on every trajectory at once with advantage
   N P(tau) R(tau), must give  -grad E[R]  to float precision: scoring every draw (``draws=all``) does for
   every commit rule; committed tokens only (``draws=committed``) does for random and margin remasking,
   and is measurably off under low-confidence and threshold decoding. The real sampler, run thousands of
   times, must produce trajectories with the enumerated records at the enumerated frequencies, so the
   enumeration models the sampler and not a private idea of it.
2. Step selection and normalisation, by Monte Carlo over the step draws (the score is fixed): the mean of
   many seeded draws of each selector's real ``prepare`` weights, times exact per-(sample, step) gradients
   computed independently (every draw of the step scored), matches the exact full objective; the test is
   on the projection onto the exact gradient, whose standard error is ~1e-3, so a global x1.08 bias fails.
3. The field's trajectory estimators (TraceRL, JustGRPO) on the enumeration of 1: exact up to their constant
   token weight where they claim it, off where they merge steps or leave discarded draws out.

Letters: B samples, P prompt length, G completion length, T steps, S discard slots, D parameters,
N enumerated trajectories.
"""
import itertools
import math

import pytest
import torch

from common.config import AgrpoConfig, AtpoConfig
from common.trajectory import Trajectory
from learner.losses import build_loss
from tests.test_losses import EOS, MASK, PAD, flat_grad, rollout

V = 6  # ids 0..5; MASK = 3 is banned, so 5 tokens can be drawn
DRAWABLE = [i for i in range(V) if i != MASK]
PROMPT = [1, 4, 5, 0]


def _tiny(seed=0, scale=4.0, preset="tiny", block_size=None):
    """A tiny random model of a family with a 6-token vocabulary; its output head scaled so the distributions
    are peaked enough for the commit rules to matter (SDAR's block size: the completion's length)."""
    from common.model import build_model, preset_config

    if preset == "tiny":
        config = preset_config(preset, vocab_size=V, n_layers=2)
    else:
        config = preset_config(preset, vocab_size=V, num_hidden_layers=2,
                               **({"block_size": block_size} if block_size else {}))
    model = build_model(config, seed=seed).float()
    with torch.no_grad():
        head = model.model.transformer.ff_out if preset == "tiny" else model.lm_head
        head.weight.mul_(scale)
    return model


def _grid(model) -> str:
    from common.model import family_of

    return "sequence" if family_of(model).attention == "block_causal" else "completion"


def _rule_reads_draws(rule, threshold):
    return rule == "low_confidence" or (threshold is not None and rule != "top_prob")


def _remasking(rule):
    """The sampler's remasking of a case's rule (the threshold cases name their order)."""
    return {"threshold": "low_confidence", "top_prob_threshold": "top_prob"}.get(rule, rule)


def _choose(rule, n, masked, conf, margin, threshold, top=None):
    """The commit rule as ``rollout.sampler._choose`` states it, over the masked positions in order.
    Returns a list of (committed positions, probability of that choice)."""
    if rule == "sequential":  # leftmost first
        return [(set(sorted(masked)[:n]), 1.0)]
    if rule == "random":  # i.i.d. uniform scores: every n-subset equally likely, independent of theta
        subsets = list(itertools.combinations(masked, n))
        return [(set(s), 1.0 / len(subsets)) for s in subsets]
    score = {j: {"low_confidence": conf, "margin": margin, "top_prob": top}[rule][j] for j in masked}
    order = sorted(masked, key=lambda j: -score[j])  # sorted() is stable: ties go to the lower position
    chosen = set(order[:n])
    if threshold is not None:  # the drawn token's confidence; under top_prob the distribution's top probability
        above = top if rule == "top_prob" else conf
        chosen |= {j for j in masked if above[j] > threshold}
    return [(chosen, 1.0)]


def enumerate_trajectories(model, G, steps, rule, temperature, threshold=None, top_k=None):
    """Every trajectory of one block of G tokens in ``steps`` steps, with its probability (differentiable),
    the records the sampler writes, and the final completion. Ground-truth forwards use model(ids).logits;
    ``top_k`` keeps the k largest logits (cut-off recorded halfway to the largest dropped one)."""
    from rollout.sampler import transfer_schedule

    schedule = transfer_schedule(G, steps)
    cache = {}

    def dists(completion):
        key = tuple(completion)
        if key not in cache:
            first = len(PROMPT) - model.logit_shift  # where the completion's logits sit (Dream: a column early)
            logits = model(torch.tensor([PROMPT + list(completion)])).logits[0, first:first + G].float()
            logits = logits.index_fill(1, torch.tensor([MASK]), float("-inf"))
            cutoff = torch.full((G,), float("-inf"))
            kept = logits
            if top_k is not None:
                top = logits.detach().topk(top_k + 1, -1).values
                cutoff = (top[:, top_k - 1] + top[:, top_k]) * 0.5
                kept = logits.masked_fill(logits.detach() < cutoff[:, None], float("-inf"))
            logp_tilde = torch.log_softmax(kept / temperature, -1)  # what the sampler drew from
            conf = torch.softmax(logits, -1).detach()  # the sampler's confidence: raw probabilities, full support
            top2 = logp_tilde.exp().detach().topk(2, -1).values
            cache[key] = (logp_tilde, conf, top2[:, 0] - top2[:, 1], cutoff)
        return cache[key]

    leaves = []

    def walk(t, completion, unmask, discards, logp_rec, disc_logp, cut_rec, disc_cut, disc_rb, logprob):
        masked = [j for j in range(G) if completion[j] == MASK]
        if not masked:
            leaves.append(dict(completion=list(completion), unmask=list(unmask), discards=[list(d) for d in discards],
                               logp=list(logp_rec), disc_logp=[list(d) for d in disc_logp], cutoff=list(cut_rec),
                               disc_cutoff=[list(d) for d in disc_cut], disc_rb=[list(d) for d in disc_rb],
                               logprob=logprob))
            return
        logp_tilde, conf, margin, cutoff = dists(completion)
        if threshold is None:
            n = schedule[t]
        else:
            n = min(max(math.ceil(len(masked) / (steps - t)), 1), len(masked))
        support = [[v for v in DRAWABLE if logp_tilde[j, v] > float("-inf")] for j in masked]
        for draw in itertools.product(*support):
            y = dict(zip(masked, draw))
            lp = sum(logp_tilde[j, y[j]] for j in masked)
            c = {j: float(conf[j, y[j]]) for j in masked}
            m = {j: float(margin[j]) for j in masked}
            top = {j: float(conf[j].max()) for j in masked}  # top_prob: the distribution's, whatever was drawn
            for chosen, p_choice in _choose(rule, n, masked, c, m, threshold, top):
                comp, um, lr, cr = list(completion), list(unmask), list(logp_rec), list(cut_rec)
                dis, dl, dc, drb = ([list(d) for d in rec] for rec in (discards, disc_logp, disc_cut, disc_rb))
                floor = min(c[j] for j in chosen)  # the n-th committed draw's confidence, and its position
                last = max(j for j in chosen if c[j] == floor)
                for j, sup in zip(masked, support):
                    if j in chosen:
                        comp[j], um[j], lr[j], cr[j] = y[j], t, float(logp_tilde[j, y[j]].detach()), float(cutoff[j])
                    else:
                        dis[j][t], dl[j][t], dc[j][t] = y[j], float(logp_tilde[j, y[j]].detach()), float(cutoff[j])
                        # the tokens that would have left j uncommitted (common.rao_blackwell's set)
                        stay = [v for v in sup if float(conf[j, v]) < floor or (float(conf[j, v]) == floor and j > last)]
                        drb[j][t] = float(torch.logsumexp(logp_tilde[j, stay].detach(), 0))
                walk(t + 1, comp, um, dis, lr, dl, cr, dc, drb, logprob + lp + math.log(p_choice))

    S = steps - 1
    slots = max(S, 1)
    walk(0, [MASK] * G, [-1] * G, [[-1] * slots for _ in range(G)], [0.0] * G, [[0.0] * slots for _ in range(G)],
         [float("-inf")] * G, [[float("-inf")] * slots for _ in range(G)], [[0.0] * slots for _ in range(G)],
         torch.zeros(()))
    return leaves


def leaves_batch(leaves, G, steps, temperature, reads_draws, top_k=None, grid="completion", block_length=None) -> Trajectory:
    """The enumerated trajectories as the sampler records them; on the sequence grid (SDAR: PROMPT fills whole
    blocks of G) the sampler's trajectory has a second, empty block round."""
    N, S = len(leaves), steps - 1
    T = steps * (2 if grid == "sequence" else 1)
    committed_NT = torch.zeros(N, T, dtype=torch.long)
    unmask_NG = torch.tensor([leaf["unmask"] for leaf in leaves])
    committed_NT.scatter_add_(1, unmask_NG, torch.ones_like(unmask_NG))
    return Trajectory(
        prompt_ids_BP=torch.tensor([PROMPT] * N), prompt_mask_BP=torch.ones(N, len(PROMPT), dtype=torch.bool),
        completion_ids_BG=torch.tensor([leaf["completion"] for leaf in leaves]), unmask_step_BG=unmask_NG,
        logp_BG=torch.tensor([leaf["logp"] for leaf in leaves]), entropy_BG=torch.zeros(N, G), margin_BG=torch.zeros(N, G),
        cutoff_BG=torch.tensor([leaf["cutoff"] for leaf in leaves]), step_entropy_BT=torch.zeros(N, T),
        step_margin_BT=torch.zeros(N, T), step_committed_BT=committed_NT, temperature=temperature,
        block_length=block_length or G, banned_ids=(MASK,), block_grid=grid,
        discard_ids_BGS=torch.tensor([leaf["discards"] for leaf in leaves])[:, :, :S],
        discard_logp_BGS=torch.tensor([leaf["disc_logp"] for leaf in leaves])[:, :, :S],
        discard_cutoff_BGS=None if top_k is None else torch.tensor([leaf["disc_cutoff"] for leaf in leaves])[:, :, :S],
        discard_rb_logp_BGS=torch.tensor([leaf["disc_rb"] for leaf in leaves])[:, :, :S],
        commit_reads_draws=reads_draws, rewards_B=torch.zeros(N), group_B=torch.arange(N),
    )


def _reward(completion, G):
    g = torch.Generator().manual_seed(123)
    table = torch.rand((V,) * G, generator=g, dtype=torch.float64)
    return float(table[tuple(completion)])


def exact_and_estimated(model, G, steps, rule, temperature, threshold, draws, top_k=None):
    """(exact grad E[R], the learner's expected gradient with ``draws``) as flat [D] float64 vectors."""
    leaves = enumerate_trajectories(model, G, steps, rule, temperature, threshold, top_k)
    logprob_N = torch.stack([leaf["logprob"] for leaf in leaves])
    reward_N = torch.tensor([_reward(leaf["completion"], G) for leaf in leaves], dtype=torch.float64)
    assert abs(float(logprob_N.detach().double().exp().sum()) - 1.0) < 1e-5  # the enumeration is complete
    model.zero_grad()
    (logprob_N.double().exp() * reward_N).sum().backward()
    exact_D = flat_grad(model).double().clone()
    model.zero_grad()

    batch = leaves_batch(leaves, G, steps, temperature, _rule_reads_draws(rule, threshold), top_k, _grid(model),
                         getattr(model.config, "block_size", G))
    N = len(leaves)
    cfg = AgrpoConfig(k_steps=steps, step_sampling="stratified", normalize="sum", eligible_steps="all", draws=draws)
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=None)
    prepared = loss.prepare(batch, seed=0)
    # Every step that committed a token, once, with weight 1: the full sum over the trajectory's steps.
    assert bool((prepared.extras["step_weights_BK"].sum(1) == (batch.step_committed_BT > 0).sum(1)).all())
    prepared.extras["advantages_B"] = (N * logprob_N.detach().double().exp() * reward_N).float()
    m = loss.backward(model, prepared, total_samples=N)
    assert m["clipped_tokens"] == 0 and m["abs_log_ratio_sum"] < 1e-4 * m["tokens"]  # on-policy: ratio 1
    est_D = -flat_grad(model).double().clone()
    model.zero_grad()
    return exact_D, est_D, leaves


CASES = [  # (rule, G, steps, temperature, threshold, top_k)
    ("random", 2, 2, 1.0, None, None),
    ("top_prob", 2, 2, 0.7, None, None),  # LLaDA's low-confidence order at T=0, but from the distribution
    ("low_confidence", 2, 2, 1.0, None, None),
    ("low_confidence", 3, 2, 0.7, None, None),
    ("low_confidence", 2, 2, 0.7, None, 3),
    ("margin", 2, 2, 0.7, None, None),
    ("threshold", 2, 2, 1.0, 0.3, None),
    ("top_prob_threshold", 2, 2, 1.0, 0.3, None),  # LLaDA2's threshold decoding, reading the distribution only
]
EXACT_COMMITTED = ("random", "margin", "top_prob", "top_prob_threshold")  # rules that read no draw


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.mark.parametrize("rule,G,steps,temperature,threshold,top_k", CASES, ids=lambda v: str(v))
def test_scoring_every_draw_is_the_exact_gradient(tiny, rule, G, steps, temperature, threshold, top_k):
    remasking = _remasking(rule)
    exact_D, est_D, _ = exact_and_estimated(tiny, G, steps, remasking, temperature, threshold, "all", top_k)
    assert exact_D.norm() > 0
    assert _rel(est_D, exact_D) < 1e-4, _rel(est_D, exact_D)
    exact_c, est_c, _ = exact_and_estimated(tiny, G, steps, remasking, temperature, threshold, "committed", top_k)
    off = _rel(est_c, exact_c)
    if rule in EXACT_COMMITTED:  # the rule ignores the draws: committed tokens are the exact score
        assert off < 1e-4, off
    else:  # it ranks the draws: leaving the discarded ones out is biased
        assert off > 0.01, off


@pytest.mark.parametrize("G,steps,temperature,top_k", [(2, 2, 1.0, None), (3, 2, 0.7, None), (2, 2, 0.7, 3)])
def test_the_rao_blackwellised_discarded_draws_are_the_exact_gradient(tiny, G, steps, temperature, top_k):
    """Under low-confidence ranking a discarded draw may be scored by the mass of the tokens that would have left
    it uncommitted (algorithm.draws=rao_blackwell): still the exact gradient, where committed-only is not."""
    exact, est, _ = exact_and_estimated(tiny, G, steps, "low_confidence", temperature, None, "rao_blackwell", top_k)
    assert exact.norm() > 0 and _rel(est, exact) < 1e-4, _rel(est, exact)


@pytest.mark.parametrize("preset", ["tiny-dream", "tiny-sdar", "tiny-llada2"])
@pytest.mark.parametrize("rule,G,steps,temperature,threshold,top_k", CASES, ids=lambda v: str(v))
def test_every_family_scores_its_actions_exactly(preset, rule, G, steps, temperature, threshold, top_k):
    """The same enumeration on Dream (logits shifted by one), SDAR and LLaDA2 MoE (block-causal attention; blocks of the
    smallest size >= G that the prompt fills exactly, so the completion is one block, decoded with its
    schedule capped at what is masked): all draws exact everywhere, committed-only exactly where the rule
    ignores the draws."""
    block = next(k for k in range(G, len(PROMPT) + 1) if len(PROMPT) % k == 0) if preset != "tiny-dream" else None
    model = _tiny(preset=preset, block_size=block)
    remasking = _remasking(rule)
    exact_D, est_D, _ = exact_and_estimated(model, G, steps, remasking, temperature, threshold, "all", top_k)
    assert exact_D.norm() > 0 and _rel(est_D, exact_D) < 1e-4, _rel(est_D, exact_D)
    exact_c, est_c, _ = exact_and_estimated(model, G, steps, remasking, temperature, threshold, "committed", top_k)
    off = _rel(est_c, exact_c)
    assert off < 1e-4 if rule in EXACT_COMMITTED else off > 0.01, off


@pytest.mark.parametrize("rule,G,steps,temperature,threshold,top_k", CASES, ids=lambda v: str(v))
def test_the_sampler_makes_the_enumerated_trajectories_at_their_probabilities(tiny, rule, G, steps, temperature, threshold,
                                                                              top_k):
    """The enumeration above is the real sampler: every sampled trajectory is an enumerated one with the same
    records (committed and discarded draws, their log-probs), and the frequencies match the probabilities."""
    from common.config.sampler import SamplerConfig
    from rollout.sampler import generate

    remasking = _remasking(rule)
    with torch.no_grad():
        leaves = enumerate_trajectories(tiny, G, steps, remasking, temperature, threshold, top_k)
    S = steps - 1
    index = {(tuple(lf["completion"]), tuple(lf["unmask"]), tuple(tuple(d[:S]) for d in lf["discards"])): lf for lf in leaves}
    n = 4000
    cfg = SamplerConfig(gen_length=G, block_length=G, steps=steps, temperature=temperature, remasking=remasking,
                        threshold=threshold, top_k=top_k)
    with torch.no_grad():
        traj = generate(tiny, torch.tensor([PROMPT] * n), None, cfg, mask_id=MASK, eos_id=EOS, pad_id=PAD, seed=7)
    assert traj.commit_reads_draws == _rule_reads_draws(remasking, threshold)
    counts = {}
    for b in range(n):
        key = (tuple(traj.completion_ids_BG[b].tolist()), tuple(traj.unmask_step_BG[b].tolist()),
               tuple(tuple(d) for d in traj.discard_ids_BGS[b].tolist()))
        assert key in index, key
        leaf = index[key]
        counts[key] = counts.get(key, 0) + 1
        assert torch.allclose(traj.logp_BG[b], torch.tensor(leaf["logp"]), atol=1e-5)
        has = traj.discard_ids_BGS[b] >= 0
        assert torch.allclose(traj.discard_logp_BGS[b][has], torch.tensor([d[:S] for d in leaf["disc_logp"]])[has], atol=1e-5)
        assert torch.allclose(traj.cutoff_BG[b], torch.tensor(leaf["cutoff"]), atol=1e-5)  # the same support
        if top_k is not None:
            want = torch.tensor([d[:S] for d in leaf["disc_cutoff"]])[has]
            assert torch.allclose(traj.discard_cutoff_BGS[b][has], want, atol=1e-5)
        if traj.discard_rb_logp_BGS is not None:  # the uncommitted set's mass, as common.rao_blackwell defines it
            want = torch.tensor([d[:S] for d in leaf["disc_rb"]])[has]
            assert torch.allclose(traj.discard_rb_logp_BGS[b][has], want, atol=1e-5)
    assert (traj.discard_rb_logp_BGS is not None) == (remasking == "low_confidence" and threshold is None)
    for key, leaf in index.items():
        p = float(leaf["logprob"].exp())
        f = counts.get(key, 0) / n
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / n) + 2 / n, (key, f, p)


# --- 2. step selection and normalisation (Monte Carlo over the step draws)

B2, G2, T2, BLOCK2 = 8, 16, 16, 8  # two blocks of 8 steps, one token per step
PROBE = ("model.transformer.blocks.0.q_proj.weight", "model.transformer.blocks.3.attn_out.weight",
         "model.transformer.ff_out.weight")  # a fixed slice of the gradient: any linear functional of it is unbiased too


def probe_grad(model) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].grad.reshape(-1) if params[n].grad is not None else torch.zeros(params[n].numel())
                      for n in PROBE])


@pytest.fixture(scope="module")
def mc_setup():
    return build_mc_setup()


def build_mc_setup():
    """The tiny preset with EOS made likely, 8 threshold-decoded rollouts, and their exact step gradients."""
    from common.model import build_model, preset_config

    model = build_model(preset_config("tiny"), seed=0)
    with torch.no_grad():  # make EOS likely (its head row along the hidden states' common direction)
        ids = torch.randint(5, 101, (16, 22), generator=torch.Generator().manual_seed(0))
        mu_D = model.hidden_states(ids.masked_fill(torch.arange(22) >= 6, MASK), None, None).flatten(0, 1).mean(0)
        model.model.transformer.ff_out.weight[EOS] = mu_D / mu_D.norm() ** 2 * 5.0
    # Threshold decoding: trajectories of different lengths T_i, EOS-only steps, and discarded draws.
    traj = rollout(model, B=B2, G=G2, steps=T2, block=BLOCK2, temperature=0.7, seed=5, threshold=0.2)
    assert bool((traj.discard_ids_BGS >= 0).any()) and traj.commit_reads_draws
    T_B = _eligible(traj, "all").sum(1)
    assert len(set(T_B.tolist())) > 1 and bool((_eligible(traj, "non_eos").sum(1) < T_B).all())
    return model, traj, _exact_step_grads(model, traj)


def _exact_step_grads(model, traj):
    """[B*T, D] gradient of -A_i/B * log pi(a_t|s_t) for every (i, t), the action being every token drawn at
    step t (committed, and discarded at the block's other still-masked positions); written out inline."""
    P, spb = traj.prompt_ids_BP.shape[1], T2 // (G2 // BLOCK2)
    r_B = traj.rewards_B
    adv_B = torch.stack([r_B[i] - r_B[traj.group_B == traj.group_B[i]].mean() for i in range(B2)])
    rows = []
    for i in range(B2):
        for t in range(T2):
            block = t // spb
            positions, tokens = [], []
            for j in range(G2):
                if traj.unmask_step_BG[i, j] == t:
                    positions.append(j), tokens.append(int(traj.completion_ids_BG[i, j]))
                elif j // BLOCK2 == block and traj.unmask_step_BG[i, j] > t:
                    positions.append(j), tokens.append(int(traj.discard_ids_BGS[i, j, t - block * spb]))
            assert all(tok >= 0 for tok in tokens)  # a still-masked position of the block always has a draw
            comp_G = traj.completion_ids_BG[i].masked_fill(traj.unmask_step_BG[i] >= t, MASK)
            model.zero_grad()
            logits_NV = model(torch.cat([traj.prompt_ids_BP[i], comp_G])[None]).logits[0, P:][positions].float()
            logits_NV[:, list(traj.banned_ids)] = float("-inf")
            logp_N = torch.log_softmax(logits_NV / traj.temperature, -1).gather(1, torch.tensor(tokens)[:, None])
            (-adv_B[i] / B2 * logp_N.sum()).backward()
            rows.append(probe_grad(model))
    model.zero_grad()
    return torch.stack(rows)


def _eligible(traj, rule):
    """[B, T] eligible steps, written out again: steps that committed a token, then the rule's cut."""
    out = torch.zeros(B2, T2, dtype=torch.bool)
    for i in range(B2):
        steps = traj.unmask_step_BG[i].tolist()
        content = [s for s, tok in zip(steps, traj.completion_ids_BG[i].tolist()) if tok != EOS]
        last = max(content, default=-1)
        for t in set(steps):
            keep = {"all": True, "non_eos": t in content, "through_last": t <= last}[rule]
            out[i, t] = keep
    return out


def _weights(batch) -> torch.Tensor:
    """[B*T] total weight each (sample, step) gets in one prepared draw."""
    steps_BK, w_BK = batch.extras["steps_BK"], batch.extras["step_weights_BK"]
    w_BT = torch.zeros(B2, T2, dtype=torch.float64)
    w_BT.scatter_add_(1, steps_BK.clamp(min=0), torch.where(steps_BK >= 0, w_BK.double(), 0.0))
    return w_BT.reshape(-1)


def target_weights(traj, cfg) -> torch.Tensor:
    """[B*T] the weight of each (sample, step) in the objective: 1 (sum) or 1/T_i (step_mean) on eligible steps."""
    elig_BT = _eligible(traj, cfg.eligible_steps).double()
    if cfg.normalize == "step_mean":
        elig_BT = elig_BT / elig_BT.sum(1, keepdim=True).clamp(min=1)
    return elig_BT.reshape(-1)


def mc_check(W_NX, target_X, gm_XD):
    """Is the mean of the draws' weights an unbiased estimate of the target objective's gradient?
    Tests the coefficient of the mean gradient along the exact one (SE ~1e-3 here) and the residual norm."""
    gm = gm_XD.double()
    exact_D = target_X @ gm
    est_ND = W_NX @ gm
    coef_N = est_ND @ exact_D / float(exact_D @ exact_D)
    n = W_NX.shape[0]
    coef, coef_se = float(coef_N.mean()), float(coef_N.std()) / n**0.5
    mean_D = est_ND.mean(0)
    err2 = float(((mean_D - exact_D) ** 2).sum())
    se2 = float(est_ND.var(0).sum()) / n
    ok = abs(coef - 1) <= 4 * coef_se + 1e-9 and err2 <= 9 * se2 + 1e-18
    return ok, dict(coef=coef, coef_se=coef_se, err2_over_se2=err2 / max(se2, 1e-300))


MC_CONFIGS = [
    AgrpoConfig(k_steps=3, step_sampling="uniform"),
    AgrpoConfig(k_steps=3, step_sampling="stratified"),
    AgrpoConfig(k_steps=3, step_sampling="entropy"),
    AgrpoConfig(k_steps=3, step_sampling="stratified", normalize="sum", eligible_steps="non_eos"),
    AgrpoConfig(k_steps=3, step_sampling="entropy", eligible_steps="all"),
    AtpoConfig(k_steps=3, selection="sample", score="hybrid"),
]


@pytest.mark.parametrize("cfg", MC_CONFIGS, ids=lambda c: f"{c.name}-{getattr(c, 'step_sampling', getattr(c, 'selection', ''))}-{c.normalize}-{c.eligible_steps}")
def test_step_draws_are_unbiased_for_the_objective(mc_setup, cfg):
    model, traj, gm_XD = mc_setup
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    target_X = target_weights(traj, cfg)
    # The real backward computes exactly sum w g for a draw (on-policy: every ratio is 1), discards included.
    for seed in (0, 1):
        batch = loss.prepare(traj, seed=seed)
        w_X = _weights(batch)
        assert not bool(w_X[target_X == 0].any()), "an ineligible step got weight"
        model.zero_grad()
        loss.backward(model, batch, total_samples=B2)
        want_D = (w_X @ gm_XD.double()).float()
        assert torch.allclose(probe_grad(model), want_D, rtol=1e-4, atol=1e-5 * float(want_D.abs().max()))
    model.zero_grad()
    W_NX = torch.stack([_weights(loss.prepare(traj, seed=s)) for s in range(2000)])
    ok, stats = mc_check(W_NX, target_X, gm_XD)
    assert ok, stats
    assert stats["coef_se"] < 0.01, stats  # a global x1.08 bias is > 8 standard errors away
    # Negative control: the same draws with every weight x1.08 fail the check.
    assert not mc_check(1.08 * W_NX, target_X, gm_XD)[0]


def test_atpo_topk_reallocates_and_the_check_sees_it(mc_setup):
    """ATPO's default top-k puts the budget on the best-scoring steps: deterministic, and not the policy
    gradient (by design), which the same check reports."""
    model, traj, gm_XD = mc_setup
    cfg = AtpoConfig(k_steps=3)
    assert cfg.selection == "topk"
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)
    W_NX = torch.stack([_weights(loss.prepare(traj, seed=s)) for s in range(3)])
    assert torch.equal(W_NX[0], W_NX[1])
    ok, stats = mc_check(W_NX, target_weights(traj, cfg), gm_XD)
    assert not ok and abs(stats["coef"] - 1) > 0.05, stats


# --- 3. the field's trajectory estimators (TraceRL, JustGRPO) by the same enumeration


def exact_and_loss(model, G, steps, rule, temperature, cfg):
    """(exact grad E[R], the loss's expected gradient divided by its uniform token weight, the weight)."""
    leaves = enumerate_trajectories(model, G, steps, rule, temperature)
    logprob_N = torch.stack([leaf["logprob"] for leaf in leaves])
    reward_N = torch.tensor([_reward(leaf["completion"], G) for leaf in leaves], dtype=torch.float64)
    model.zero_grad()
    (logprob_N.double().exp() * reward_N).sum().backward()
    exact_D = flat_grad(model).double().clone()
    model.zero_grad()
    batch = leaves_batch(leaves, G, steps, temperature, _rule_reads_draws(rule, None), None, _grid(model),
                         getattr(model.config, "block_size", G))
    N = len(leaves)
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=None)
    prepared = loss.prepare(batch, seed=0)
    key = "trace_weight_BK" if cfg.name == "tracerl" else "step_weights_BK"
    w = prepared.extras[key][prepared.extras[key] > 0]
    assert torch.allclose(w, w[0])  # the settings tested weigh every scored token alike
    prepared.extras["advantages_B"] = (N * logprob_N.detach().double().exp() * reward_N).float()
    m = loss.backward(model, prepared, total_samples=N)
    assert m["clipped_tokens"] == 0 and m["abs_log_ratio_sum"] < 1e-4 * m["tokens"]  # on-policy: ratio 1
    est_D = -flat_grad(model).double().clone() / float(w[0])
    model.zero_grad()
    return exact_D, est_D


TRACE_CASES = [("random", 2, 2, 1.0), ("top_prob", 2, 2, 0.7), ("margin", 2, 2, 0.7), ("sequential", 2, 2, 0.7),
               ("low_confidence", 2, 2, 1.0)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdar"])
@pytest.mark.parametrize("rule,G,steps,temperature", TRACE_CASES, ids=lambda v: str(v))
def test_tracerl_trajectory_terms_are_the_exact_score_where_the_rule_reads_no_draw(preset, rule, G, steps, temperature):
    """TraceRL with one step a row (shrink 1), every token at 1/G (variant sdar) and no padding dropped is the exact
    gradient up to its constant weight wherever committed-only scoring is (on LLaDA and on the block-causal
    family); under low-confidence decoding it scores no discarded draw and is off."""
    from common.config import TraceRLConfig

    block = next(k for k in range(G, len(PROMPT) + 1) if len(PROMPT) % k == 0) if preset == "tiny-sdar" else None
    model = _tiny(preset=preset, block_size=block) if preset != "tiny" else _tiny()
    cfg = TraceRLConfig(variant="sdar", shrink=1, post_num=None, beta_kl=0.0, std_normalize=False)
    exact_D, est_D = exact_and_loss(model, G, steps, rule, temperature, cfg)
    off = _rel(est_D, exact_D)
    assert off < 1e-4 if rule != "low_confidence" else off > 0.01, off


def test_tracerl_shrink_and_step_means_are_surrogates(tiny):
    """shrink 2 scores the second step's token at the first step's state: not the score function. The llada
    variant's 1/|row| weights equal 1/G ones only when every row has the same size; with 2 tokens in 2 steps
    they do, and it is exact there."""
    from common.config import TraceRLConfig

    exact_D, est_D = exact_and_loss(tiny, 2, 2, "random", 1.0, TraceRLConfig(shrink=2, post_num=None, beta_kl=0.0))
    assert _rel(est_D, exact_D) > 0.01
    exact_D, est_D = exact_and_loss(tiny, 2, 2, "random", 1.0, TraceRLConfig(variant="llada", post_num=None, beta_kl=0.0))
    assert _rel(est_D, exact_D) < 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdar"])
def test_justgrpo_is_the_exact_gradient_of_left_to_right_decoding(preset):
    """Sequential decoding, one token a step (G = steps = 2, every draw enumerated): JustGRPO's sum over every
    step is the exact gradient up to its weight 1/(G n_valid)."""
    from common.config import JustGrpoConfig

    model = _tiny(preset=preset, block_size=2) if preset != "tiny" else _tiny()
    exact_D, est_D = exact_and_loss(model, 2, 2, "sequential", 0.7, JustGrpoConfig())
    assert exact_D.norm() > 0 and _rel(est_D, exact_D) < 1e-4, _rel(est_D, exact_D)


def test_justgrpo_refuses_other_decoding_orders(tiny):
    from common.config import JustGrpoConfig

    leaves = enumerate_trajectories(tiny, 2, 2, "random", 1.0)
    batch = leaves_batch(leaves, 2, 2, 1.0, False)
    loss = build_loss(JustGrpoConfig(), mask_id=MASK, pad_id=PAD, eos_id=None)
    with pytest.raises(ValueError, match="sequential"):
        loss.prepare(batch, seed=0)
