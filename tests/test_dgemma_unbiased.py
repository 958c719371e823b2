"""Exactness of the uniform-noise (DiffusionGemma) score, by exact enumeration on a tiny model.

A 4-token vocabulary, one canvas of 2 positions, 3 denoising steps, no early stop. Every path (initial
canvas, then per step the accepted draws and the renoise tokens, i.e. the next canvas) is enumerated with its
probability, computed here from plain ``model(...)`` calls (the encoder re-run per call, the self-conditioning
logits carried with their graph) and the entropy-bound rule written out again; the output is the argmax of the
last step's logits, whose draws are discarded. Autograd on  E[R] = sum_tau P(tau) R(tau)  is the exact gradient.
The learner's real loss, run on every path at once with advantage N P(tau) R(tau), must give -grad E[R] when
the self-conditioning chain keeps its gradient; the stop-gradient surrogate's error is measured. The real
sampler, run on thousands of rows, must visit the canvases at the enumerated frequencies.

Letters: N paths, C canvas length, V vocabulary.
"""
import itertools

import pytest
import torch

import common.model as M
from common.model.dgemma.modeling import UniformDecoding, dgemma_config
from common.model.dgemma.record import CanvasRecord
from learner.canvas_steps import step_logps
from learner.losses.uniform_agrpo import uniform_agrpo_loss
from rollout.uniform_sampler import generate_uniform

pytestmark = pytest.mark.usefixtures("one_thread")
V, C, S = 4, 2, 3
PROMPT = torch.tensor([[2, 3, 1]])
D = UniformDecoding(max_new_tokens=C, steps=S, t_min=0.5, t_max=1.0, entropy_bound=1.0, stability_threshold=0,
                    confidence_threshold=1e-9)
CANVASES = torch.tensor(list(itertools.product(range(V), repeat=C)))  # [V^C, C]


def _tiny():
    config = dgemma_config(canvas_length=C, vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                           num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=8,
                           sliding_window=16, max_position_embeddings=64,
                           layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2,
                           eos_token_id=1)
    model = M.build_model(config, seed=3).eval()
    with torch.no_grad():
        model.model.decoder.norm.weight.mul_(8)  # peaked distributions: the bound accepts 1 or 2 positions
    return model


def _entropy_bound(logits_NCV):
    """The acceptance rule, written out: lowest entropies first while (their sum - their max) <= the bound."""
    p = logits_NCV.softmax(-1)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    order = h.argsort(-1)
    h_sorted = h.gather(-1, order)
    keep = h_sorted.cumsum(-1) - h_sorted <= D.entropy_bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _enumerate(model):
    """Every path: canvases [N, S, C], accepted [N, S-1, C], P(tau) with its graph, R(tau)."""
    N0 = len(CANVASES)
    canvas = CANVASES  # level 0: the uniform initial canvas
    prob = torch.full((N0,), 1.0 / N0)
    path, accepted, sc = [canvas], [], None
    for s in range(S):
        t = D.t_min + (D.t_max - D.t_min) * ((S - s) / S)
        logits = model(input_ids=PROMPT.expand(len(canvas), -1), decoder_input_ids=canvas,
                       self_conditioning_logits=sc).logits / t
        if s == S - 1:
            break
        acc = _entropy_bound(logits.detach())
        # each canvas branches into every next canvas: the draw at an accepted position, a uniform renoise elsewhere
        nxt = CANVASES.repeat(len(canvas), 1)  # [n * V^C, C]
        rows = torch.arange(len(canvas)).repeat_interleave(N0)
        p_draw = logits.softmax(-1)[rows].gather(-1, nxt[..., None])[..., 0]
        step_p = torch.where(acc[rows], p_draw, torch.full_like(p_draw, 1.0 / V)).prod(-1)
        prob = prob[rows] * step_p
        path = [c[rows] for c in path] + [nxt]
        accepted = [a[rows] for a in accepted] + [acc[rows]]
        sc, canvas = logits[rows], nxt
    reward = (logits.detach().argmax(-1) == torch.tensor([3, 1])).float().sum(-1)  # the argmax output's score
    return torch.stack(path, 1), torch.stack(accepted, 1), prob, reward


def _record(path, accepted):
    """The sampler's record of every path (the last step's draws are never scored: placeholders)."""
    N = len(path)
    rec = CanvasRecord.empty(N, 1, S, C, "cpu")
    rec.canvas[:, 0] = path
    rec.draws[:, 0, : S - 1] = path[:, 1:]
    rec.accepted[:, 0, : S - 1] = accepted
    rec.active[:] = True
    rec.sequences, rec.canvases = PROMPT.expand(N, -1), 1
    return rec


def _flat_grad(model):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()])


def test_the_exact_score_is_the_gradient_of_the_expected_reward_and_the_surrogate_is_measurably_off():
    model = _tiny()
    path, accepted, prob, reward = _enumerate(model)
    assert abs(float(prob.detach().sum()) - 1) < 1e-5 and reward.std() > 0
    model.zero_grad()
    (prob * reward).sum().backward()
    truth = _flat_grad(model)

    rec = _record(path, accepted)
    N = len(path)
    with torch.no_grad():
        rec.logp = step_logps(model, PROMPT.expand(N, -1), rec, D)
    renoised = (~accepted).sum((1, 2))  # policy-free: 1/V each, as the initial canvas's V^-C
    torch.testing.assert_close(rec.logp[:, 0, : S - 1].sum(-1).exp() * float(V) ** (-C - renoised), prob.detach(),
                               rtol=1e-4, atol=1e-9)
    grads = {}
    for exact in (True, False):
        model.zero_grad()
        # the loss averages a row's S - 1 acting steps and divides by N: advantage N (S - 1) P R undoes both
        adv = (N * (S - 1) * prob * reward).detach()
        loss, metrics = uniform_agrpo_loss(model, PROMPT.expand(N, -1), rec, D, adv, total_samples=N, exact=exact)
        loss.backward()
        grads[exact] = -_flat_grad(model)
        assert metrics["ratio_max_dev"] < 1e-5
    rel = {e: float((g - truth).norm() / truth.norm()) for e, g in grads.items()}
    cos = float(torch.nn.functional.cosine_similarity(grads[False], truth, 0))
    print(f"relative error of the score: exact {rel[True]:.2e}, stop-gradient surrogate {rel[False]:.2e} "
          f"(cosine {cos:.4f})")
    assert rel[True] < 1e-4
    assert rel[False] > 1e-2


def test_the_sampler_visits_the_enumerated_canvases_at_their_probabilities():
    model = _tiny()
    with torch.no_grad():
        path, _, prob, _ = _enumerate(model)
    torch.manual_seed(0)
    rows = 6000
    rec = generate_uniform(model, PROMPT.expand(rows, -1), D)
    for s in (1, 2):  # the canvas read at steps 1 and 2: marginals over V^C outcomes
        code = lambda c: c[..., 0] * V + c[..., 1]  # noqa: E731
        expected = torch.zeros(V * V).index_add_(0, code(path[:, s]), prob)
        seen = torch.bincount(code(rec.canvas[:, 0, s]), minlength=V * V).float() / rows
        assert 0.5 * (seen - expected).abs().sum() < 0.03
