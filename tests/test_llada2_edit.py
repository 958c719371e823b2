"""LLaDA2.1 token editing (sampler.edit_threshold): token for token the public 2.1 ``generate`` at temperature 0
(tests/fixtures/llada2_edit), per row in a batch; what an exact score needs (enumeration), and the learner scoring it."""
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


def test_training_with_editing_takes_agrpo_only_and_says_so_in_one_line(caplog):
    """Only AGRPO and ATPO score every draw the editing rules read; another estimator stops the run before anything
    is built, and the learner's loss factory refuses it too."""
    from common.config import load_config
    from driver.train import train
    from learner.losses import build_loss

    cfg = load_config("tiny_countdown_moe", ["sampler.edit_threshold=0.5", "sampler.max_post_edit_steps=4",
                                             "algorithm={name: diffu_grpo}"])
    assert train(cfg) == 2
    assert "sampler.edit_threshold (LLaDA2.1 token editing) trains with algorithm.name agrpo or atpo only" in caplog.text
    with pytest.raises(ValueError, match="does not score token editing"):
        build_loss(cfg.algorithm, mask_id=MASK, pad_id=PAD, editing=True)


def _edited_batch(model, temperature=1.0, cache="none"):
    """Rows of four prompt lengths decoded with editing at temperature > 0, two groups of two through the wire
    format, and the model inputs of every step the sampler ran (captured from its forward calls)."""
    from common.schema import group_to_record_batch, table_to_trajectory
    from rollout.sampler import pad_rows
    import pyarrow as pa

    case = _cases()[6]
    prompts = [c["prompt"] for c in _cases()[:4]]
    cfg = _config(case, cache=cache, gen_length=16, steps=16, temperature=temperature, max_post_edit_steps=3)
    inputs = []
    hidden = model.hidden_states
    model.hidden_states = lambda ids, *a, **k: inputs.append(ids.clone()) or hidden(ids, *a, **k)
    try:
        ids, mask = pad_rows(prompts, PAD)
        traj = generate(model, ids, mask, cfg, mask_id=MASK, eos_id=case["eos_id"], pad_id=PAD, seed=3)
    finally:
        del model.hidden_states
    groups = [group_to_record_batch(traj.select(slice(b, b + 2)), group_id=str(b), task="t", worker_id="w",
                                    policy_version=0, rewards=[0.0, 1.0], correct=[False, True], components={},
                                    timings={"gen_seconds": 0.0, "reward_seconds": 0.0}) for b in (0, 2)]
    return traj, table_to_trajectory(pa.Table.from_batches(groups), PAD), inputs


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_the_learner_rebuilds_every_edited_state_and_scores_every_draw_the_rules_read_with_ratio_one(model, cache):
    """Through the wire format: the state the learner builds for each step is the model input the sampler ran it on
    (without a cache, where each step's forward reads the whole state), and its log-prob of every draw a step's rules
    read (masked positions and decoded ones) is the sampler's, also when the sampler ran its block-causal cache."""
    from learner.losses.actions import step_rows
    from learner.losses.base import sampler_logprobs
    from learner.step_states import policy_hidden, state_inputs

    traj, batch, inputs = _edited_batch(model, cache=cache)
    for key in ("edit_before_BTK", "edit_draws_BTK", "edit_logp_BTK", "edit_cutoff_BTK"):
        assert torch.equal(batch.extras[key], traj.extras[key]), key
    reads_BT = batch.extras["edit_draws_BTK"].ge(0).any(-1)
    ran_T = reads_BT.any(0).nonzero()[:, 0].tolist()  # every step the batch ran reads a draw on some row
    assert len(ran_T) == len(inputs) and int(traj.extras["step_edited_BT"].sum()) > 0
    P, B = batch.prompt_ids_BP.shape[1], len(batch)
    decoded_reads = 0
    for t, want_BL in zip(ran_T, inputs):
        step_B = torch.full((B,), t)
        live_B = reads_BT[:, t]  # rows that stopped hold EOS where the sampler's kept masks: never scored
        if cache == "none":
            ids_BL, _, _ = state_inputs(batch, step_B, MASK)
            assert torch.equal(ids_BL[live_B], want_BL[live_B]), t
        rows = step_rows(batch, step_B, live_B, discarded=True, device="cpu")
        assert len(rows.b_N) == int(batch.extras["edit_draws_BTK"][:, t].ge(0).sum())
        decoded_reads += int((~rows.committed_N).sum())
        with torch.no_grad():
            h = policy_hidden(model, batch, step_B, MASK, "cpu").rows(rows.b_N, P + rows.g_N)
            logp_N = sampler_logprobs(model.vocab_logits(h), rows.token_N, temperature=batch.temperature,
                                      cutoff_N=rows.cutoff_N, banned_ids=tuple(batch.banned_ids))
        torch.testing.assert_close(logp_N, rows.old_logp_N, rtol=0, atol=2e-5)
    assert decoded_reads > 0


@pytest.mark.parametrize("algo", ["agrpo", "atpo"])
def test_agrpo_and_atpo_train_on_edited_rollouts_with_ratio_one(model, algo):
    """With k above T every step that read a draw is taken once (ATPO's sampling covers them all too): each read is
    one ratio-1 token of the loss. ATPO's step statistics are over the draws the rules read, so post-edit steps (no
    mask left) are scored from their edit draws, not as empty steps."""
    from common.config.algorithm import AgrpoConfig, AtpoConfig
    from learner.losses import build_loss

    _, batch, _ = _edited_batch(model)
    reads_BT = batch.extras["edit_draws_BTK"].ge(0).any(-1)
    post_BT = reads_BT & (batch.unmask_step_BG.max(1).values[:, None] < torch.arange(batch.num_steps))
    assert bool(post_BT.any()) and bool((batch.step_entropy_BT[post_BT] > 0).all())
    cfg = AgrpoConfig(k_steps=64) if algo == "agrpo" else AtpoConfig(k_steps=64, selection="topk")
    loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=_cases()[6]["eos_id"], editing=True)
    prepared = loss.prepare(batch, seed=0)
    assert torch.equal(prepared.extras["eligible_steps_B"], reads_BT.sum(1))
    model.zero_grad()
    metrics = loss.backward(model, prepared, total_samples=len(batch))
    assert metrics["tokens"] == int(batch.extras["edit_draws_BTK"].ge(0).sum())
    assert metrics["ratio_sum"] == pytest.approx(metrics["tokens"], rel=1e-5)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    with pytest.raises(ValueError, match="with token editing the exact action is every draw"):
        build_loss(AgrpoConfig(draws="committed"), mask_id=MASK, pad_id=PAD, editing=True).backward(
            model, prepared, total_samples=len(batch))


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
