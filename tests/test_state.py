"""The driver's run state: prompt positions, the done watermark and the prompt stream."""
import dataclasses
import types

import pytest

from driver.state import PromptStream, RunState, position_of


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
    from driver.train import Controller

    ctl = object.__new__(Controller)  # only what _collect touches
    ctl.state, ctl.failed_calls = RunState(), {}
    ctl.metrics = types.SimpleNamespace(log=lambda record: None)
    ctl.pool = RolloutPool(make_worker=None)
    stream = PromptStream(_items(), ctl.state)
    for c in range(20):
        trained, rejected, dropped = (f"0.{c}:{item.id}" for item in stream.take(3))
        ref = ray.put({"worker": "w", "groups": 1, "rejected_ids": [rejected], "dropped_ids": [dropped]})
        ctl.pool.busy[ref] = Call("w", f"0.{c}", [], 3)
        ctl._collect(ref)
        ctl.state.mark_trained([position_of(trained)])
    assert ctl.state.trained_below == 60 and ctl.state.trained_above == []


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
