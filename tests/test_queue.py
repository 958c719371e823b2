"""The replay queue on a local Ray instance: back-pressure, staleness budget, atomic groups, producer death,
spill/recover and corrupted-spill detection."""
import asyncio
import sys

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import ray
import torch

from common.config import QueueConfig
from common.queue import ReplayQueueCore
from driver.queue_actor import ReplayQueue
from common.schema import group_to_record_batch
from common.spill import SpillCorruptError
from tests.fakes import random_trajectory

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # Workers cannot import this test module by name; ship its helpers (make_group, Producer) by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_group(group_id: str, version: int = 0, G: int = 4, gen: int = 16, steps: int = 8, seed: int = 0):
    """One well-formed group with random contents; ``seed`` makes its data distinguishable."""
    lens = torch.randint(1, 6, (G,), generator=torch.Generator().manual_seed(seed)).tolist()
    traj = random_trajectory(lens, gen, steps, seed=seed, block_length=8, temperature=1.0, cutoff_every=None)
    return group_to_record_batch(
        traj, group_id=group_id, task="t", worker_id="w", policy_version=version, rewards=[1.0] * G,
        correct=[True] * G, components={}, timings={"gen_seconds": 0.0, "reward_seconds": 0.0},
    )


def ids(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table.column("group_id").to_pylist()))


def put_in_order(q, groups) -> list[bool]:
    # An async actor may run concurrent calls in any order; FIFO is the order puts were admitted.
    return [ray.get(q.put.remote(g)) for g in groups]


def new_queue(groups_per_step=2, spill_dir=None, **cfg):
    return ReplayQueue.remote(QueueConfig(**cfg), groups_per_step, None if spill_dir is None else str(spill_dir))


def test_put_blocks_while_full_and_proceeds_after_get():
    q = new_queue(capacity_groups=2, max_staleness=10)
    assert put_in_order(q, [make_group("a"), make_group("b")]) == [True, True]
    blocked = q.put.remote(make_group("c"))
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert not ready  # back-pressure: the third put waits
    stats = ray.get(q.stats.remote())
    assert stats["depth"] == 2 and stats["admitted"] == 2
    assert ids(ray.get(q.get.remote(1))) == ["a"]  # a get on the same actor is not blocked by the put
    assert ray.get(blocked, timeout=30) is True
    assert ids(ray.get(q.get.remote(2))) == ["b", "c"]
    assert ray.get(q.stats.remote())["producer_wait_s"] > 0
    ray.kill(q)


def test_staleness_budget_admission():
    q = new_queue(groups_per_step=2, max_staleness=0)  # strictly synchronous
    assert ray.get(q.reserve.remote(2)) is True
    assert ray.get(q.reserve.remote(1)) is False  # the step's 2 groups are all running
    ray.get(q.release.remote(1))
    assert ray.get(q.reserve.remote(1)) is True  # a failed rollout's slot came back
    assert ray.get([q.put.remote(make_group("a")), q.put.remote(make_group("b"))]) == [True, True]
    assert ray.get(q.stats.remote())["running"] == 0
    ray.get(q.get.remote(2))
    assert ray.get(q.reserve.remote(1)) is False  # consumed, but version 0's budget is spent
    ray.get(q.set_version.remote(1))
    assert ray.get(q.reserve.remote(2)) is True and ray.get(q.reserve.remote(1)) is False
    ray.kill(q)

    q = new_queue(groups_per_step=2, max_staleness=1)  # one version ahead: 2 steps' worth may be in flight
    assert ray.get(q.reserve.remote(4)) is True and ray.get(q.reserve.remote(1)) is False
    ray.kill(q)


def test_stale_groups_are_dropped_and_counted():
    q = new_queue(max_staleness=1)
    ray.get(q.set_version.remote(3))
    assert ray.get(q.put.remote(make_group("old", version=1))) is False
    assert ray.get(q.put.remote(make_group("ok", version=2))) is True
    ray.get(q.set_version.remote(4))  # "ok" went stale while waiting: never delivered
    assert ray.get(q.get.remote(1, timeout_s=0.2)) is None
    stats = ray.get(q.stats.remote())
    assert stats["dropped_stale"] == 2 and stats["depth"] == 0 and stats["admitted"] == 1
    ray.kill(q)


def test_get_returns_whole_groups_only():
    q = new_queue(capacity_groups=8, max_staleness=10)
    ray.get(q.put.remote(make_group("g3", G=3)))
    assert ray.get(q.get.remote(2, timeout_s=0.2)) is None  # one group waiting: no partial answer
    put_in_order(q, [make_group("g5", G=5), make_group("g1", G=1)])
    table = ray.get(q.get.remote(2))
    assert ids(table) == ["g3", "g5"] and table.num_rows == 8
    assert ray.get(q.get.remote(1)).num_rows == 1
    with pytest.raises(ray.exceptions.RayTaskError, match="capacity_groups"):
        ray.get(q.get.remote(9))
    ray.kill(q)


@ray.remote
class Producer:
    def put_one(self, queue, ipc_bytes: bytes) -> bool:
        # The batch the queue receives is built here, so the object holding it is owned by this actor.
        # (Taking bytes rather than a Trajectory keeps torch out of this worker: seconds faster to start.)
        from common.schema import SCHEMA

        return ray.get(queue.put.remote(pa.ipc.read_record_batch(pa.py_buffer(ipc_bytes), SCHEMA)))


def test_group_survives_a_killed_producer():
    q = new_queue(max_staleness=10)
    expected = make_group("p", G=8, gen=2048, seed=7)  # ~0.5 MB: travels through the object store
    producer = Producer.remote()
    assert ray.get(producer.put_one.remote(q, expected.serialize().to_pybytes())) is True
    ray.kill(producer)
    table = ray.get(q.get.remote(1, timeout_s=30))
    assert table.column("completion_ids").to_pylist() == expected.column("completion_ids").to_pylist()
    assert table.column("logp").to_pylist() == expected.column("logp").to_pylist()
    ray.kill(q)


def test_spill_recovers_unconsumed_groups_after_the_queue_dies(tmp_path):
    q = new_queue(spill_dir=tmp_path, max_staleness=100, spill_file_bytes=20_000)
    put_in_order(q, [make_group(f"g{i}", seed=i) for i in range(6)])
    assert ids(ray.get(q.get.remote(2))) == ["g0", "g1"]
    assert ray.get(q.stats.remote())["spill_files"] > 1  # rotated by size
    ray.kill(q)  # a crash: no close, no flush beyond what put already did

    q = new_queue(spill_dir=tmp_path, max_staleness=100, spill_file_bytes=20_000)
    stats = ray.get(q.stats.remote())
    assert (stats["depth"], stats["recovered"], stats["admitted"], stats["consumed"]) == (4, 4, 6, 2)
    assert ids(ray.get(q.get.remote(1))) == ["g2"]
    assert ray.get(q.put.remote(make_group("g3", seed=3))) is True  # a retried put: not admitted twice
    ray.get(q.put.remote(make_group("g6", seed=6)))
    ray.kill(q)

    q = new_queue(spill_dir=tmp_path, max_staleness=100)
    table = ray.get(q.get.remote(4))
    assert ids(table) == ["g3", "g4", "g5", "g6"]
    assert table.slice(0, 4).column("logp").to_pylist() == make_group("g3", seed=3).column("logp").to_pylist()
    assert ray.get(q.get.remote(1, timeout_s=0.2)) is None  # nothing lost, nothing duplicated
    ray.kill(q)


# Corruption checks run the queue logic in-process: same code path, no actor start-up cost.


def _spill(tmp_path, n, **cfg):
    async def run():
        q = ReplayQueueCore(QueueConfig(max_staleness=100, spill_file_bytes=1, **cfg), 1, str(tmp_path))
        for i in range(n):
            await q.put(make_group(f"g{i}", seed=i))
        await q.close()

    asyncio.run(run())
    return sorted(tmp_path.glob("groups-*.arrows"))  # one group per file (spill_file_bytes=1)


def _recover(tmp_path, **cfg):
    async def run():
        q = ReplayQueueCore(QueueConfig(max_staleness=100, **cfg), 1, str(tmp_path))
        table = await q.get(q.stats()["depth"], timeout_s=0.1) if q.stats()["depth"] else None
        return q.stats(), [] if table is None else ids(table)

    return asyncio.run(run())


def test_corrupted_spill_record_is_detected_not_loaded(tmp_path):
    files = _spill(tmp_path, 3)
    data = bytearray(files[1].read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF  # one flipped byte inside the record body
    files[1].write_bytes(bytes(data))
    stats, got = _recover(tmp_path)
    assert got == ["g0", "g2"] and stats["spill_corrupt"] == 1
    with pytest.raises(SpillCorruptError, match="crc32|corrupted|malformed"):
        _recover(tmp_path, on_corrupt_spill="raise")


def test_a_flipped_byte_anywhere_in_a_spill_file_never_crashes_recovery(tmp_path):
    files = _spill(tmp_path / "src", 2)
    good, original = files[0].read_bytes(), files[1].read_bytes()
    for position in range(0, len(original), max(1, len(original) // 60)):
        data = bytearray(original)
        data[position] ^= 0xFF
        trial = tmp_path / f"trial-{position}"  # recovery consumes what it returns: a fresh copy each time
        trial.mkdir()
        (trial / files[0].name).write_bytes(good)
        (trial / files[1].name).write_bytes(bytes(data))
        stats, got = _recover(trial)
        assert got[:1] == ["g0"], position  # the good file is always recovered
        assert got == ["g0", "g1"] or stats["spill_corrupt"] >= 1, position


def test_truncated_spill_file_is_detected_not_loaded(tmp_path):
    files = _spill(tmp_path, 3)
    files[2].write_bytes(files[2].read_bytes()[:-200])  # a crash mid-write of the last group
    stats, got = _recover(tmp_path)
    assert got == ["g0", "g1"] and stats["spill_corrupt"] == 1
    with pytest.raises(SpillCorruptError, match="truncated"):
        _recover(tmp_path, on_corrupt_spill="raise")


def test_close_wakes_waiters_and_metrics_are_built():
    async def run():
        q = ReplayQueueCore(QueueConfig(capacity_groups=1, max_staleness=10), 1)
        assert q._metrics is not None  # Ray is up in this process: metrics export is on
        await q.put(make_group("a"))
        blocked_put = asyncio.create_task(q.put(make_group("b")))
        waiting_get = asyncio.create_task(q.get(1))
        first = await waiting_get
        assert ids(first) == ["a"] and await blocked_put is True
        waiting_get = asyncio.create_task(q.get(1, timeout_s=None))
        assert ids(await waiting_get) == ["b"]
        waiting_get = asyncio.create_task(q.get(1))
        await asyncio.sleep(0)
        await q.close()
        assert await waiting_get is None
        with pytest.raises(RuntimeError, match="closed"):
            await q.put(make_group("c"))
        with pytest.raises(ValueError, match="release"):
            q.release(1)

    asyncio.run(run())


_FATES = ("put", "put_stale", "reject", "lost")  # what became of one reserved slot of a rollout call


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(_FATES), min_size=1, max_size=3), st.booleans(),
                          st.integers(0, 3)), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_each_reservation_is_counted_once_over_rejects_failures_and_late_arrivals(calls, rnd):
    """Rollout calls reserve slots, then each slot is put (fresh or stale), rejected (over-long prompt, and the
    producer may report it twice) or lost with the producer; a failed call is released by the driver, possibly
    before some of its puts/rejections arrive (those are void: its unsettled prompts go out again). ``running``
    is always the slots of calls still open that nothing settled: never low (admission would exceed the
    staleness budget), and zero when every call is settled."""
    async def run():
        q = ReplayQueueCore(QueueConfig(capacity_groups=1000, max_staleness=1), 100)
        await q.set_version(10)
        events, owed = [], {}
        for c, (fates, fails, release_at) in enumerate(calls):
            fails = fails or "lost" in fates  # a call whose slot was lost failed
            assert q.reserve(len(fates))
            tag = f"0.{c}"
            owed[tag] = len(fates)
            mine = [(tag, fate, f"{tag}:p{i}:x") for i, fate in enumerate(fates) if fate != "lost"]
            mine += [(tag, "reject", f"{tag}:p{i}:x") for i, fate in enumerate(fates) if fate == "reject" and rnd.random() < 0.5]
            if fails:
                mine.insert(min(release_at, len(mine)), (tag, "release", [f"{tag}:p{i}:x" for i in range(len(fates))]))
            events.append(mine)
        settled: dict[str, set] = {tag: set() for tag in owed}  # the model: each slot settles once
        while any(events):
            mine = rnd.choice([e for e in events if e])  # calls interleave; each call's events stay in order
            tag, what, arg = mine.pop(0)
            if what == "release":  # returns the slots nothing settled: their prompts are dispatched again
                assert q.release_call(f"{tag}:", arg)["unsettled"] == [g for g in arg if g not in settled[tag]]
                owed[tag] = 0
                continue
            if what == "reject":
                q.reject([arg])
            else:
                admitted = await q.put(make_group(arg, version=10 if what == "put" else 0))
                assert not admitted or (what == "put" and owed[tag]), "a released call's late put was admitted"
            if owed[tag] and arg not in settled[tag]:
                settled[tag].add(arg)
                owed[tag] -= 1
            assert q.stats()["running"] == sum(owed.values()), (tag, what)
        assert q.stats()["running"] == 0

    asyncio.run(run())
