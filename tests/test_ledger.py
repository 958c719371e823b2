"""The driver's ledger: prompt positions, the done watermark and the prompt stream."""
import dataclasses
import types

import pytest

from driver.ledger import Ledger, PromptStream, RunState, position_of


@dataclasses.dataclass
class Item:
    id: str


def _items():
    i = 0
    while True:
        yield Item(f"q{i}")
        i += 1


def test_a_group_id_without_a_position_is_a_value_error():
    assert position_of("3.14:p27:q27") == 27
    for bad in ("3.14:q27", "3.14:pp:q", "nocolon"):  # a ValueError under python -O too (not an assert)
        with pytest.raises(ValueError, match="prompt position"):
            position_of(bad)


def test_rejected_and_stale_dropped_prompts_are_marked_so_the_sparse_set_stays_bounded(ray_local):
    """Each call: one prompt trained, one refused as over-long, one dropped as stale. The driver marks the
    refused and dropped ones when their call comes back, so the watermark follows the stream."""
    import ray

    from driver.pool import Call, RolloutPool
    from driver.rollouts import Rollouts

    ledger = Ledger(_items, RunState())
    rollouts = Rollouts(None, RolloutPool(make_worker=None), None, ledger, None, types.SimpleNamespace(log=lambda r: None))
    stream = PromptStream(_items(), ledger.state)
    for c in range(20):
        trained, rejected, dropped = (f"0.{c}:{item.id}" for item in stream.take(3))
        ref = ray.put({"worker": "w", "groups": 1, "rejected_ids": [rejected], "dropped_ids": [dropped]})
        rollouts.pool.busy[ref] = Call("w", f"0.{c}", [], 3)
        rollouts.collect(ref, in_batch=set())
        ledger.trained([position_of(trained)])
    assert ledger.state.trained_below == 60 and ledger.state.trained_above == []


def test_in_flight_is_what_was_handed_out_and_is_not_done():
    state = RunState()
    stream = PromptStream(_items(), state)
    ids = [item.id for item in stream.take(6)]
    state.mark_trained([0, 1, 3])
    assert stream.in_flight(state) == {2, 4, 5}
    # A stream rebuilt from an older state (a checkpoint) skips what is in flight and hands out the rest again.
    again = PromptStream(_items(), RunState(trained_below=1), in_flight=stream.in_flight(state))
    assert [position_of(f"t:{item.id}") for item in again.take(3)] == [1, 3, 6]
    assert again.in_flight(RunState(trained_below=1)) == {1, 2, 3, 4, 5, 6}
    assert ids[0] == "p0:q0"


def test_a_rebuilt_learner_rolls_the_prompts_back_with_the_weights():
    """A learner rank died after step 4; the group comes back from the step-2 checkpoint. The prompts of
    steps 3-4 are dispatched again, those in flight are not: each prompt trained once in the weights' history."""
    ledger = Ledger(_items, RunState(incarnation=1))
    lineage = []  # (step, positions) of the weights' history

    def take():
        items, _ = ledger.take(2)
        return [position_of(f"t:{item.id}") for item in items]

    def step(positions):
        ledger.state.step += 1
        ledger.state.version += 1
        ledger.trained(positions)
        lineage.append((ledger.state.step, positions))

    batches = [take() for _ in range(6)]
    step(batches[0]), step(batches[1])
    checkpoint = ledger.state.to_dict()
    step(batches[2]), step(batches[3])
    ledger.roll_back_to(RunState.from_dict(checkpoint))
    lineage = [(s, p) for s, p in lineage if s <= 2]  # the rank's later steps went with its weights
    assert (ledger.state.step, ledger.state.version, ledger.state.call_id, ledger.state.incarnation) == (2, 2, 6, 1)
    step(batches[4]), step(batches[5])  # in the queue at the rebuild
    while ledger.state.step < 8:
        step(take())
    trained = [p for _, positions in lineage for p in positions]
    assert sorted(trained) == list(range(16)), "a prompt was trained twice, or lost, across the rebuild"
    assert ledger.state.trained_below == 16 and ledger.state.trained_above == []


def test_a_failed_calls_prompts_without_a_group_are_dispatched_again(ray_local):
    """A call of 3 prompts fails: the queue says one was refused (done) and two never produced a group; those
    two are the next ones handed out, so no position is left behind the watermark for the rest of the run."""
    import ray

    from driver.pool import Call, RolloutPool
    from driver.rollouts import Rollouts

    @ray.remote
    def died():
        raise RuntimeError("the rollout worker died")

    ledger = Ledger(_items, RunState())
    queue = types.SimpleNamespace(release_call=types.SimpleNamespace(
        remote=lambda prefix, ids: ray.put({"unsettled": ids[1:], "untrained": ids[:1]})))
    rollouts = Rollouts(types.SimpleNamespace(max_restarts=3), RolloutPool(make_worker=None), queue, ledger, None,
                        types.SimpleNamespace(log=lambda record: None))
    items = ledger.prompts.take(4)
    ref = died.remote()
    rollouts.pool.busy[ref] = Call("rollout-0", "0.0", items, 4)
    ray.wait([ref])
    rollouts.collect(ref, in_batch={3})  # a restarted queue forgot it handed p3's group to the learner
    assert ledger.state.trained_below == 1  # the refused prompt is done
    assert [item.id for item in ledger.prompts.take(3)] == ["p1:q1", "p2:q2", "p4:q4"]
