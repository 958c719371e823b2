"""The trajectory Arrow schema: round trip, versioning, ragged prompts, validation."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from common.schema import SCHEMA, SCHEMA_VERSION, VERSION_KEY, group_to_record_batch, table_to_trajectory, validate_group
from common.trajectory import Trajectory
from tests.fakes import random_trajectory

PAD = 0


def fake_trajectory(prompt_lens, gen=12, steps=6, seed=0, block_length=4, banned=(2, 4)) -> Trajectory:
    return random_trajectory(prompt_lens, gen, steps, seed=seed, block_length=block_length, banned=banned)


def to_batch(traj, group_id, version=3, **kw):
    B = len(traj)
    args = dict(
        group_id=group_id,
        task="gsm8k",
        worker_id="w0",
        policy_version=version,
        rewards=[float(i) for i in range(B)],
        correct=[i % 2 == 0 for i in range(B)],
        components={"format": [0.5] * B, "answer": [float(i) for i in range(B)]},
        timings={"gen_seconds": 1.5, "reward_seconds": 0.25},
    )
    args.update(kw)
    return group_to_record_batch(traj, **args)


def test_round_trip_with_ragged_prompts():
    t1 = fake_trajectory([3, 7, 5, 1], seed=1)
    t2 = fake_trajectory([9, 2, 4, 6], seed=2)
    table = pa.Table.from_batches([to_batch(t1, "a", version=3), to_batch(t2, "b", version=4)])
    out = table_to_trajectory(table, pad_id=PAD)

    assert out.prompt_ids_BP.shape == (8, 9) and out.prompt_ids_BP.dtype == torch.int64
    for i, (src, row) in enumerate([(t1, r) for r in range(4)] + [(t2, r) for r in range(4)]):
        real = src.prompt_ids_BP[row][src.prompt_mask_BP[row]]
        n = len(real)
        assert torch.equal(out.prompt_ids_BP[i, 9 - n:], real)  # left-padded: real tokens at the right
        assert (out.prompt_ids_BP[i, : 9 - n] == PAD).all()
        assert out.prompt_mask_BP[i].sum() == n and out.prompt_mask_BP[i, 9 - n:].all()
    for name in ("completion_ids_BG", "unmask_step_BG", "logp_BG", "entropy_BG", "margin_BG", "cutoff_BG",
                 "step_entropy_BT", "step_margin_BT", "step_committed_BT"):
        expected = torch.cat([getattr(t1, name), getattr(t2, name)])
        got = getattr(out, name)
        assert got.dtype == expected.dtype, name
        assert torch.equal(got, expected), name  # bitwise, -inf cut-offs included
    assert out.temperature == pytest.approx(0.9) and out.block_length == 4 and out.banned_ids == (2, 4)
    assert out.group_B.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert out.policy_version_B.tolist() == [3] * 4 + [4] * 4
    assert out.rewards_B.tolist() == [0.0, 1.0, 2.0, 3.0] * 2
    assert out.extras["group_ids"] == ["a", "b"]
    assert out.extras["correct_B"].tolist() == [True, False, True, False] * 2
    assert out.extras["reward_components"]["answer"].tolist() == [0.0, 1.0, 2.0, 3.0] * 2
    assert out.extras["reward_components"]["format"].tolist() == [0.5] * 8


def test_chunked_and_sliced_tables_read_like_one_batch():
    rbs = [to_batch(fake_trajectory([2, 5, 3], seed=s), f"g{s}") for s in range(3)]
    whole = table_to_trajectory(pa.Table.from_batches(rbs), PAD)
    sliced = table_to_trajectory(pa.Table.from_batches(rbs).slice(3, 6), PAD)
    assert torch.equal(sliced.completion_ids_BG, whole.completion_ids_BG[3:9])
    assert sliced.group_B.tolist() == [0, 0, 0, 1, 1, 1]


def test_version_mismatch_is_rejected_with_a_clear_message():
    rb = to_batch(fake_trajectory([2, 3]), "a")
    future = rb.replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION + 1).encode()})
    with pytest.raises(ValueError, match="schema version"):
        validate_group(future)
    with pytest.raises(ValueError, match="schema version"):
        table_to_trajectory(pa.Table.from_batches([future]), PAD)
    with pytest.raises(ValueError, match="unmask.schema_version"):
        validate_group(rb.replace_schema_metadata({}))


def test_validate_group_rejects_malformed_groups():
    rb1, rb2 = to_batch(fake_trajectory([2, 3], seed=1), "a"), to_batch(fake_trajectory([2, 3], seed=2), "b")
    with pytest.raises(ValueError, match="one group_id"):
        validate_group(pa.Table.from_batches([rb1, rb2]).combine_chunks().to_batches()[0])
    # logp one token short on row 0
    with pytest.raises(ValueError, match="logp"):  # row 0 one token short
        validate_group(_with_list(rb1, "logp", lambda rows: [rows[0][:-1]] + rows[1:]))
    with pytest.raises(ValueError, match="unmask_step"):  # step 99 of T=6
        validate_group(_with_list(rb1, "unmask_step", lambda rows: [[99] + r[1:] for r in rows]))


def _with_list(rb, name, edit):
    field = SCHEMA.field(name)
    return rb.set_column(SCHEMA.get_field_index(name), field, pa.array(edit(rb.column(name).to_pylist()), field.type))


def test_mixed_sampler_settings_in_one_batch_are_refused():
    a = to_batch(fake_trajectory([2, 3], block_length=4), "a")
    b = to_batch(fake_trajectory([2, 3], block_length=8), "b")
    with pytest.raises(ValueError, match="block_length"):
        table_to_trajectory(pa.Table.from_batches([a, b]), PAD)
    c = to_batch(fake_trajectory([2, 3], banned=(2,)), "c")
    with pytest.raises(ValueError, match="banned_ids"):
        table_to_trajectory(pa.Table.from_batches([a, c]), PAD)


def test_group_to_record_batch_checks_its_arguments():
    traj = fake_trajectory([2, 3])
    with pytest.raises(ValueError, match="one entry per sample"):
        to_batch(traj, "a", rewards=[1.0])
    with pytest.raises(ValueError, match="timings"):
        to_batch(traj, "a", timings={"gen_seconds": 1.0})
    big = fake_trajectory([2, 3])
    big.unmask_step_BG[0, 0] = 40000
    with pytest.raises(ValueError, match="int16"):
        to_batch(big, "a")
    rb = to_batch(fake_trajectory([2, 3], banned=()), "a", components={})
    out = table_to_trajectory(pa.Table.from_batches([rb]), PAD)
    assert out.extras["reward_components"] == {} and out.banned_ids == ()
    assert np.isfinite(rb.column("gen_seconds").to_numpy()).all()


def test_discarded_draws_round_trip_from_a_real_rollout():
    """The sampler's [B, G, S] discarded draws (ids, behaviour log-probs, top-k cut-offs) survive the
    ragged Arrow columns bitwise; a rollout without a support cut-off sends no cut-offs."""
    from common.model import build_model, preset_config
    from tests.test_losses import rollout

    model = build_model(preset_config("tiny"), seed=0)
    for sampler, has_cutoff in ((dict(top_k=7), True), (dict(), False)):
        traj = rollout(model, B=4, G=8, steps=8, block=4, **sampler)
        assert int((traj.discard_ids_BGS >= 0).sum()) > 0
        rb = to_batch(traj, "a")
        assert len(rb.column("discard_ids").flatten()) == int((traj.discard_ids_BGS >= 0).sum())  # ragged, no padding
        out = table_to_trajectory(pa.Table.from_batches([rb]), PAD)
        assert torch.equal(out.discard_ids_BGS, traj.discard_ids_BGS)
        assert torch.equal(out.discard_logp_BGS, traj.discard_logp_BGS)
        assert (out.discard_cutoff_BGS is not None) == has_cutoff
        if has_cutoff:
            assert torch.equal(out.discard_cutoff_BGS, traj.discard_cutoff_BGS)
        assert out.commit_reads_draws is True  # low-confidence remasking ranks the draws
    with pytest.raises(ValueError, match="discard_ids"):
        validate_group(_with_list(rb, "discard_ids", lambda rows: [rows[0][:-1]] + rows[1:]))


def test_an_old_version_spill_file_fails_in_one_clear_line(tmp_path):
    from common.spill import recover

    rb = to_batch(fake_trajectory([2, 3]), "a")
    old = rb.replace_schema_metadata({VERSION_KEY: b"2"})
    path = tmp_path / "groups-000000.arrows"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, old.schema) as writer:
        writer.write_batch(old)
    with pytest.raises(ValueError, match=rf"groups-000000\.arrows: trajectory schema version 2 but this code reads version {SCHEMA_VERSION}") as err:
        recover(tmp_path, on_corrupt="skip")
    assert "\n" not in str(err.value)
