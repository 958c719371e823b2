"""The weight publisher's fault policy, the same for every transport: a slow or dead receiver is left out
(awaiting), the run goes on, and the receiver is brought back with the current version."""
import logging
import time

import pytest
import ray

from driver.pool import RolloutPool
from driver.publisher import WeightPublisher

pytestmark = pytest.mark.ray


class _Learner:
    def __init__(self):
        self.sent = 0

    def init_weight_sync(self, transport, n=0):
        return {}

    def sync_weights(self, block=True):
        self.sent += 1
        return {"version": self.sent}  # stands in for a WeightUpdate: workers only store it


@ray.remote(num_cpus=0)
class _Receiver:
    """A rollout worker's weights side: ``mode`` "ok", "slow" (busy in a long rollout), "fails" or
    "fails_once" (the first update's payload is gone)."""

    def __init__(self, mode):
        self.mode, self.versions = mode, []

    def set_weights(self, update):
        if self.mode == "fails" or (self.mode == "fails_once" and not self.versions):
            self.versions.append(None)
            raise RuntimeError("cannot open the IPC handle")
        if self.mode == "slow" and not self.versions:
            time.sleep(10)
        self.versions.append(update["version"])

    def held(self):
        return self.versions


def test_cuda_ipc_leaves_out_a_slow_or_failing_receiver_and_brings_it_back(ray_local, caplog):
    """cuda_ipc waits for the last version's receivers before reusing its one buffer: on CPU the same path
    runs with stand-in receivers. A timeout or a failure there ended the run; now it is a warning."""
    pool = RolloutPool(make_worker=None)
    for mode in ("ok", "slow", "fails"):
        pool.workers[mode] = _Receiver.remote(mode)
    ray.get([w.held.remote() for w in pool.workers.values()], timeout=120)  # started: only "slow" is slow
    pub = WeightPublisher(_Learner(), pool, "cuda_ipc", sync_timeout_s=3.0, base_is_shipped=False)
    with caplog.at_level(logging.WARNING, logger="unmask"):
        pub.publish(1, block=True)
        assert pub.awaiting == {"slow", "fails"}  # they get no rollouts or evaluation items
        pub.publish(2)  # waits on the last receivers again (3 s), then sends: nothing raises
    assert pub.awaiting == set()  # version 2's set_weights is queued behind on every worker
    assert ray.get(pool.workers["ok"].held.remote()) == [1, 2]
    assert ray.get(pool.workers["slow"].held.remote(), timeout=30) == [1, 2]  # brought back, in order
    warned = [r.getMessage() for r in caplog.records if "did not take the weights" in r.getMessage()]
    assert any("slow" in w and "no answer" in w for w in warned) and any("fails" in w and "failed" in w for w in warned)


@pytest.mark.parametrize("transport", ["object_store", "cuda_ipc"])
def test_a_joiner_whose_weights_fail_waits_for_a_catch_up_instead_of_rolling_out_stale(ray_local, caplog, transport):
    """A worker brought up with an update it cannot read (its owner, a learner rank, died) used to be
    dispatched anyway: it rolled out on base weights, every group dropped as stale, and nothing said why."""
    pool = RolloutPool(make_worker=None)
    pub = WeightPublisher(_Learner(), pool, transport, sync_timeout_s=3.0, base_is_shipped=False)
    pub.publish(1, block=True)
    for mode in ("ok", "fails_once"):
        pool.workers[mode] = _Receiver.remote(mode)
        pub.bring_up(mode, 1)
    assert pub.awaiting == {"ok", "fails_once"}  # no rollouts before their set_weights returned
    assert not pub.needs_catch_up()  # their calls are in flight: nothing to publish yet
    with caplog.at_level(logging.WARNING, logger="unmask"):
        deadline = time.time() + 120
        # until both calls are looked at (on a loaded machine "ok" may answer long before "fails_once" fails)
        while not (pub.needs_catch_up() and pub.awaiting == {"fails_once"}) and time.time() < deadline:
            time.sleep(0.1)
    assert pub.awaiting == {"fails_once"} and pub.needs_catch_up()
    assert any("fails_once did not take the weights" in r.getMessage() for r in caplog.records)
    pub.publish(1, block=True)  # the catch-up publish reaches it
    assert not pub.needs_catch_up() and pub.awaiting == set()
    assert ray.get(pool.workers["fails_once"].held.remote()) == [None, 2]
    assert ray.get(pool.workers["ok"].held.remote()) == [1, 2]
