"""The learner step with the policy-gradient losses: 1 vs 3 micro-batches and 1 vs 2 gloo ranks (under Ray)
give the same AGRPO/ATPO step, and ``algorithm.inner_epochs`` takes that many optimizer steps per batch."""
import functools

import pytest
import torch

from common.config import (
    AgrpoConfig, AtpoConfig, BgpoConfig, CoupledGrpoConfig, EspoConfig, JustGrpoConfig, LearnerConfig, ModelConfig, SpgConfig,
    TraceRLConfig, Wd1Config,
)
from learner.losses import build_loss
from learner.worker import LearnerRank
from tests.test_losses import EOS, MASK, PAD, rollout
from tests.tolerances import fp32_approx

MODEL = ModelConfig(preset="tiny")
PARAM_ATOL = 3e-5  # as tests/test_learner_group.py: Adam magnifies summation-order rounding
CONFIGS = {"agrpo": AgrpoConfig(k_steps=3, beta_kl=0.05), "atpo": AtpoConfig(k_steps=2)}
# The field's surrogates with their public defaults (KL on where they have one), two inner epochs each so the
# old values cached at the first visit meet an updated policy.
SURROGATES = {"wd1": Wd1Config(inner_epochs=2), "coupled_grpo": CoupledGrpoConfig(), "spg": SpgConfig(inner_epochs=2),
              "espo": EspoConfig(num_mc=2), "tracerl": TraceRLConfig(inner_epochs=2),
              "justgrpo": JustGrpoConfig(inner_epochs=2), "bgpo": BgpoConfig(num_mc=2, strata=2, inner_epochs=2)}


def loss_factory(name, **overrides):
    cfg = CONFIGS[name].model_copy(update=overrides)
    return functools.partial(build_loss, cfg, mask_id=MASK, pad_id=PAD, eos_id=EOS)


def learner_cfg(**kw) -> LearnerConfig:
    return LearnerConfig(num_cpus_per_rank=0.5, lr=1e-3, **kw)


@pytest.fixture(scope="module")
def batches():
    from common.model import build_model, preset_config

    model = build_model(preset_config("tiny"), seed=1)  # not the learner's weights: ratios differ from 1
    return [rollout(model, B=5, G=8, steps=8, block=4, seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def sequential_batches():
    """JustGRPO's decoding: one token a step, left to right."""
    from common.model import build_model, preset_config

    model = build_model(preset_config("tiny"), seed=1)
    return [rollout(model, B=5, G=8, steps=8, block=8, seed=s, remasking="sequential") for s in range(2)]




def local_rank(cfg: LearnerConfig, factory) -> LearnerRank:
    rank = LearnerRank(cfg, MODEL, rank=0, world_size=1, loss_factory=factory, seed=0, ref_model=True)
    rank.setup("127.0.0.1", 0)
    return rank


SEQ = 6 + 8  # P + G of the batches


def _same_steps(a: LearnerRank, b, batches):
    for seed, batch in enumerate(batches):
        ma, mb = a.step(batch, step_seed=seed), b.step(batch, step_seed=seed)
        assert ma["loss"] == fp32_approx(mb["loss"])
        assert ma["grad_norm"] == fp32_approx(mb["grad_norm"])
        assert ma["clipped_tokens"] == mb["clipped_tokens"] and ma["ratio_sum"] == fp32_approx(mb["ratio_sum"])
    sa, sb = a.state_dict_for_sync(), b.state_dict_for_sync()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=PARAM_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_and_three_micro_batches_give_the_same_step(local_group, batches, name):
    whole = local_rank(learner_cfg(micro_batch_tokens=100 * SEQ), loss_factory(name))
    split = local_rank(learner_cfg(micro_batch_tokens=2 * SEQ), loss_factory(name))  # 5 samples -> 2 + 2 + 1
    _same_steps(whole, split, batches)


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_surrogates_give_the_same_steps_with_one_and_three_micro_batches(local_group, batches, sequential_batches, name):
    batches = sequential_batches if name == "justgrpo" else batches
    factory = functools.partial(build_loss, SURROGATES[name], mask_id=MASK, pad_id=PAD, eos_id=EOS)
    whole = local_rank(learner_cfg(micro_batch_tokens=100 * SEQ), factory)
    split = local_rank(learner_cfg(micro_batch_tokens=2 * SEQ), factory)
    for seed, batch in enumerate(batches):
        ma, mb = whole.step(batch, step_seed=seed), split.step(batch, step_seed=seed)
        assert ma["optimizer_steps"] == mb["optimizer_steps"] == SURROGATES[name].inner_epochs
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
        assert ma.get("ratio_sum", 0.0) == pytest.approx(mb.get("ratio_sum", 0.0), rel=1e-6)
    sa, sb = whole.state_dict_for_sync(), split.state_dict_for_sync()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=PARAM_ATOL, rtol=0, msg=key)


def test_inner_epochs_take_that_many_optimizer_steps_per_batch(local_group, batches):
    one = local_rank(learner_cfg(), loss_factory("agrpo"))
    two = local_rank(learner_cfg(), loss_factory("agrpo", inner_epochs=2))
    m1, m2 = one.step(batches[0], step_seed=0), two.step(batches[0], step_seed=0)
    assert (m1["optimizer_steps"], m2["optimizer_steps"]) == (1, 2)
    assert one.version == two.version == 1  # one policy version per batch: rollouts see the batch's last weights
    assert m2["tokens"] == m1["tokens"] and m2["steps"] == 2 * m1["steps"]  # epoch 2 draws its own steps
    s1, s2 = one.state_dict_for_sync(), two.state_dict_for_sync()
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)


@pytest.fixture(scope="module")
def one_rank_steps(local_group, batches):
    """The single in-process rank's metrics and weights, taken before Ray starts in this process."""
    out = {}
    for name in sorted(CONFIGS):
        one = local_rank(learner_cfg(micro_batch_tokens=100 * SEQ), loss_factory(name))
        metrics = [one.step(batch, step_seed=seed) for seed, batch in enumerate(batches)]
        out[name] = (metrics, one.state_dict_for_sync())
    return out


@pytest.fixture(scope="module")
def two_rank_groups(one_rank_steps):
    ray = pytest.importorskip("ray")
    from learner.group import LearnerGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    groups = {name: LearnerGroup(learner_cfg(num_ranks=2, micro_batch_tokens=2 * SEQ), MODEL,
                                 loss_factory=loss_factory(name), seed=0, ref_model=True) for name in sorted(CONFIGS)}
    yield groups
    for group in groups.values():
        group.shutdown()
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_and_two_gloo_ranks_give_the_same_step(batches, one_rank_steps, two_rank_groups, name):
    # 5 samples: rank 0 gets 3 (2 + 1), rank 1 gets 2 (2 + a zero-weight replay)
    metrics, state = one_rank_steps[name]
    group = two_rank_groups[name]
    for seed, batch in enumerate(batches):
        ma, mb = metrics[seed], group.step(batch, step_seed=seed)
        assert mb["micro_batches"] == 2
        assert ma["loss"] == fp32_approx(mb["loss"])
        assert ma["grad_norm"] == fp32_approx(mb["grad_norm"])
        assert ma["clipped_tokens"] == mb["clipped_tokens"] and ma["ratio_sum"] == fp32_approx(mb["ratio_sum"])
    sb = group.state_dict_for_sync()
    for name_ in state:
        torch.testing.assert_close(state[name_], sb[name_], atol=PARAM_ATOL, rtol=0, msg=name_)
