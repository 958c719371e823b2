"""LLaDA2.1 token editing (sampler.edit_threshold): token for token the public 2.1 ``generate`` at temperature 0
(tests/fixtures/llada2_edit), per row in a batch, and refused for training."""
import json
from pathlib import Path

import pytest
import torch

import common.model as M
from common.config.sampler import SamplerConfig
from rollout.sampler import generate

EDIT = Path(__file__).parent / "fixtures" / "llada2_edit"
MASK, PAD = 127, 126
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return M.load_pretrained(EDIT / "checkpoint")


def _cases():
    return json.loads((EDIT / "generate.json").read_text())["cases"]


def _config(case, cache="none", **overrides):
    """The public decode as our settings: blocks of K from the prompt's first token, K steps a block (at least one
    commit a step, every masked token over the threshold), the completion to the last block's end."""
    P, K = len(case["prompt"]), case["block_length"]
    G = -(-(P + case["gen_length"]) // K) * K - P
    settings = dict(gen_length=G, block_length=K, steps=K * -(-G // K), temperature=0.0, block_grid="sequence",
                    position_ids="packed", ban_mask_token=False, cache=cache, threshold=case["threshold"],
                    threshold_floor="schedule", stop_after_eos=case["eos_early_stop"],
                    edit_threshold=case["editing_threshold"], max_post_edit_steps=case["max_post_steps"])
    return SamplerConfig(**{**settings, **overrides})


def _decode(model, prompts, cfg, eos_id):
    """Decode ``prompts`` (lists of ids, left-padded together) and count the forwards it ran."""
    from rollout.sampler import pad_rows
    calls = []
    hidden = model.hidden_states
    model.hidden_states = lambda *a, **k: calls.append(1) or hidden(*a, **k)
    try:
        ids, mask = pad_rows(prompts, PAD)
        traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=eos_id, pad_id=PAD)
    finally:
        del model.hidden_states
    return traj, len(calls)


@pytest.mark.parametrize("cache", ["none", "prefix"])
@pytest.mark.parametrize("name", [c["name"] for c in _cases()])
def test_editing_equals_the_public_llada21_generate(model, name, cache):
    """The same tokens and the same forwards: per block the mask-to-token and token-to-token commits, the
    post-edit steps up to their budget, the block's end at the first step that changes nothing, EOS early stop."""
    case = next(c for c in _cases() if c["name"] == name)
    traj, forwards = _decode(model, [case["prompt"]], _config(case, cache), case["eos_id"])
    want = case["output"]
    assert traj.completion_ids_BG[0].tolist()[:len(want)] == want
    assert forwards == case["forwards"]


def test_the_fixtures_edit_and_without_editing_decode_as_the_public_code_with_editing_off(model):
    """Editing changes every case's output, and our threshold decoding without it gives the public output with
    editing off: the difference is the edits, not the mask-to-token rule."""
    edited = 0
    for case in _cases():
        assert case["output"] != case["output_noedit"]
        traj, _ = _decode(model, [case["prompt"]], _config(case, edit_threshold=None), case["eos_id"])
        assert traj.completion_ids_BG[0].tolist()[:len(case["output_noedit"])] == case["output_noedit"]
        traj, _ = _decode(model, [case["prompt"]], _config(case), case["eos_id"])
        edited += int(traj.extras["step_edited_BT"].sum())
        assert traj.num_steps == traj.extras["step_edited_BT"].shape[1]
    assert edited > 0
    assert any(c["max_post_steps"] == 0 for c in _cases()) and any(c["eos_early_stop"] for c in _cases())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_each_row_of_a_batch_edits_and_ends_its_blocks_as_if_decoded_alone(model, temperature):
    """Rows of different prompt lengths finish their masks, spend their post-edit steps and end their blocks at
    different steps; each row's completion and records are its own decode's."""
    case = _cases()[1]
    prompts = [c["prompt"] for c in _cases()]
    G = 16
    cfg = _config(case, gen_length=G, steps=4 * 4, temperature=temperature, max_post_edit_steps=3)
    batch, _ = _decode(model, prompts, cfg, eos_id=case["eos_id"])
    assert int(batch.extras["step_edited_BT"].sum()) > 0
    for b, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), None, cfg, mask_id=MASK, eos_id=case["eos_id"], pad_id=PAD,
                         seed=0, row_offset=b)
        assert batch.completion_ids_BG[b].tolist() == alone.completion_ids_BG[0].tolist(), b
        assert torch.equal(batch.extras["step_edited_BT"][b], alone.extras["step_edited_BT"][0])
        assert torch.equal(batch.unmask_step_BG[b], alone.unmask_step_BG[0])


def test_editing_needs_the_threshold_and_the_sequence_grid():
    with pytest.raises(ValueError, match="edit_threshold is LLaDA2.1's joint threshold decoding"):
        SamplerConfig(gen_length=8, block_length=4, steps=8, edit_threshold=0.5)
    with pytest.raises(ValueError, match="edit_threshold is LLaDA2.1's joint threshold decoding"):
        SamplerConfig(gen_length=8, block_length=4, steps=8, block_grid="sequence", edit_threshold=0.5)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=8, block_grid="sequence", threshold=0.5, edit_threshold=0.5,
                        max_post_edit_steps=3)
    assert cfg.steps_per_round == 4 + 3


def test_training_with_editing_is_refused_in_one_line(caplog):
    """The learner does not rebuild edited states (nor score the draws at committed positions), so a run with
    editing on stops before building anything; evaluation decodes with it."""
    from common.config import load_config
    from driver.train import train

    cfg = load_config("tiny_countdown_moe", ["sampler.edit_threshold=0.5", "sampler.max_post_edit_steps=4"])
    assert train(cfg) == 2
    assert "sampler.edit_threshold (LLaDA2.1 token editing) cannot be trained on yet" in caplog.text


# --- what an exact score needs with editing: enumeration on a tabular policy (independent of the sampler's code)

def _enumerate_editing(theta, temperature, threshold, edit_threshold, max_post, V, G=2):
    """Every path of one block of G completion positions decoded with M2T + T2T (G steps, then edit-only steps),
    the policy a table of logits per state. Returns (log-prob of every draw, of the masked positions' draws, of
    the committed and edited draws, whether it edited, final tokens) per path."""
    MASKED = V
    paths = []

    def logits(x):
        return theta[x[0] * (V + 1) + x[1]]

    def walk(x, i, post, lp_all, lp_masked, lp_kept, edited):
        masked = [j for j in range(G) if x[j] == MASKED]
        post += not masked
        if post > max_post or i == G + max_post:
            paths.append((lp_all, lp_masked, lp_kept, edited, x))
            return
        lg = logits(x)
        logp = torch.log_softmax(lg / temperature, -1)
        conf = torch.softmax(lg.detach(), -1)  # the rule's statistic: the draw's probability at temperature 1
        for draws in torch.cartesian_prod(*[torch.arange(V)] * G).tolist():
            c = [float(conf[j, d]) for j, d in enumerate(draws)]
            commit = [j for j in masked if c[j] > threshold] or ([max(masked, key=lambda j: c[j])] if masked else [])
            edit = [j for j in range(G) if j not in masked and draws[j] != x[j] and c[j] > edit_threshold]
            y = tuple(draws[j] if j in commit or j in edit else x[j] for j in range(G))
            d = [logp[j, dj] for j, dj in enumerate(draws)]
            step = (lp_all + sum(d), lp_masked + sum(d[j] for j in masked),
                    lp_kept + sum(d[j] for j in commit + edit), edited or bool(edit))
            if not masked and not edit:  # the block ends: an edit-only step that changed nothing
                paths.append((*step, y))
            else:
                walk(y, i + 1, post, *step)

    walk((MASKED,) * G, 0, 0, 0.0, 0.0, 0.0, False)
    return paths


def test_with_editing_only_scoring_every_draw_the_rule_read_is_the_exact_gradient():
    """E[R * grad log pi] against grad E[R] by exact enumeration (V = 3, two positions, T = 0.7, thresholds 0.5 and
    0.6, one post-edit step). Every draw (masked and committed positions) gives the gradient; scoring only the masked positions'
    draws (the rule before editing), or only the committed and edited tokens, does not: the draws at committed
    positions that did not edit decided that nothing changed."""
    V = 3
    theta = torch.randn((V + 1) ** 2, 2, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    theta.requires_grad_(True)
    reward = torch.randn(V, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    paths = _enumerate_editing(theta, 0.7, threshold=0.5, edit_threshold=0.6, max_post=1, V=V)
    R = torch.stack([reward[x] for *_, x in paths])
    prob = torch.stack([lp for lp, *_ in paths]).exp()
    edited = torch.tensor([p[3] for p in paths])
    p_edit = float(prob.detach()[edited].sum())
    assert abs(float(prob.detach().sum()) - 1) < 1e-12 and 0.05 < p_edit < 0.95
    exact = torch.autograd.grad((prob * R).sum(), theta, retain_graph=True)[0]

    def expected_score(k):  # E[R * grad log pi_k] with the draws scored by variant k
        return torch.autograd.grad((prob.detach() * R * torch.stack([p[k] for p in paths])).sum(), theta,
                                   retain_graph=True)[0]

    rel = [float((expected_score(k) - exact).norm() / exact.norm()) for k in range(3)]
    assert rel[0] < 1e-12
    assert rel[1] > 0.05 and rel[2] > 0.05, rel
    print(f"paths {len(paths)}, P(edit) {p_edit:.3f}, relative error masked-only {rel[1]:.3f}, "
          f"committed+edited only {rel[2]:.3f}")
