"""Replay-queue throughput and its share of a rollout step.

    python -m benchmarks.bench_queue --out benchmarks/results/queue.md

Realistic groups (G=8 samples, ~64-token prompts, 256-token completions, T=128 steps, every column
filled) go through the ``ReplayQueue`` Ray actor on a local Ray instance, with and without spill:
- put latency: one ``ray.get(q.put.remote(rb))`` at a time, as a rollout actor does it;
- put throughput: many puts in flight; get throughput: ``get(groups_per_step)`` in a loop;
- the learner's ``table_to_trajectory`` on one step's table.
The queue's share of a rollout step is (conversion + put latency) / generation time of one group. The
generation time is the H100 anchor from DESIGN.md (LLaDA-8B, batch 8 at ~184 tok/s: 8x256 tokens ~11 s)
unless ``--gen-seconds`` gives another. CPU only; no GPU involved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ANCHOR_TOK_PER_S = 184.0  # DESIGN.md: LLaDA reference generate(), batch 8, one H100


def make_trajectory(G: int, prompt: int, gen: int, steps: int, seed: int):
    """A left-padded trajectory with realistic shapes (LLaDA's vocabulary and block length) and random values."""
    import torch

    from tests.fakes import random_trajectory

    lens = torch.randint(prompt // 2, prompt * 3 // 2 + 1, (G,), generator=torch.Generator().manual_seed(seed))
    return random_trajectory(lens.tolist(), gen, steps, seed=seed, vocab=126_000, block_length=32,
                             banned=(126081,), cutoff_every=2)


def to_group(traj, group_id: str):
    from common.schema import group_to_record_batch

    G = len(traj)
    return group_to_record_batch(
        traj, group_id=group_id, task="gsm8k", worker_id="rollout-0", policy_version=0,
        rewards=[1.0] * G, correct=[True] * G, components={"format": [1.0] * G, "answer": [0.0] * G},
        timings={"gen_seconds": 11.0, "reward_seconds": 0.01},
    )


def bench(groups, per_step: int, spill_dir: str | None) -> dict:
    """One queue actor: sequential put latency, pipelined put throughput, get throughput."""
    import ray

    from common.config import QueueConfig
    from driver.queue_actor import ReplayQueue

    warmup, groups = groups[:5], groups[5:]
    n = len(groups)
    cfg = QueueConfig(capacity_groups=n, max_staleness=10**6)
    q = ReplayQueue.remote(cfg, per_step, spill_dir)
    ray.get(q.stats.remote())
    for rb in warmup:  # first calls pay for imports and connections
        ray.get(q.put.remote(rb))
    ray.get(q.get.remote(len(warmup)))
    half = n // 2

    latencies = []
    for rb in groups[:half]:
        t0 = time.perf_counter()
        ray.get(q.put.remote(rb))
        latencies.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray.get([q.put.remote(rb) for rb in groups[half:]])
    put_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tables = [ray.get(q.get.remote(per_step)) for _ in range(n // per_step)]
    get_s = time.perf_counter() - t0
    stats = ray.get(q.stats.remote())
    assert stats["admitted"] == n + len(warmup) and stats["duplicates"] == 0, stats
    ray.get(q.close.remote())
    ray.kill(q)
    group_mb = sum(rb.nbytes for rb in groups) / n / 1e6
    piped = n - half
    got = per_step * (n // per_step)
    return {
        "put_latency_ms_median": 1e3 * statistics.median(latencies),
        "put_latency_ms_p90": 1e3 * sorted(latencies)[int(0.9 * len(latencies))],
        "put_groups_per_s": piped / put_s,
        "put_MB_per_s": piped * group_mb / put_s,
        "get_groups_per_s": got / get_s,
        "get_MB_per_s": got * group_mb / get_s,
        "spilled_MB": stats["spilled_bytes"] / 1e6,
        "table": tables[-1],
    }


def bench_in_process(groups, per_step: int) -> dict:
    """The same queue logic without Ray: what the actor itself spends per group (validate, copy, bookkeeping)."""
    import asyncio

    from common.config import QueueConfig
    from common.queue import ReplayQueueCore

    async def run():
        q = ReplayQueueCore(QueueConfig(capacity_groups=len(groups), max_staleness=10**6), per_step)
        t0 = time.perf_counter()
        for rb in groups:
            await q.put(rb)
        put_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(len(groups) // per_step):
            await q.get(per_step)
        return put_s, time.perf_counter() - t0

    put_s, get_s = asyncio.run(run())
    n, got, group_mb = len(groups), per_step * (len(groups) // per_step), groups[0].nbytes / 1e6
    return {
        "put_latency_ms_median": 1e3 * put_s / n, "put_latency_ms_p90": None,
        "put_groups_per_s": n / put_s, "put_MB_per_s": n * group_mb / put_s,
        "get_groups_per_s": got / get_s, "get_MB_per_s": got * group_mb / get_s,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=160, help="groups through the queue per setting")
    parser.add_argument("--per-step", type=int, default=16, help="groups per learner get")
    parser.add_argument("--G", type=int, default=8, help="samples per group")
    parser.add_argument("--prompt", type=int, default=64, help="mean prompt length (ragged +-50%%)")
    parser.add_argument("--gen", type=int, default=256, help="completion length")
    parser.add_argument("--steps", type=int, default=128, help="denoising steps T")
    parser.add_argument("--gen-seconds", type=float, default=None,
                        help="generation time of one group; default: DESIGN.md H100 anchor G*gen/184 tok/s")
    parser.add_argument("--out", type=Path, default=None, help="results file: JSON if it ends in .json, else markdown")
    args = parser.parse_args(argv)

    import ray
    import torch

    from common.schema import table_to_trajectory

    trajs = [make_trajectory(args.G, args.prompt, args.gen, args.steps, seed=i) for i in range(8)]
    t0 = time.perf_counter()
    groups = [to_group(trajs[i % 8], f"g{i:06d}") for i in range(args.groups + 5)]
    convert_ms = 1e3 * (time.perf_counter() - t0) / len(groups)
    group_mb = groups[0].nbytes / 1e6

    in_process = bench_in_process(groups, args.per_step)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = {"memory": bench(groups, args.per_step, None)}
        with tempfile.TemporaryDirectory() as tmp:
            results["spill"] = bench(groups, args.per_step, tmp)
    finally:
        ray.shutdown()

    table = results["memory"].pop("table")
    results["spill"].pop("table")
    results["in-process core, no Ray (mean)"] = in_process
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        traj = table_to_trajectory(table, pad_id=0)
    to_torch_ms = 1e3 * (time.perf_counter() - t0) / reps
    assert traj.completion_ids_BG.shape == (args.per_step * args.G, args.gen)

    gen_s = args.gen_seconds or args.G * args.gen / ANCHOR_TOK_PER_S
    share = {k: (convert_ms + r["put_latency_ms_median"]) / 1e3 / gen_s for k, r in results.items()}

    lines = [
        "# Replay queue benchmark",
        "",
        f"Command: `python -m benchmarks.bench_queue {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: CPU only, local Ray {ray.__version__} with num_cpus=2, torch {torch.__version__}; "
        "a shared 2-core box (other jobs running), so treat numbers as lower bounds.  ",
        f"Group: G={args.G}, prompt ~{args.prompt} (ragged), completion {args.gen}, T={args.steps}, all columns: "
        f"{group_mb:.3f} MB in Arrow. {args.groups} groups per setting, learner gets {args.per_step} groups at a time.",
        "",
        "| setting (through the Ray actor unless noted) | put latency median / p90 (ms) | put groups/s | put MB/s | get groups/s | get MB/s | share of rollout step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p90 = "–" if r["put_latency_ms_p90"] is None else f"{r['put_latency_ms_p90']:.2f}"
        lines.append(
            f"| {name} | {r['put_latency_ms_median']:.2f} / {p90} | {r['put_groups_per_s']:.0f} | "
            f"{r['put_MB_per_s']:.1f} | {r['get_groups_per_s']:.0f} | {r['get_MB_per_s']:.1f} | {100 * share[name]:.3f}% |"
        )
    lines += [
        "",
        f"- `group_to_record_batch` (rollout side, per group): {convert_ms:.2f} ms",
        f"- `table_to_trajectory` ({args.per_step} groups = {args.per_step * args.G} rows, learner side): {to_torch_ms:.2f} ms",
        f"- share of rollout step = (conversion + median put latency) / generation time of one group, "
        f"{gen_s:.2f} s ({'given' if args.gen_seconds else f'H100 anchor: {args.G}x{args.gen} tokens at {ANCHOR_TOK_PER_S:.0f} tok/s'}); "
        "target < 2%.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            payload = {"args": vars(args) | {"out": str(args.out)}, "group_MB": group_mb, "convert_ms": convert_ms,
                       "table_to_trajectory_ms": to_torch_ms, "generation_s": gen_s, "share": share, "results": results}
            args.out.write_text(json.dumps(payload, indent=2) + "\n")
        else:
            args.out.write_text(text)


if __name__ == "__main__":
    main()
