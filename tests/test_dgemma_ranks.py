"""DiffusionGemma on two gloo learner ranks: AGRPO (exact and stop-gradient scores) and unmask-sft's loss take the
step one rank takes, on batches whose two halves hold different numbers of prompt lengths. Each length is its own
encoder cache and canvas steps, so the ranks' passes differ; they agree on them and the short rank makes
zero-weight ones, or FSDP's collectives would not pair up (without that, this test times out or errors).
"""
import datetime
import functools
import multiprocessing as mp

import pytest
import torch

import common.model as M
from common.config import AgrpoConfig, LearnerConfig, ModelConfig
from common.schema import table_to_trajectory
from common.tokenizers import CharTokenizer
from common.trajectory import Trajectory
from learner.losses import build_loss
from learner.sft import build_sft_loss
from learner.worker import LearnerRank, free_port, shard_bounds
from tests.test_dgemma import model  # noqa: F401 - the fixture: the tiny preset with peaked distributions
from tests.test_dgemma_learner import EOS, GROUP, PAD, _table
from tests.test_learner_group import PARAM_ATOL
from tests.tolerances import fp32_approx

# k=2 stratified: rank 0's first pass replays 3 + 4 + 4 steps of three canvases, rank 1's 1 + 1 + 3 (agreeing
# on the number of passes alone would not do: the exact score's chain of steps sets FSDP's collectives too)
CASES = {"agrpo-exact": AgrpoConfig(k_steps=2),
         "agrpo-stop-gradient": AgrpoConfig(k_steps=2, step_sampling="uniform", canvas_score="stop_gradient"),
         "sft": None}


def _factory(name: str):
    if CASES[name] is None:
        return functools.partial(build_sft_loss, mask_id=-1, canvases=True)
    return functools.partial(build_loss, CASES[name], mask_id=-1, pad_id=PAD, eos_id=EOS, canvases=True)


def _step(name: str, path: str, batch: Trajectory, rank: int, world_size: int) -> tuple[dict, dict | None]:
    learner = LearnerRank(LearnerConfig(lr=1e-3, micro_batch_tokens=1 << 20), ModelConfig(path=path), rank=rank,
                          world_size=world_size, loss_factory=_factory(name), seed=0)
    learner.setup("127.0.0.1", 0)
    return learner.step(batch, step_seed=0), learner.state_dict_for_sync()


def _worker(rank: int, port: int, path: str, batches: dict, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a collective left unpaired fails in seconds instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                           timeout=datetime.timedelta(seconds=120))
    try:
        steps = {name: _step(name, path, batch, rank, 2) for name, batch in batches.items()}
        # tensors cross the queue by value (a shared-memory handle dies with this process)
        out.put((rank, {name: (m, state and {k: v.numpy() for k, v in state.items()})
                        for name, (m, state) in steps.items()}))
    except Exception as e:  # tell the parent now, or it waits out its timeout
        out.put((rank, f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        dist.destroy_process_group()


def _buckets(batch: Trajectory, rank: int) -> int:
    lo, hi = shard_bounds(len(batch), 2, rank)
    return len(set(batch.prompt_mask_BP[lo:hi].sum(1).tolist()))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):  # noqa: F811
    """The peaked tiny DiffusionGemma, saved for the learners to load."""
    path = tmp_path_factory.mktemp("dgemma")
    M.save_pretrained(model, path)
    CharTokenizer().save(path)
    return model, str(path)


@pytest.fixture(scope="module")
def batches(checkpoint) -> dict[str, Trajectory]:
    """Rollouts of prompt lengths 5 | 7 6 (rank 0 gets one length, rank 1 two) and SFT pairs of lengths
    5 5 5 | 7 6 4 (one, then three)."""
    from rollout.sampler import pad_rows

    policy, _ = checkpoint
    rollouts = table_to_trajectory(_table(policy), PAD)  # groups of lengths 5 7 6 from call 0, then call 1
    order = [g * GROUP + i for g in (0, 3, 1, 2) for i in range(GROUP)]
    rl = rollouts.select(torch.tensor(order))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 101, (n,), generator=g).tolist() for n in (5, 5, 5, 7, 6, 4)]
    ids, mask = pad_rows(prompts, PAD)
    B, G = len(prompts), 8
    zeros = torch.zeros(B, G)
    sft = Trajectory(ids, mask.bool(), torch.randint(5, 101, (B, G), generator=g),
                     torch.zeros(B, G, dtype=torch.long), zeros, zeros, zeros, zeros,
                     torch.zeros(B, 1), torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long))
    out = {name: sft if CASES[name] is None else rl for name in CASES}
    for batch in out.values():
        assert _buckets(batch, 0) < _buckets(batch, 1)
    return out


@pytest.fixture(scope="module")
def two_ranks(checkpoint, batches) -> dict:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, checkpoint[1], batches, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = [v for v in got.values() if isinstance(v, str)]
    assert not failed and all(p.exitcode == 0 for p in procs), failed
    return got[0]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_take_the_one_rank_step_on_mixed_prompt_lengths(name, checkpoint, batches, two_ranks, local_group):
    one, state_one = _step(name, checkpoint[1], batches[name], rank=0, world_size=1)
    two, state_two = two_ranks[name]
    state_two = {k: torch.from_numpy(v) for k, v in state_two.items()}
    assert one["grad_norm"] > 0 and one["loss"] != 0
    assert one["loss"] == fp32_approx(two["loss"]) and one["grad_norm"] == fp32_approx(two["grad_norm"])
    if CASES[name] is not None:  # the same steps scored, rebuilt with ratio 1
        assert one["scored_tokens"] == two["scored_tokens"] > 0
        assert two["abs_log_ratio_sum"] < 1e-4 * two["scored_tokens"]
    for key in state_one:
        torch.testing.assert_close(state_one[key], state_two[key], atol=PARAM_ATOL, rtol=0, msg=key)
