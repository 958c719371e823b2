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
