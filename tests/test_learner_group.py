"""The learner group: 1 vs 2 gloo ranks under Ray and 1 vs 3 micro-batches give the same step; NaN guard;
HF export; object-store weight sync."""
import functools
import math

import pytest
import torch

from common.config import LearnerConfig, ModelConfig
from common.model import build_model, load_pretrained, preset_config
from common.trajectory import Trajectory
from learner.sft import build_sft_loss
from learner.worker import LearnerRank
from tests.tolerances import fp32_approx

MASK, PAD = 3, 0
MODEL = ModelConfig(preset="tiny")
SFT = functools.partial(build_sft_loss, mask_id=MASK)


def make_batch(B=5, P=4, G=8, seed=0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 101, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt[0, :1], prompt_mask[0, :1] = PAD, False
    zf, T = torch.zeros(B, G), 2
    return Trajectory(prompt, prompt_mask, torch.randint(5, 101, (B, G), generator=g),
                      torch.zeros(B, G, dtype=torch.long), zf, zf, zf, zf,
                      torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long))


# Loss and grad norm agree to fp32 summation-order rounding (tests/tolerances.py: relative to the value, since
# a grad norm of 15.7 has ulps of ~1e-6); parameters after AdamW agree to a few % of one step's size (lr = 1e-3):
# Adam divides by sqrt(v), which magnifies summation-order rounding on near-zero gradient entries.
PARAM_ATOL = 3e-5


def test_fp32_tolerance_is_relative_to_the_quantity():
    assert 15.719366 == fp32_approx(15.719368)  # two machines' two-rank grad norms (2 ulps apart)
    assert 15.7194 != fp32_approx(15.7204)
    assert 3e-7 == fp32_approx(0.0) and 0.5 != fp32_approx(0.5001)


def learner_cfg(**kw) -> LearnerConfig:
    return LearnerConfig(num_cpus_per_rank=0.5, lr=1e-3, **kw)


# --- in-process single rank (conftest.local_group: one gloo group of size 1 shared by the ranks built here)


def local_rank(cfg: LearnerConfig, loss_factory=SFT) -> LearnerRank:
    rank = LearnerRank(cfg, MODEL, rank=0, world_size=1, loss_factory=loss_factory, seed=0)
    rank.setup("127.0.0.1", 0)
    return rank


def test_one_and_three_micro_batches_give_the_same_step(local_group):
    seq = 12  # P + G
    whole = local_rank(learner_cfg(micro_batch_tokens=100 * seq))
    split = local_rank(learner_cfg(micro_batch_tokens=2 * seq))  # 5 samples -> 2 + 2 + 1
    for seed in range(2):
        a, b = whole.step(make_batch(seed=seed), step_seed=seed), split.step(make_batch(seed=seed), step_seed=seed)
        assert (a["micro_batches"], b["micro_batches"]) == (1, 3)
        assert a["loss"] == fp32_approx(b["loss"])
        assert a["grad_norm"] == fp32_approx(b["grad_norm"])
    sa, sb = whole.state_dict_for_sync(), split.state_dict_for_sync()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=PARAM_ATOL, rtol=0, msg=name)


class NanAfterFirst:
    """SFT whose loss turns NaN from the second step on (poisoned gradients included)."""

    def __init__(self):
        self.inner, self.calls = SFT(), 0

    def prepare(self, batch, *, seed):
        self.calls += 1
        return self.inner.prepare(batch, seed=seed)

    def backward(self, model, micro, *, total_samples, ref_model=None, before_backward=None):
        scale = 1.0 if self.calls == 1 else math.nan
        return self.inner.backward(model, micro, total_samples=total_samples / scale, before_backward=before_backward)


def test_nan_guard_skips_then_stops(local_group):
    rank = local_rank(learner_cfg(max_bad_steps=1), loss_factory=NanAfterFirst)
    assert rank.step(make_batch(), step_seed=0)["skipped"] == 0
    before = rank.state_dict_for_sync()
    metrics = rank.step(make_batch(), step_seed=1)
    assert metrics["skipped"] == 1 and metrics["version"] == 1 and not math.isfinite(metrics["loss"])
    after = rank.state_dict_for_sync()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="max_bad_steps"):
        rank.step(make_batch(), step_seed=2)


def test_a_loss_without_an_edit_form_refuses_a_token_editing_batch(local_group):
    """A batch decoded with token editing reaching a surrogate (a config mismatch) stops in one line instead of
    training on the first commits as if nothing was edited."""
    from common.config.algorithm import DiffuGrpoConfig
    from learner.losses import build_loss

    rank = local_rank(learner_cfg(), loss_factory=functools.partial(build_loss, DiffuGrpoConfig(), mask_id=MASK,
                                                                    pad_id=PAD))
    batch = make_batch()
    batch.extras["edit_draws_BTK"] = torch.full((len(batch), batch.num_steps, 4), -1)
    with pytest.raises(ValueError, match="decoded with token editing .* DiffuGrpoLoss does not score"):
        rank.step(batch, step_seed=0)


def test_lora_trains_only_adapters_and_syncs_merged_weights(local_group, tmp_path):
    cfg = learner_cfg(lora={"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["q_proj", "ff_out"]})
    rank = local_rank(cfg)
    base = {k: v.clone() for k, v in rank.state_dict_for_sync().items()}
    rank.step(make_batch(), step_seed=0)
    rank.step(make_batch(seed=1), step_seed=1)  # B starts at zero: the second step moves the merged weights
    synced = rank.state_dict_for_sync()
    assert set(synced) == set(build_model(preset_config("tiny")).state_dict())
    changed = {k for k in base if not torch.equal(base[k], synced[k])}
    assert changed and all(k.endswith(("q_proj.weight", "ff_out.weight")) for k in changed)
    # The HF export holds the same merged weights and no adapter keys.
    exported = load_pretrained(rank.export_hf(str(tmp_path / "hf"))).state_dict()
    assert all(torch.equal(exported[k], synced[k]) for k in synced) and set(exported) == set(synced)


def test_adapter_only_sync_merges_to_the_learners_weights(local_group):
    """LoRA over a checkpoint: only A and B travel; the rollout side's merge equals the learner's merged export."""
    from common.config.loader import REPO_ROOT
    from common.weights import load_views
    from rollout.lora_merge import AdapterMerge

    path = REPO_ROOT / "checkpoints" / "tiny-countdown-base"
    cfg = learner_cfg(lora={"enabled": True, "r": 4, "alpha": 8.0})
    rank = LearnerRank(cfg, ModelConfig(path=str(path)), rank=0, world_size=1, loss_factory=SFT, seed=0)
    rank.setup("127.0.0.1", 0)
    assert rank.sync_adapters
    rollout_model = load_pretrained(path)
    before = {k: v.clone() for k, v in rollout_model.state_dict().items()}
    for seed in range(2):  # B starts at zero: the second step moves the merged weights
        rank.step(make_batch(seed=seed), step_seed=seed)
    layout, adapter_bytes = rank.sync_layout(adapters=True)
    _, full_bytes = rank.sync_layout()
    assert {m.name.rsplit(".", 1)[1] for m in layout} == {"lora_A", "lora_B"}
    assert adapter_bytes < full_bytes / 2
    merge = AdapterMerge(rollout_model, layout, rank.lora_scales)
    load_views(merge.buffers, rank.sync_tensors(adapters=True))
    merge.apply(rollout_model)
    expected = rank.state_dict_for_sync()
    got = rollout_model.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(before[k], got[k]) for k in got), "the adapters never moved the weights"
    # The base of the merge stays the checkpoint: merging again does not compound.
    merge.apply(rollout_model)
    for name in expected:
        torch.testing.assert_close(rollout_model.state_dict()[name], expected[name], atol=1e-6, rtol=0)


def test_reference_model_is_a_frozen_copy_of_the_initial_policy(local_group):
    rank = LearnerRank(learner_cfg(), MODEL, rank=0, world_size=1, loss_factory=SFT, seed=0, ref_model=True)
    rank.setup("127.0.0.1", 0)
    initial = rank.state_dict_for_sync()
    rank.step(make_batch(), step_seed=0)
    ref = rank.full_state()["ref"]
    assert not any(p.requires_grad for p in rank.ref_model.parameters())
    assert set(ref) == set(initial) and all(torch.equal(ref[k], initial[k]) for k in initial)
    assert not all(torch.equal(v, rank.state_dict_for_sync()[k]) for k, v in initial.items())  # the policy moved


@pytest.mark.ray
def test_two_ranks_shard_the_reference_model(two_ranks):
    """Each rank holds only its shards of the frozen reference; gathered, it is the initial policy."""
    from learner.group import LearnerGroup

    group = LearnerGroup(learner_cfg(num_ranks=2), MODEL, loss_factory=SFT, seed=0, ref_model=True)
    try:
        initial = group.state_dict_for_sync()
        group.step(make_batch(), step_seed=0)
        state = group.full_state()
    finally:
        group.shutdown()
    assert set(state["ref"]) == set(initial)
    for name, tensor in initial.items():
        assert torch.equal(state["ref"][name], tensor), name


# --- two gloo ranks under Ray vs the single in-process rank
@pytest.fixture(scope="module")
def two_ranks():
    ray = pytest.importorskip("ray")
    from learner.group import LearnerGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # a group that fails to build must not leave Ray running for every later module
        group = LearnerGroup(learner_cfg(num_ranks=2, micro_batch_tokens=2 * 12), MODEL, loss_factory=SFT, seed=0)
        yield group
        group.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_one_and_two_ranks_give_the_same_step(local_group, two_ranks):
    one = local_rank(learner_cfg(micro_batch_tokens=100 * 12))
    for seed in range(2):  # 5 samples: rank 0 gets 3 (2 + 1), rank 1 gets 2 (2 + a zero-weight replay)
        a, b = one.step(make_batch(seed=seed), step_seed=seed), two_ranks.step(make_batch(seed=seed), step_seed=seed)
        assert a["loss"] == fp32_approx(b["loss"])
        assert a["grad_norm"] == fp32_approx(b["grad_norm"])
        assert a["samples"] == b["samples"] == 5 and b["micro_batches"] == 2
    assert one.version == two_ranks.version == 2
    sa, sb = one.state_dict_for_sync(), two_ranks.state_dict_for_sync()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=PARAM_ATOL, rtol=0, msg=name)


@pytest.mark.ray
def test_a_mixture_of_experts_takes_the_same_step_on_one_and_two_ranks(local_group, two_ranks):
    """LLaDA2's MoE under FSDP2 on two gloo ranks (each MoE block, its experts included, sharded across both),
    its routing replayed from the rollout: the same step, expert load and weights as one rank."""
    import dataclasses

    from common.config import AgrpoConfig
    from learner.group import LearnerGroup
    from learner.losses import build_loss
    from tests import test_families as fam

    _, traj = fam._routed_rollout("none")
    traj = dataclasses.replace(traj, rewards_B=torch.tensor([1.0, 0.0, 0.5]), group_B=torch.zeros(3, dtype=torch.long))
    factory = functools.partial(build_loss, AgrpoConfig(k_steps=2), mask_id=fam.MASK, pad_id=fam.PAD, eos_id=fam.EOS)
    moe = ModelConfig(preset="tiny-llada2")
    one = LearnerRank(learner_cfg(), moe, rank=0, world_size=1, loss_factory=factory, seed=0)
    one.setup("127.0.0.1", 0)
    two = LearnerGroup(learner_cfg(num_ranks=2), moe, loss_factory=factory, seed=0)
    try:
        a, b = one.step(traj, step_seed=0), two.step(traj, step_seed=0)
        sb = two.state_dict_for_sync()
    finally:
        two.shutdown()
    assert a["loss"] == fp32_approx(b["loss"]) and a["grad_norm"] == fp32_approx(b["grad_norm"])
    assert a["ratio_sum"] == fp32_approx(b["ratio_sum"]) and a["grad_norm"] > 0
    assert all(a[f"expert_share/{e}"] == fp32_approx(b[f"expert_share/{e}"]) for e in range(8))
    sa = one.state_dict_for_sync()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=PARAM_ATOL, rtol=0, msg=name)


@pytest.mark.ray
def test_hf_export_gives_identical_logits(two_ranks, tmp_path):
    two = two_ranks
    path = two.export_hf(str(tmp_path / "hf"))
    exported = load_pretrained(path)
    reference = build_model(preset_config("tiny"))
    reference.load_state_dict(two.full_state()["model"])
    ids = make_batch().sequences_BL
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)


@pytest.mark.ray
def test_two_ranks_start_from_the_checkpoint_rank_0_read(two_ranks):
    """Rank 1 builds on the meta device and gets its shard from rank 0: the result is the checkpoint."""
    from common.config.loader import REPO_ROOT
    from learner.group import LearnerGroup

    path = REPO_ROOT / "checkpoints" / "tiny-countdown-base"
    group = LearnerGroup(learner_cfg(num_ranks=2), ModelConfig(path=str(path)), loss_factory=SFT, seed=0)
    try:
        state = group.full_state()["model"]
    finally:
        group.shutdown()
    expected = load_pretrained(path).state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.float()), name


@pytest.mark.ray
def test_object_store_sync_makes_a_fresh_model_equal(two_ranks):
    from rollout.weight_sync import ObjectStoreReceiver

    two = two_ranks
    two.init_weight_sync("object_store")
    update = two.sync_weights()
    assert update.version == two.version and update.metrics["sync/gb_per_s"] > 0
    fresh = build_model(preset_config("tiny"), seed=123)
    assert ObjectStoreReceiver().receive(fresh, update) == two.version
    expected = two.state_dict_for_sync()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.ray
def test_nccl_transport_code_from_the_group_over_gloo(two_ranks):
    # On CPU the nccl transport runs over a gloo weight group: learner rank 0 broadcasts, this process receives.
    from rollout.weight_sync import NcclReceiver

    info = two_ranks.init_weight_sync("nccl", num_receivers=1)
    assert info["backend"] == "gloo" and info["world_size"] == 2
    pending = two_ranks.sync_weights(block=False)
    receiver = NcclReceiver(host=info["host"], port=info["port"], rank=1, world_size=2, backend="gloo",
                            device="cpu", bucket_bytes=info["bucket_bytes"])
    fresh = build_model(preset_config("tiny"), seed=321)
    assert receiver.receive(fresh) == two_ranks.version
    import ray

    assert ray.get(pending).metrics["sync/gb_per_s"] > 0
    expected = two_ranks.state_dict_for_sync()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
