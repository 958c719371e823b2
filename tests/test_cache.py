"""The block KV cache as part of the policy: the model's cached forward, the sampler's cache modes, and
the learner's exact rebuild (ratio 1 on fresh rollouts, gradients through both forwards).

Letters: B samples, P prompt length, G completion length, L = P + G, Q query columns, D model width.
"""
import copy

import pytest
import torch

from common.config import AgrpoConfig
from common.config.sampler import SamplerConfig
from common.model import build_model, preset_config
from learner.step_states import anchor_steps, policy_hidden, state_inputs
from learner.losses import build_loss
from learner.losses.base import sampler_logprobs
from rollout.sampler import generate
from tests.fakes import EosBiased

PAD, EOS, MASK, EOT = 0, 2, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; the tiny random model is conftest's ``model``


def _prompts(B: int, P: int, seed: int, pad_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_BP = torch.randint(5, 101, (B, P), generator=g)
    mask_BP = torch.ones(B, P, dtype=torch.bool)
    mask_BP[:pad_rows, : P // 2] = False
    return prompt_BP.masked_fill(~mask_BP, PAD), mask_BP


def _run(model, prompt_BP, mask_BP=None, seed=0, **cfg):
    return generate(model, prompt_BP, mask_BP, SamplerConfig(**cfg), mask_id=MASK, eos_id=EOS, eot_id=EOT,
                    pad_id=PAD, seed=seed)


def _worst_log_ratio(model, traj) -> float:
    """max |log p_learner - log p_sampler| over every drawn, committed token, each step rebuilt by
    ``policy_hidden`` (the learner's rebuild) with all rows at that step."""
    P = traj.prompt_ids_BP.shape[1]
    worst = 0.0
    for t in range(traj.num_steps):
        chosen_BG = (traj.unmask_step_BG == t) & ~traj.extras["filled_BG"]
        b_N, g_N = chosen_BG.nonzero(as_tuple=True)
        if len(b_N) == 0:
            continue
        with torch.no_grad():
            step_B = torch.full((len(traj),), t, device=traj.logp_BG.device)
            h_ND = policy_hidden(model, traj, step_B, MASK, traj.logp_BG.device).rows(b_N, P + g_N)
            logp_N = sampler_logprobs(model.vocab_logits(h_ND), traj.completion_ids_BG[b_N, g_N],
                                      temperature=traj.temperature, cutoff_N=traj.cutoff_BG[b_N, g_N],
                                      banned_ids=traj.banned_ids)
        worst = max(worst, (logp_N - traj.logp_BG[b_N, g_N]).abs().max().item())
    return worst


# --- the model's cached forward


def _independent_cached_forward(model, ids_BL, anchor_ids_BL, lo: int, hi: int):
    """Ground truth written out layer by layer without the model's cache code: queries [lo, hi) of
    ``ids_BL`` attend to keys/values that are the anchor forward's outside [lo, hi) and their own inside."""
    from common.model.layers import apply_rope, rope_cos_sin

    cfg = model.config
    B, L = ids_BL.shape
    cos, sin = rope_cos_sin(torch.arange(L).expand(B, L), cfg.head_dim, cfg.rope_theta)
    x_new, x_old = model.transformer.wte(ids_BL), model.transformer.wte(anchor_ids_BL)
    for blk in model.transformer.blocks:
        def qkv(x):
            h = blk.attn_norm(x)
            split = lambda t, n: t.view(B, L, n, cfg.head_dim).transpose(1, 2)  # noqa: E731
            q = apply_rope(split(blk.q_proj(h), cfg.n_heads), cos, sin)
            return q, apply_rope(split(blk.k_proj(h), cfg.n_kv_heads), cos, sin), split(blk.v_proj(h), cfg.n_kv_heads)

        def finish(x, q, k, v):
            scores = (q @ k.transpose(-1, -2)) / cfg.head_dim ** 0.5
            att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
            x = x + blk.attn_out(att)
            h = blk.ff_norm(x)
            return x + blk.ff_out(torch.nn.functional.silu(blk.ff_proj(h)) * blk.up_proj(h))

        q_old, k_old, v_old = qkv(x_old)
        q_new, k_new, v_new = qkv(x_new)
        inside = torch.zeros(L, dtype=torch.bool)
        inside[lo:hi] = True
        k_mix = torch.where(inside[None, None, :, None], k_new, k_old)
        v_mix = torch.where(inside[None, None, :, None], v_new, v_old)
        x_old, x_new = finish(x_old, q_old, k_old, v_old), finish(x_new, q_new, k_mix, v_mix)
    return model.transformer.ln_f(x_new)[:, lo:hi]


def test_cached_forward_matches_an_independent_layer_by_layer_computation(model):
    g = torch.Generator().manual_seed(0)
    anchor_BL = torch.randint(5, 101, (2, 20), generator=g)
    anchor_BL[:, 10:] = MASK
    ids_BL = anchor_BL.clone()
    ids_BL[:, 10:13] = torch.randint(5, 101, (2, 3), generator=g)  # the block moved on; the suffix stayed masked
    with torch.no_grad():
        _, kv = model.hidden_states(anchor_BL, return_kv=True)
        col_BQ = torch.arange(10, 14).expand(2, -1)
        cached = model.hidden_states(ids_BL[:, 10:14], kv_cache=kv, query_idx=col_BQ)
        truth = _independent_cached_forward(model, ids_BL, anchor_BL, 10, 14)
        full = model.hidden_states(ids_BL)[:, 10:14]
    torch.testing.assert_close(cached, truth, atol=2e-5, rtol=0)
    assert (cached - full).abs().max() > 1e-3  # the cache is a different function from the full forward


def test_cached_forward_at_the_anchor_state_equals_the_full_forward(model):
    ids_BL = torch.randint(5, 101, (3, 17))
    mask_BL = torch.ones(3, 17, dtype=torch.bool)
    mask_BL[0, :4] = False
    pos_BL = (mask_BL.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        h_BLD, kv = model.hidden_states(ids_BL, mask_BL, pos_BL, return_kv=True)
        col_BQ = torch.arange(9, 17).expand(3, -1)
        h_BQD = model.hidden_states(ids_BL[:, 9:], mask_BL, pos_BL[:, 9:], kv_cache=kv, query_idx=col_BQ)
    torch.testing.assert_close(h_BQD, h_BLD[:, 9:], atol=1e-5, rtol=0)


def test_gradient_flows_through_the_anchor_and_the_cached_forward(model):
    m = copy.deepcopy(model).train()
    anchor_BL = torch.randint(5, 101, (2, 12))
    anchor_BL[:, 6:] = MASK
    ids_BL = anchor_BL.clone()
    ids_BL[:, 6] = 7
    _, kv = m.hidden_states(anchor_BL, return_kv=True)
    h = m.hidden_states(ids_BL[:, 6:9], kv_cache=kv, query_idx=torch.arange(6, 9).expand(2, -1))
    # the last layer's cache feeds nothing else: its replaced columns get no gradient, the others do
    (g_kv,) = torch.autograd.grad(h.sum(), [kv.keys[-1]], retain_graph=True)
    assert g_kv[:, :, :6].abs().sum() > 0 and g_kv[:, :, 6:9].abs().sum() == 0
    # the parameters get gradient through the anchor forward too: cutting the cache off changes it
    w = m.transformer.blocks[0].k_proj.weight
    (g_through,) = torch.autograd.grad(h.sum(), [w])
    detached = type(kv)([k.detach() for k in kv.keys], [v.detach() for v in kv.values])
    h_cut = m.hidden_states(ids_BL[:, 6:9], kv_cache=detached, query_idx=torch.arange(6, 9).expand(2, -1))
    (g_cut,) = torch.autograd.grad(h_cut.sum(), [w])
    torch.testing.assert_close(h_cut, h)
    assert (g_through - g_cut).abs().max() > 1e-3 * g_cut.abs().max()


# --- the sampler's cache modes and the learner's rebuild


def test_anchor_steps_follow_blocks_and_refresh():
    step_B = torch.tensor([-1, 0, 3, 4, 5, 7, 9])
    assert anchor_steps(step_B, 4, None).tolist() == [0, 0, 0, 4, 4, 4, 8]
    assert anchor_steps(step_B, 4, 2).tolist() == [0, 0, 2, 4, 4, 6, 8]


def test_cache_changes_the_computation_but_not_the_first_step_of_each_block(model):
    prompt_BP, _ = _prompts(3, 6, 1)
    opts = dict(gen_length=16, block_length=8, steps=8, temperature=0.0)
    none = _run(model, prompt_BP, **opts)
    dual = _run(model, prompt_BP, cache="dual", **opts)
    assert dual.extras["cache"] == "dual" and none.extras["cache"] == "none"
    first_BG = (none.unmask_step_BG == 0)
    assert torch.equal(dual.unmask_step_BG == 0, first_BG)  # step 0 is a full forward in both
    torch.testing.assert_close(dual.logp_BG[first_BG], none.logp_BG[first_BG], atol=0, rtol=0)
    assert not torch.equal(dual.logp_BG, none.logp_BG)  # later steps read the cache


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=7, top_p=0.9, remasking="random", pad_rows=2),
        dict(temperature=0.7, logits_eos_inf=True, position_ids="packed", pad_rows=2, cache_refresh=2),
        dict(temperature=1.0, threshold=0.05, pad_rows=1),
        dict(temperature=0.9, remasking="margin", confidence_eos_eot_inf=True, position_ids="packed", pad_rows=3),
    ],
)
def test_fresh_cached_rollouts_have_ratio_one(model, cache, opts):
    opts = dict(opts)
    prompt_BP, mask_BP = _prompts(4, 6, 3, opts.pop("pad_rows", 0))
    traj = _run(model, prompt_BP, mask_BP, seed=5, gen_length=16, block_length=8, steps=8, cache=cache, **opts)
    assert _worst_log_ratio(model, traj) < 1e-5
    # the full-forward rebuild (what the learner did before the cache was part of the policy) is off
    plain = dict(traj.extras, cache="none")
    off = copy.copy(traj)
    off.extras = plain
    assert _worst_log_ratio(model, off) > 1e-3


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_learner_loss_sees_ratio_one_with_rows_at_different_blocks(model, cache):
    prompt_BP, mask_BP = _prompts(8, 6, 4, pad_rows=3)
    traj = _run(model, prompt_BP, mask_BP, seed=2, gen_length=24, block_length=8, steps=12, temperature=1.0,
                cache=cache, position_ids="packed")
    traj.rewards_B = torch.randn(8, generator=torch.Generator().manual_seed(0))
    traj.group_B = torch.arange(8) // 4
    loss = build_loss(AgrpoConfig(k_steps=4), mask_id=MASK, pad_id=PAD, eos_id=EOS)
    batch = loss.prepare(traj, seed=1)
    blocks = set((batch.extras["steps_BK"] // 4).flatten().tolist()) - {-1}
    assert len(blocks) > 1, "the micro-batch should mix rows at different blocks"
    m = loss.backward(model, batch, total_samples=8)
    model.zero_grad()
    assert m["tokens"] > 0 and m["clipped_tokens"] == 0 and m["abs_log_ratio_sum"] < 1e-5 * m["tokens"]


def test_cached_rebuild_gradient_is_the_same_with_activation_checkpointing(model):
    prompt_BP, mask_BP = _prompts(4, 6, 9, pad_rows=2)
    traj = _run(model, prompt_BP, mask_BP, seed=4, gen_length=16, block_length=8, steps=8, temperature=1.0,
                cache="prefix")
    step_B = torch.tensor([1, 2, 5, 7])
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        m.set_activation_checkpointing(ckpt)
        policy_hidden(m, traj, step_B, MASK, "cpu").h_BQD.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_eos_stopping_and_threshold_with_cache(model, cache):
    eos_model = EosBiased(model, EOS, 6.0)
    prompt_BP, mask_BP = _prompts(6, 5, 8, pad_rows=2)
    traj = _run(eos_model, prompt_BP, mask_BP, seed=3, gen_length=24, block_length=8, steps=12, temperature=0.8,
                cache=cache, stop_on_eos_block=True, threshold=0.5)
    assert not bool(traj.completion_ids_BG.eq(MASK).any())
    assert _worst_log_ratio(eos_model, traj) < 1e-5


def test_guidance_with_cache_matches_a_guided_rebuild(model):
    """The sampler side of classifier-free guidance under a cache (the learner does not train guided runs):
    rebuilt by hand from the two halves, each with its own anchor cache."""
    prompt_BP, mask_BP = _prompts(2, 6, 6, pad_rows=1)
    traj = _run(model, prompt_BP, mask_BP, gen_length=8, block_length=4, steps=4, temperature=0.8, cfg_scale=1.5,
                cache="dual", seed=1)
    P, scale = 6, 1.5
    for t in range(4):
        chosen_BG = traj.unmask_step_BG == t
        b_N, g_N = chosen_BG.nonzero(as_tuple=True)
        anchor = t - t % 2
        halves = []
        for un in (False, True):
            ids, attn, _ = state_inputs(traj, t, MASK)
            anc, _, _ = state_inputs(traj, anchor, MASK)
            if un:
                ids, anc = ids.clone(), anc.clone()
                ids[:, :P] = MASK
                anc[:, :P] = MASK
            with torch.no_grad():
                h_full, kv = model.hidden_states(anc, attn, return_kv=True)
                lo = P + (t // 2) * 4
                h = h_full if t == anchor else torch.cat(
                    [h_full[:, :lo], model.hidden_states(ids[:, lo:lo + 4], attn, kv_cache=kv,
                                                         query_idx=torch.arange(lo, lo + 4).expand(2, -1))], 1)
            halves.append(model.vocab_logits(h[b_N, P + g_N]).float())
        cond, uncond = halves
        logp_N = sampler_logprobs(uncond + (scale + 1) * (cond - uncond), traj.completion_ids_BG[b_N, g_N],
                                  temperature=0.8, cutoff_N=None, banned_ids=traj.banned_ids)
        torch.testing.assert_close(logp_N, traj.logp_BG[b_N, g_N], atol=1e-4, rtol=0)


class _RowEosModel(torch.nn.Module):
    """EOS made overwhelmingly likely in even rows of the batch only, so those rows stop after block 0 while
    the odd rows keep decoding (the LM head sees rows b-major: [B * R, D] or [B, Q, D])."""

    logit_shift = 0  # wraps a LLaDA model

    def __init__(self, base):
        super().__init__()
        self.base, self.B = base, None

    def hidden_states(self, input_ids, *args, **kwargs):
        self.B = input_ids.shape[0]
        return self.base.hidden_states(input_ids, *args, **kwargs)

    def vocab_logits(self, h):
        logits = self.base.vocab_logits(h)
        by_row = logits.view(self.B, -1, logits.shape[-1]) if logits.dim() == 2 else logits
        by_row[0::2, :, EOS] += 100.0
        return logits


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_rows_stopping_at_different_blocks_keep_their_eos_fill(model, cache):
    eos_model = _RowEosModel(model)
    prompt_BP, mask_BP = _prompts(4, 5, 8, pad_rows=1)
    traj = _run(eos_model, prompt_BP, mask_BP, seed=3, gen_length=24, block_length=8, steps=12, temperature=0.8,
                cache=cache, stop_on_eos_block=True)
    filled_B = traj.extras["filled_BG"].sum(1)
    assert filled_B.tolist() == [16, 0, 16, 0]
    assert bool(traj.completion_ids_BG[0::2].eq(EOS).all()) and not bool(traj.completion_ids_BG.eq(MASK).any())
    P = traj.prompt_ids_BP.shape[1]
    for t in range(traj.num_steps):
        chosen_BG = (traj.unmask_step_BG == t) & ~traj.extras["filled_BG"]
        with torch.no_grad():
            hidden = policy_hidden(eos_model, traj, torch.full((4,), t), MASK, "cpu")
            logits_BQV = eos_model.vocab_logits(hidden.h_BQD)
        b_N, g_N = chosen_BG.nonzero(as_tuple=True)
        logp_N = sampler_logprobs(logits_BQV[b_N, P + g_N - hidden.lo_B[b_N]], traj.completion_ids_BG[b_N, g_N],
                                  temperature=0.8, cutoff_N=None, banned_ids=traj.banned_ids)
        torch.testing.assert_close(logp_N, traj.logp_BG[b_N, g_N], atol=1e-4, rtol=0)


def test_cache_rule_travels_through_the_arrow_schema(model):
    import pyarrow as pa

    from common.schema import group_to_record_batch, table_to_trajectory

    prompt_BP, mask_BP = _prompts(2, 6, 2, pad_rows=1)
    traj = _run(model, prompt_BP, mask_BP, gen_length=8, block_length=4, steps=8, temperature=1.0, cache="prefix",
                cache_refresh=2)
    rb = group_to_record_batch(traj, group_id="g", task="t", worker_id="w", policy_version=0, rewards=[0.0, 1.0],
                               correct=[False, True], components={}, timings={"gen_seconds": 0.0, "reward_seconds": 0.0})
    back = table_to_trajectory(pa.Table.from_batches([rb]), pad_id=PAD)
    assert back.extras["cache"] == "prefix" and back.extras["cache_refresh"] == 2
    assert _worst_log_ratio(model, back) < 1e-5


def test_cache_options_are_validated():
    with pytest.raises(ValueError, match="cache_refresh needs a cache"):
        SamplerConfig(cache_refresh=2)
    with pytest.raises(ValueError, match="compile_forward"):
        SamplerConfig(cache="dual", compile_forward="default")


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_cached_rollouts_have_ratio_one(cache):
    cuda_model = build_model(preset_config("tiny"), seed=0, device="cuda").eval()
    prompt_BP, mask_BP = _prompts(4, 6, 3, pad_rows=2)
    traj = _run(cuda_model, prompt_BP.cuda(), mask_BP.cuda(), seed=5, gen_length=16, block_length=8, steps=8,
                temperature=1.0, top_k=9, cache=cache, position_ids="packed")
    assert _worst_log_ratio(cuda_model, traj) < 1e-4
