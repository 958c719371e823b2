"""Checkpoints: save with 2 ranks, kill the group, resume with 1 rank: same step, version, data position,
model and optimizer state, and the same next step. Pruning and one-line errors."""
import functools
import shutil

import pytest
import torch

from common.config import LearnerConfig, ModelConfig
from common.model import CheckpointError
from common.trajectory import Trajectory
from learner.sft import build_sft_loss
from tests.tolerances import fp32_approx

pytestmark = pytest.mark.ray

MODEL = ModelConfig(preset="tiny")
SFT = functools.partial(build_sft_loss, mask_id=3)
PARAM_ATOL = 3e-5  # AdamW magnifies summation-order rounding on near-zero gradients (see test_learner_group)


def make_batch(B=4, P=4, G=8, seed=0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    zf, T = torch.zeros(B, G), 2
    return Trajectory(torch.randint(5, 101, (B, P), generator=g), torch.ones(B, P, dtype=torch.bool),
                      torch.randint(5, 101, (B, G), generator=g), torch.zeros(B, G, dtype=torch.long), zf, zf, zf, zf,
                      torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long))


def group(num_ranks: int):
    from learner.group import LearnerGroup

    cfg = LearnerConfig(num_ranks=num_ranks, num_cpus_per_rank=0.5, lr=1e-3, warmup_steps=3, keep_checkpoints=2,
                        micro_batch_tokens=24)
    return LearnerGroup(cfg, MODEL, loss_factory=SFT, seed=0)


def assert_same_state(a: dict, b: dict, atol: float = 0.0):
    assert a["version"] == b["version"] and a["step"] == b["step"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], atol=atol, rtol=0, msg=name)
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for name, state in a["optim"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["optim"]["state"][name][key], atol=atol, rtol=0, msg=f"{name}.{key}")
    for ga, gb in zip(a["optim"]["param_groups"], b["optim"]["param_groups"]):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


def test_resume_at_another_world_size(ray_local, tmp_path):
    two = group(2)
    two.step(make_batch(seed=0), step_seed=0)
    two.step(make_batch(seed=1), step_seed=1)
    path = two.save(str(tmp_path / "ckpt"), run_state={"epoch": 1, "index": 8})
    saved = two.full_state()
    after_two = two.step(make_batch(seed=2), step_seed=2)
    continued = two.full_state()
    two.shutdown()  # the group that wrote the checkpoint is gone

    one = group(1)
    meta = one.load(str(tmp_path / "ckpt"))  # the root resolves to its newest complete checkpoint
    assert meta["run_state"] == {"epoch": 1, "index": 8} and meta["world_size"] == 2
    assert one.version == 2
    assert_same_state(saved, one.full_state())
    after_one = one.step(make_batch(seed=2), step_seed=2)
    assert after_one["loss"] == fp32_approx(after_two["loss"])
    assert after_one["grad_norm"] == fp32_approx(after_two["grad_norm"])
    assert after_one["lr"] == after_two["lr"]  # the warm-up schedule resumed at the right step
    assert_same_state(continued, one.full_state(), atol=PARAM_ATOL)

    # --- keep_checkpoints=2 prunes older ones
    root = tmp_path / "rolling"
    for seed in range(3):
        one.save(str(root))
        one.step(make_batch(seed=seed), step_seed=seed)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]

    # --- missing and corrupt checkpoints give one-line errors
    with pytest.raises(CheckpointError, match="does not exist") as missing:
        one.load(str(tmp_path / "nope"))
    assert "\n" not in str(missing.value)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for shard in broken.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as corrupt:
        one.load(str(broken))
    assert "\n" not in str(corrupt.value) and "broken" in str(corrupt.value)
    one.shutdown()


def test_lora_checkpoint_holds_only_adapters_and_resumes_exactly(ray_local, tmp_path):
    """A LoRA base stays in the compute dtype and out of the checkpoint (it comes from model.path); resuming at
    another world size restores the adapters and their Adam state exactly."""
    import torch.distributed.checkpoint as dcp

    from common.config.loader import REPO_ROOT
    from learner.group import LearnerGroup

    model = ModelConfig(path=str(REPO_ROOT / "checkpoints" / "tiny-countdown-base"))

    def lora_group(num_ranks: int) -> LearnerGroup:
        cfg = LearnerConfig(num_ranks=num_ranks, num_cpus_per_rank=0.5, lr=1e-3, micro_batch_tokens=24,
                            param_dtype="bfloat16", lora={"enabled": True, "r": 4, "alpha": 8.0})
        return LearnerGroup(cfg, model, loss_factory=SFT, seed=0)

    two = lora_group(2)
    for seed in range(2):  # B starts at zero: the second step moves both A and B
        two.step(make_batch(seed=seed), step_seed=seed)
    path = two.save(str(tmp_path / "ckpt"), run_state={})
    saved = two.full_state()
    after_two = two.step(make_batch(seed=2), step_seed=2)
    continued = two.full_state()
    two.shutdown()

    base = {k: v for k, v in saved["model"].items() if not k.endswith(("lora_A", "lora_B"))}
    adapters = {k: v for k, v in saved["model"].items() if k not in base}
    assert {v.dtype for v in base.values()} == {torch.bfloat16} and {v.dtype for v in adapters.values()} == {torch.float32}
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    stored_model = {k.removeprefix("model.") for k in stored if k.startswith("model.")}
    assert stored_model == set(adapters)  # no base weight on disk
    stored_bytes = sum(m.size.numel() * m.properties.dtype.itemsize for m in stored.values() if hasattr(m, "size"))
    adapter_bytes = sum(v.numel() * 4 for v in adapters.values())
    assert 3 * adapter_bytes <= stored_bytes < 3 * adapter_bytes + 1024  # A, B, their two Adam moments (+ step counts)

    one = lora_group(1)
    one.load(path)
    assert_same_state(saved, one.full_state())  # the base from model.path, adapters and optimizer from the checkpoint
    after_one = one.step(make_batch(seed=2), step_seed=2)
    assert after_one["loss"] == fp32_approx(after_two["loss"])
    assert after_one["grad_norm"] == fp32_approx(after_two["grad_norm"])
    assert_same_state(continued, one.full_state(), atol=PARAM_ATOL)
    one.shutdown()
