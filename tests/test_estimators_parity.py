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

from common.config import Wd1Config
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


def assert_matches(ours: dict, public: dict, model, what: str):
    """Loss and gradient summary (norm, 8 random projections, three slices) within RTOL of the public ones."""
    got = H.grad_summary(model)
    scale = public["grad"]["norm"]
    assert ours["loss"] == pytest.approx(public["loss"], rel=RTOL, abs=1e-7), what
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
