"""The rollout pool's bookkeeping, without Ray: restarted actors, pending members."""
from driver.pool import RolloutPool


def test_a_call_from_another_process_means_the_actor_was_restarted():
    pool = RolloutPool(make_worker=lambda wid: None, info={"rollout-0": {"pid": 100, "node": "n1"}})
    assert not pool.restarted("rollout-0", 100)
    assert pool.restarted("rollout-0", 101)  # Ray restarted it between two calls: base weights now
    assert not pool.restarted("rollout-0", 101)  # reported once
    assert not pool.restarted("rollout-9", 5) and not pool.restarted("rollout-0", None)


def test_pending_workers_are_members_but_not_active():
    pool = RolloutPool(make_worker=lambda wid: None, workers={"rollout-0": object(), "rollout-1": object()},
                       pending={"rollout-1": (None, 0.0)})
    assert pool.members() == ["rollout-0", "rollout-1"]
    assert pool.active() == ["rollout-0"] and pool.idle() == ["rollout-0"] and pool.size == 1
