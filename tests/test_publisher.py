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
    """A rollout worker's weights side: ``mode`` "ok", "slow" (busy in a long rollout) or "fails"."""

    def __init__(self, mode):
        self.mode, self.versions = mode, []

    def set_weights(self, update):
        if self.mode == "fails":
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
