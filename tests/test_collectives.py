"""Collectives per learner step on 2 gloo ranks: gradients are reduced once per optimizer step, so the number
of reduce-scatter / all-reduce calls does not grow with the sampled steps K or the micro-batches M, and the
step (loss, gradients) is the one that reducing after every backward (``learner.reduce_every_backward``,
the old schedule) gives."""
import functools
import multiprocessing as mp

import pytest
import torch

from tests.tolerances import fp32_approx

K_VALUES, SEQ = (1, 4, 8), 6 + 8  # P + G of tests.test_losses.rollout(G=8)
MICRO_TOKENS = {1: 100 * SEQ, 3: 1 * SEQ}  # 6 samples over 2 ranks: 3 per rank -> 1 or 3 micro-batches
COUNTED = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


def _worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from common.config import AgrpoConfig, LearnerConfig, ModelConfig
    from common.model import build_model, preset_config
    from learner.losses import build_loss
    from learner.worker import LearnerRank
    from tests.test_losses import EOS, MASK, PAD, rollout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    counts = dict.fromkeys(COUNTED, 0)

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in COUNTED:  # FSDP2 calls these through the torch.distributed module at call time
        setattr(dist, name, counting(name, getattr(dist, name)))

    batch = rollout(build_model(preset_config("tiny"), seed=1), B=6, G=8, steps=8, block=4, seed=0)
    results = {}
    for k in K_VALUES:
        for m, tokens in MICRO_TOKENS.items():
            for every_backward in (False, True):
                cfg = LearnerConfig(num_cpus_per_rank=0.5, lr=1e-3, micro_batch_tokens=tokens,
                                    reduce_every_backward=every_backward)
                factory = functools.partial(build_loss, AgrpoConfig(k_steps=k, step_sampling="uniform"),
                                            mask_id=MASK, pad_id=PAD, eos_id=EOS)
                learner = LearnerRank(cfg, ModelConfig(preset="tiny"), rank=rank, world_size=2,
                                      loss_factory=factory, seed=0)
                learner.setup("127.0.0.1", 0)
                grads = {}
                step = learner.optimizer.step

                def record_then_step(step=step, grads=grads, model=learner.model):
                    # (full_tensor all-gathers: not counted, it is the test's own collective)
                    grads.update({n: p.grad.full_tensor().clone() for n, p in model.named_parameters()})
                    return step()

                learner.optimizer.step = record_then_step
                for name in counts:
                    counts[name] = 0
                metrics = learner.step(batch, step_seed=3)
                reduces = counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"]
                results[(k, m, every_backward)] = dict(
                    reduce_scatter=reduces, all_reduce=counts["all_reduce"], micro_batches=metrics["micro_batches"],
                    loss=metrics["loss"], grad_norm=metrics["grad_norm"], grads=grads)
    for (k, m, every), r in results.items():  # tensors do not cross the queue: send the largest gradient difference
        old = results[(k, m, True)]["grads"]
        r["grad_diff"] = max(float((g - old[n]).abs().max()) for n, g in r["grads"].items())
        r["grad_max"] = max(float(g.abs().max()) for g in r["grads"].values())
    for r in results.values():
        del r["grads"]
    out.put((rank, results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def counts():
    from learner.worker import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def test_reduce_calls_per_step_do_not_grow_with_k_or_micro_batches(counts):
    for rank in (0, 1):
        once = {(k, m): r["reduce_scatter"] for (k, m, every), r in counts[rank].items() if not every}
        assert {r["micro_batches"] for r in counts[rank].values()} == set(MICRO_TOKENS)
        assert len(set(once.values())) == 1, once  # the same whatever K and M
        assert min(once.values()) > 0  # the gradients were reduced at all
        every = {(k, m): r["reduce_scatter"] for (k, m, e), r in counts[rank].items() if e}
        assert every == {(k, m): k * m * once[(k, m)] for k, m in once}  # reduce_every_backward: K x M as many
        all_reduce = {r["all_reduce"] for (_, _, e), r in counts[rank].items() if not e}
        assert len(all_reduce) == 1, all_reduce


def test_reducing_once_gives_the_step_reducing_every_backward_gives(counts):
    for (k, m, every), new in counts[0].items():
        if every:
            continue
        old = counts[0][(k, m, True)]
        assert new["loss"] == fp32_approx(old["loss"])
        assert new["grad_norm"] == fp32_approx(old["grad_norm"]), (k, m)
        assert new["grad_max"] > 1e-3 and new["grad_diff"] <= 1e-6 * new["grad_max"], (k, m, new)
