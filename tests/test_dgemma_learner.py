"""DiffusionGemma through the run's machinery: the actor's unpadded canvas decoding, the Arrow record (schema
v6 canvas columns) and the learner's loss on batches that mix prompt lengths and calls, with ratio 1.

Letters: B rows, K canvases, S steps, C canvas length.
"""
import functools

import pyarrow as pa
import pytest
import torch

import common.model as M
from common.config import AgrpoConfig, AtpoConfig, LearnerConfig, ModelConfig, SamplerConfig, SpgConfig
from common.schema import group_to_record_batch, table_to_trajectory, validate_group
from common.tokenizers import CharTokenizer
from common.trajectory import Trajectory
from learner.losses import build_loss
from learner.losses.uniform_agrpo import uniform_agrpo_loss
from rollout.uniform_sampler import decoding_of, generate_canvases, generate_uniform
from tests.test_dgemma import model  # noqa: F401 - the fixture: the tiny preset with peaked distributions

pytestmark = pytest.mark.usefixtures("one_thread")
PAD, EOS = 0, 2
SAMPLER = SamplerConfig(gen_length=12, block_length=4, steps=18, uniform=dict(entropy_bound=6.0, confidence_threshold=5.0))
GROUP = 3


def _prompts(seed: int) -> list[list[int]]:
    """Three prompts of lengths 5, 7 and 6, each repeated for a group."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 101, (n,), generator=g).tolist() for n in (5, 7, 6) for _ in range(GROUP)]


def _table(model, calls=(0, 1)) -> pa.Table:
    """Two actor calls' groups through the wire format, as the replay queue hands them to the learner."""
    batches = []
    for call in calls:
        rows = _prompts(call)
        traj = generate_canvases(model, rows, SAMPLER, eos_id=EOS, pad_id=PAD, seed=call)
        for g in range(len(rows) // GROUP):
            sl = slice(g * GROUP, (g + 1) * GROUP)
            rewards = torch.rand(GROUP, generator=torch.Generator().manual_seed(10 * call + g)).tolist()
            batches.append(group_to_record_batch(
                traj.select(sl), group_id=f"c{call}:{g}", task="t", worker_id="w", policy_version=0,
                rewards=rewards, correct=[r > 0.5 for r in rewards], components={},
                timings={"gen_seconds": 0.0, "reward_seconds": 0.0}))
    return pa.Table.from_batches(batches)


def test_rows_decode_unpadded_by_prompt_length_as_generate_does(model):
    rows = _prompts(0)
    traj = generate_canvases(model, rows, SAMPLER, eos_id=EOS, pad_id=PAD, seed=4)
    d = decoding_of(SAMPLER)
    for n in (5, 6, 7):  # each length is one unpadded batch, seeded by the call's seed and the length
        idx = [i for i, r in enumerate(rows) if len(r) == n]
        torch.manual_seed(4 * 1_000_003 + n)
        rec = generate_uniform(model, torch.tensor([rows[i] for i in idx]), d, eos_token_id=EOS, pad_token_id=PAD)
        got = traj.completion_ids_BG[idx, :rec.sequences.shape[1] - n]
        assert torch.equal(got, rec.sequences[:, n:])
        assert torch.equal(traj.extras["step_logp_BKS"][idx], rec.logp)
    assert (traj.completion_ids_BG == PAD).any() and traj.num_steps == 3 * 6  # K x S steps; some rows ended


def test_the_canvas_record_round_trips_through_arrow_and_a_wrong_length_fails(model):
    traj = generate_canvases(model, _prompts(0)[:GROUP], SAMPLER, eos_id=EOS, pad_id=PAD, seed=0)
    table = _table(model, calls=(0,)).slice(0, GROUP)
    back = table_to_trajectory(table, PAD)
    for key in ("canvas_BKSC", "draws_BKSC", "accepted_BKSC", "active_BKS", "step_logp_BKS"):
        assert torch.equal(back.extras[key], traj.extras[key]), key
    assert back.extras["canvas_t_range"] == pytest.approx((0.4, 0.8))
    rb = table.to_batches()[0]
    i = rb.schema.get_field_index("canvas_logp")
    short = rb.set_column(i, rb.schema.field(i),
                          pa.array([r[:-1] for r in rb.column("canvas_logp").to_pylist()], pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="canvas_logp must hold 18 entries"):
        validate_group(short)


def test_the_learner_loss_on_a_mixed_batch_is_the_per_prompt_loss_with_ratio_one(model):
    """Rows of three prompt lengths from two calls, left-padded together by the learner: the loss strips the
    padding per length, so its gradient equals the sum of each unpadded bucket's, and the ratio is 1. (k_steps
    above T: stratified takes every acting step once, AGRPO's exact mean.)"""
    batch = table_to_trajectory(_table(model), PAD)
    loss = build_loss(AgrpoConfig(k_steps=64), mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)
    batch = loss.prepare(batch, seed=0)
    model.zero_grad()
    metrics = loss.backward(model, batch, total_samples=len(batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert metrics["abs_log_ratio_sum"] < 1e-4 * metrics["tokens"] and metrics["tokens"] > 0
    assert metrics["ratio_sum"] == pytest.approx(metrics["tokens"], rel=1e-6)

    from learner.losses.uniform_agrpo import canvas_record

    model.zero_grad()
    lengths = batch.prompt_mask_BP.sum(1)
    d = decoding_of(SAMPLER)
    total = 0.0
    for n in (5, 6, 7):
        rows = (lengths == n).nonzero()[:, 0]
        prompt, rec = canvas_record(batch, rows, n)
        assert not (prompt == PAD).any()
        part, _ = uniform_agrpo_loss(model, prompt, rec, d, batch.extras["advantages_B"][rows], total_samples=len(batch))
        part.backward()
        total += float(part.detach())
    assert metrics["loss"] == pytest.approx(total, abs=1e-6)
    for name, grad in got.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_the_learner_rank_steps_on_canvases_with_ratio_one_and_micro_batch_invariance(model, local_group, tmp_path):
    from learner.worker import LearnerRank

    M.save_pretrained(model, tmp_path)
    CharTokenizer().save(tmp_path)
    batch = table_to_trajectory(_table(model), PAD)
    # every acting step (the steps are drawn in prepare, on the whole batch, the same for any split)
    factory = functools.partial(build_loss, AgrpoConfig(k_steps=64), mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)
    steps = []
    for tokens in (1 << 20, 20):  # one micro-batch; then one row a micro-batch
        rank = LearnerRank(LearnerConfig(lr=1e-3, micro_batch_tokens=tokens), ModelConfig(path=str(tmp_path)),
                           rank=0, world_size=1, loss_factory=factory, seed=0)
        rank.setup("127.0.0.1", 0)
        steps.append((rank.step(batch, step_seed=0), rank.state_dict_for_sync()))
    (one, state_one), (many, state_many) = steps
    assert many["micro_batches"] == len(batch) and one["micro_batches"] == 1
    assert one["abs_log_ratio_sum"] < 1e-4 * one["scored_tokens"]  # the learner's own weights rebuild the rollouts
    assert one["grad_norm"] > 0 and one["grad_norm"] == pytest.approx(many["grad_norm"], rel=1e-5)
    for name in state_one:
        torch.testing.assert_close(state_one[name], state_many[name], atol=3e-5, rtol=0, msg=name)


@pytest.mark.parametrize("algo", [AgrpoConfig(k_steps=3, step_sampling="uniform"), AgrpoConfig(k_steps=3),
                                  AtpoConfig(k_steps=2, selection="sample"), AtpoConfig(k_steps=2, selection="topk")],
                         ids=["agrpo-uniform", "agrpo-stratified", "atpo-sample", "atpo-topk"])
def test_k_canvas_steps_weigh_each_acting_step_by_its_mean_share_unless_topk(model, algo):
    """The selected steps' weights average, over draws, to each acting step's 1/T_i (AGRPO's mean over the steps),
    within 6 standard errors of the Monte Carlo mean: the k-step estimate is unbiased for every selector but ATPO's
    top-k, which reallocates by design (deterministic, so its offset is exact)."""
    from learner.canvas_steps import acting_steps

    batch = table_to_trajectory(_table(model, calls=(0,)), PAD)
    loss = build_loss(algo, mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)
    acting = acting_steps(batch.extras["active_BKS"])
    target = acting / acting.sum((1, 2), keepdim=True)
    w = torch.stack([loss.prepare(batch, seed=s).extras["step_weights_BKS"] for s in range(400)])
    assert not (w * ~acting).any()  # only acting steps are ever scored
    off = (w.mean(0) - target).abs()
    if algo.name == "atpo" and algo.selection == "topk":
        assert float(off.max()) > 0.05
    else:
        se = w.std(0) / 400 ** 0.5
        assert bool((off <= 6 * se + 1e-6).all()), float((off / (se + 1e-9)).max())


def test_atpo_on_canvases_rescores_fresh_rollouts_with_ratio_one(model):
    batch = table_to_trajectory(_table(model), PAD)
    loss = build_loss(AtpoConfig(k_steps=2), mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)
    model.zero_grad()
    metrics = loss.backward(model, loss.prepare(batch, seed=0), total_samples=len(batch))
    assert metrics["abs_log_ratio_sum"] < 1e-4 * metrics["tokens"] and 0 < metrics["steps"] <= 2 * len(batch)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_estimators_without_a_canvas_form_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"algorithm.name=spg has no form for uniform-noise canvases .*\['agrpo', 'atpo'\]"):
        build_loss(SpgConfig(), mask_id=-1, pad_id=PAD, canvases=True)


def test_lora_adapts_the_tied_encoder_and_decoder_alike_and_syncs_with_ratio_one(model, local_group, tmp_path):
    """One adapter serves a decoder layer and its encoder twin (they hold the same weights): after a LoRA step
    the merged sync writes the same tensor under both names, a model loaded with it decodes rollouts the LoRA
    learner rescores with ratio 1, and the adapter-only merge of a rollout actor gives the same weights."""
    from learner.worker import LearnerRank
    from rollout.lora_merge import AdapterMerge

    M.save_pretrained(model, tmp_path)
    CharTokenizer().save(tmp_path)
    cfg = LearnerConfig(lr=1e-2, param_dtype="float32", lora=dict(enabled=True, r=4, alpha=8.0))
    factory = functools.partial(build_loss, AgrpoConfig(), mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)
    rank = LearnerRank(cfg, ModelConfig(path=str(tmp_path)), rank=0, world_size=1, loss_factory=factory, seed=0)
    rank.setup("127.0.0.1", 0)
    rank.step(table_to_trajectory(_table(model), PAD), step_seed=0)
    state = rank.state_dict_for_sync()
    enc, dec = "model.encoder.language_model.layers.1.self_attn.q_proj.weight", "model.decoder.layers.1.self_attn.q_proj.weight"
    assert torch.equal(state[enc], state[dec]) and not torch.equal(state[dec], model.state_dict()[dec])
    synced = M.load_pretrained(tmp_path).eval()
    synced.load_state_dict(state)
    metrics = rank.step(table_to_trajectory(_table(synced, calls=(2,)), PAD), step_seed=1)
    assert metrics["abs_log_ratio_sum"] < 1e-4 * metrics["scored_tokens"] and metrics["scored_tokens"] > 0
    adapters = {n: t for n, t in rank.sync_tensors(adapters=True)}
    layout, _ = rank.sync_layout(adapters=True)
    merged = M.load_pretrained(tmp_path).eval()
    merge = AdapterMerge(merged, layout, rank.lora_scales)
    for name, tensor in adapters.items():
        merge.buffers[name].copy_(tensor)
    merge.apply(merged)
    after = rank.state_dict_for_sync()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, after[name], rtol=0, atol=1e-6, msg=name)


def test_the_rollout_generator_decodes_a_dgemma_checkpoint_as_canvases(model, tmp_path):
    """The actor's ``Generator`` picks the canvas sampler by the checkpoint's family, for rollouts and held-out."""
    from common.config import TaskConfig
    from rollout.actor import Generator

    M.save_pretrained(model, tmp_path)
    CharTokenizer().save(tmp_path)
    gen = Generator(ModelConfig(path=str(tmp_path)), SAMPLER, TaskConfig(name="countdown", prompt_style="compact"),
                    device="cpu")
    items = gen.task.eval_items(3)
    traj = gen.generate(gen.encode_prompts(items), seed=0)
    assert traj.extras["canvas_BKSC"].shape == (3, 3, 6, 4) and traj.completion_ids_BG.shape == (3, 12)
    texts, rewards = gen.evaluate(items, SAMPLER, token_budget=1 << 20)
    assert len(texts) == len(rewards) == 3


def test_unmask_sft_trains_canvases_unpadded_by_prompt_length(model):
    """``unmask sft``'s loss for this family: each prompt length's rows as one unpadded batch, seeded by the
    step seed and the length; the gradient is the rows-weighted sum of those buckets' uniform-noise losses."""
    from learner.sft import build_sft_loss
    from learner.uniform_sft import uniform_sft_loss
    from rollout.sampler import pad_rows

    rows = _prompts(0)[::GROUP]  # lengths 5, 7, 6
    completion = torch.randint(5, 101, (len(rows), 8), generator=torch.Generator().manual_seed(1))
    ids, mask = pad_rows(rows, PAD)
    zeros = torch.zeros(len(rows), 8)
    batch = Trajectory(ids, mask.bool(), completion, torch.zeros(len(rows), 8, dtype=torch.long), zeros, zeros, zeros,
                       zeros, torch.zeros(len(rows), 1), torch.zeros(len(rows), 1), torch.zeros(len(rows), 1, dtype=torch.long))
    loss = build_sft_loss(mask_id=-1, canvases=True)
    model.zero_grad()
    metrics = loss.backward(model, loss.prepare(batch, seed=3), total_samples=len(rows))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for i, row in enumerate(rows):  # one row per length here
        part = uniform_sft_loss(model, torch.tensor([row]), completion[i:i + 1],
                                torch.Generator().manual_seed(3 * 1_000_003 + len(row))) / len(rows)
        part.backward()
        total += float(part.detach())
    assert metrics["loss"] == pytest.approx(total, rel=1e-6) and metrics["samples"] == 3
    for name, grad in got.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5, atol=1e-7, msg=name)
