"""Where the time of a learner step goes at the LLaDA-8B shape on a GPU cluster, and what asynchrony buys: a
discrete-event simulation of the driver's own loop (driver/train.py) with costs from the H100 anchors.

    python -m benchmarks.sim_async --out benchmarks/results/sim_async.md

Costs (one H100, from ../shared/DESIGN.md "Measured anchors": a full forward of 32 sequences x 320 tokens of the
8B shape took 335 ms, 83 ms for 8: compute-bound and linear in tokens from batch 8 up, 32.7 us per token):
  rollout call of n groups = n x group_size sequences x sampler.steps full forwards of prompt + gen_length tokens
                 (sampler.cache none, as the preset; the sampling math is < 1% of a forward with the fused kernel
                 and is left out, as are rewards)
  learner step = groups_per_step x group_size trajectories x k_steps sampled steps, each a forward + the
                 activation-checkpointing recompute + the backward's activation gradients (3 forward-equivalents;
                 the frozen LoRA base needs no weight gradients), over learner GPUs at the forward's efficiency
                 (optimistic for the backward), + ``publish_s`` for the adapters' nccl broadcast (rank 0 takes part)
Loop rules, as driver/train.py and common/queue.py run them: an idle worker reserves prompts_per_call groups,
halving on refusal, under the queue's budget  (max_staleness + version + 1) x groups_per_step  minus the groups
admitted or running; the learner takes groups_per_step groups FIFO once they are there; a rollout uses the newest
weights whose broadcast finished before its call started (double-buffered: no worker waits for a publish).
Assumed, not measured: the prompt length (GSM8K chat prompts, --prompt), 8 GPUs a node, publish_s. Estimates to
check against the first cluster run's metrics (step_time_s, gen_seconds).
"""
from __future__ import annotations

import argparse
import heapq
from dataclasses import dataclass

TOKEN_FORWARD_S = 0.335 / (32 * 320)  # one H100, LLaDA-8B shape, compute-bound (batch >= 8)


@dataclass
class Shape:
    """The llada8b_gsm8k.yaml preset's numbers that set the costs."""

    prompt: int = 128
    gen_length: int = 384
    steps: int = 128
    group_size: int = 8
    groups_per_step: int = 8
    prompts_per_call: int = 4
    k_steps: int = 24
    gpus_per_node: int = 8
    publish_s: float = 1.0

    def call_s(self, groups: int) -> float:
        return groups * self.group_size * self.steps * (self.prompt + self.gen_length) * TOKEN_FORWARD_S

    def learn_s(self) -> float:
        tokens = self.groups_per_step * self.group_size * self.k_steps * (self.prompt + self.gen_length)
        return 3 * tokens * TOKEN_FORWARD_S / self.gpus_per_node + self.publish_s


def simulate(shape: Shape, workers: int, max_staleness: int, steps: int = 60, warmup: int = 10) -> dict[str, float]:
    """Seconds per learner step, idle shares and mean policy lag over ``steps`` steps after ``warmup``."""
    gps = shape.groups_per_step
    version, admitted, running = 0, 0, 0
    queue: list[int] = []  # versions of the waiting groups, FIFO
    idle = list(range(workers))
    events: list[tuple[float, int, str, tuple]] = []  # (time, tie-break, kind, payload)
    seq = 0
    learner_busy_until = None
    step_ends, lags, calls = [], [], []  # calls: (start, end) of every rollout call


    def dispatch(now: float) -> None:
        nonlocal running, seq
        while idle:
            n = shape.prompts_per_call
            while n > 0 and (max_staleness + version + 1) * gps - (admitted + running) < n:
                n //= 2
            if n == 0:
                return
            running += n
            wid = idle.pop(0)
            seq += 1
            calls.append((now, now + shape.call_s(n)))
            # the newest weights: the publish is inside the learner step, and a call swaps in the staged copy
            heapq.heappush(events, (calls[-1][1], seq, "call", (wid, n, version)))

    def feed(now: float) -> None:
        nonlocal learner_busy_until, seq, queue
        if learner_busy_until is None and len(queue) >= gps:
            batch, queue = queue[:gps], queue[gps:]
            lags.append(sum(version - v for v in batch) / gps)
            learner_busy_until = now + shape.learn_s()
            seq += 1
            heapq.heappush(events, (learner_busy_until, seq, "learn", ()))

    dispatch(0.0)
    while len(step_ends) < steps + warmup:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "call":
            wid, n, v = payload
            running -= n
            admitted += n
            queue += [v] * n
            idle.append(wid)
        else:
            version += 1
            learner_busy_until = None
            step_ends.append(t)
        feed(t)
        dispatch(t)
    t0, t1 = step_ends[warmup - 1], step_ends[-1]
    span = t1 - t0
    worker_busy = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in calls)
    return {"step_s": span / steps, "learner_idle": max(0.0, 1 - steps * shape.learn_s() / span),
            "rollout_idle": max(0.0, 1 - worker_busy / (workers * span)), "lag": sum(lags[warmup:]) / len(lags[warmup:])}


def table(shape: Shape, nodes: list[int], staleness: list[int]) -> list[str]:
    lines = ["| rollout nodes (GPUs) | max_staleness | s / step | speed-up vs sync | learner idle | rollout idle | mean lag |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n in nodes:
        sync = None
        for s in staleness:
            r = simulate(shape, n * shape.gpus_per_node, s)
            sync = sync or r["step_s"]
            lines.append(f"| {n} ({n * shape.gpus_per_node}) | {s} | {r['step_s']:.1f} | {sync / r['step_s']:.2f}x | "
                         f"{r['learner_idle']:.0%} | {r['rollout_idle']:.0%} | {r['lag']:.2f} |")
    return lines


def report(shape: Shape) -> str:
    nodes, staleness = list(range(1, 9)), [0, 1, 2, 4]
    one = Shape(**{**shape.__dict__, "prompts_per_call": 1})
    out = [
        "# Async at the LLaDA-8B shape: a simulation",
        "",
        "Written by `python -m benchmarks.sim_async --out benchmarks/results/sim_async.md` (model and assumptions "
        "in its docstring). Not a measurement: H100 forward anchors, the driver's dispatch and the queue's budget.",
        "",
        f"Shape: prompt {shape.prompt} (assumed) + gen {shape.gen_length}, {shape.steps} steps, cache none, "
        f"{shape.groups_per_step} groups x {shape.group_size} per learner step, k_steps {shape.k_steps}, "
        f"{shape.gpus_per_node} H100 a node, learner = 1 node, publish {shape.publish_s:.1f} s.",
        "",
        f"- rollout call of {shape.prompts_per_call} groups on one GPU: {shape.call_s(shape.prompts_per_call):.1f} s; "
        f"a step's {shape.groups_per_step} groups: {shape.call_s(shape.groups_per_step):.1f} GPU-seconds",
        f"- learner step on {shape.gpus_per_node} GPUs: {shape.learn_s():.1f} s "
        f"({shape.learn_s() * shape.gpus_per_node:.0f} GPU-seconds with the publish)",
        "",
        f"Reading: a synchronous step admits {shape.groups_per_step} groups, so at most "
        f"{shape.groups_per_step // shape.prompts_per_call} workers run at once at prompts_per_call "
        f"{shape.prompts_per_call} ({shape.groups_per_step} at 1) whatever the cluster; max_staleness s lets "
        f"(s + 1) x {shape.groups_per_step} groups run, and the step time falls until the learner "
        f"({shape.learn_s():.1f} s) or the rollout GPUs are the bottleneck.",
        "",
        f"## As the preset dispatches (prompts_per_call {shape.prompts_per_call})",
        "",
        *table(shape, nodes, staleness),
        "",
        "## With prompts_per_call 1 (a call per group: more workers can share a version's groups)",
        "",
        *table(one, nodes, staleness),
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=Shape.prompt, help="prompt tokens (assumed)")
    parser.add_argument("--publish-s", type=float, default=Shape.publish_s)
    parser.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    args = parser.parse_args()
    text = report(Shape(prompt=args.prompt, publish_s=args.publish_s))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
