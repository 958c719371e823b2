"""Reward throughput: completions scored per second on one core, for every task and prompt style.

    python -m benchmarks.bench_rewards --out benchmarks/results/rewards.md [--n 2000] [--quick]

Each task is scored on a fixed mix of completions built from its held-out items: a quarter solver/
reference answers (correct), a quarter mutated answers (well formed, wrong), a quarter free-text junk,
a quarter adversarial strings (deep parentheses, power towers, NUL bytes, 8 kB of digits). MATH uses a few
built-in problems. Pure Python: the number is per core.

Each chat task is measured twice: inline (``task.reward_timeout_s=0``) and in the reward child process
with a timeout (``common.tasks.guard``: one pipe round trip per completion), so the table shows what a
timeout that holds in any thread costs. ``cold start`` is one reward right after the child was stopped:
spawning Python and importing the task (math-verify for MATH): what a timed-out reward costs the next one
at most (the replacement child starts importing at once).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

MATH_ROWS = [
    {"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}"},
    {"problem": "Simplify sqrt(18).", "answer": "3\\sqrt{2}"},
    {"problem": "Expand (x+1)^2.", "answer": "x^2+2x+1"},
    {"problem": "What is 12 * 11?", "answer": "132"},
    {"problem": "Interval where x^2 < 1.", "answer": "(-1,1)"},
]

ADVERSARIAL = [
    "(" * 10_000, "9**9**9**9", "<answer>\\boxed{9^{9^{9^{9}}}}</answer>", "\x00" * 64,
    "__import__('os').system('true')", "9" * 8192, "<answer>" * 1000, "",
]


def mutate(text: str, rng: random.Random) -> str:
    """Change one digit of the answer: still well formed, almost always wrong."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits:
        return text + "1"
    i = rng.choice(digits[-8:])
    return text[:i] + str((int(text[i]) + 1 + rng.randrange(8)) % 10) + text[i + 1:]


def completion_mix(task, items, n: int, seed: int = 0) -> tuple[list[str], list]:
    rng = random.Random(seed)
    comps, its = [], []
    for k in range(n):
        item = items[k % len(items)]
        ref = task.reference_completion(item) or ""
        kind = k % 4
        if kind == 0:
            text = ref
        elif kind == 1:
            text = mutate(ref, rng)
        elif kind == 2:
            text = "".join(rng.choice("abc 123+-*/()\n<>") for _ in range(rng.randrange(1, 200)))
        else:
            text = ADVERSARIAL[(k // 4) % len(ADVERSARIAL)]
        comps.append(text)
        its.append(item)
    return comps, its


def bench(task, items, n: int) -> dict:
    from common.tasks.guard import GUARD

    comps, its = completion_mix(task, items, n)
    cold = None
    if task.reward_timeout_s:
        GUARD.close()
        t0 = time.perf_counter()
        task.reward(comps[0], its[0])
        cold = time.perf_counter() - t0
    for c, it in zip(comps, its):  # warm-up over the whole mix: lazy imports, gold-answer caches (steady state)
        task.reward(c, it)
    t0 = time.perf_counter()
    slowest = 0.0
    for c, it in zip(comps, its):
        s = time.perf_counter()
        task.reward(c, it)
        slowest = max(slowest, time.perf_counter() - s)
    dt = time.perf_counter() - t0
    return {"task": task.name, "style": task.cfg.prompt_style, "n": n, "seconds": dt, "timeout_s": task.reward_timeout_s,
            "completions_per_s": n / dt, "mean_us": 1e6 * dt / n, "max_ms": 1e3 * slowest, "cold_s": cold}


def _row(r: dict) -> str:
    timeout = f"{r['timeout_s']:g} s, child process" if r["timeout_s"] else "inline"
    cold = "–" if r["cold_s"] is None else f"{r['cold_s']:.2f}"
    return (f"| {r['task']} | {r['style']} | {timeout} | {r['n']} | {r['completions_per_s']:,.0f} | {r['mean_us']:,.0f} | "
            f"{r['max_ms']:.1f} | {cold} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="completions scored per task (MATH uses n/10)")
    ap.add_argument("--quick", action="store_true", help="200 completions per task (CI smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write the table and the command to")
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.n

    from common.config.task import TaskConfig
    from common.tasks import get_task

    rows = []
    for name in ("countdown", "sudoku", "gsm8k"):
        for style, timeout in (("compact", 0.0), ("chat", 0.0), ("chat", 5.0)):
            task = get_task(TaskConfig(name=name, prompt_style=style, reward_timeout_s=timeout))
            rows.append(bench(task, task.eval_items(256), n))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
        for timeout in (0.0, 5.0):
            task = get_task(TaskConfig(name="math", prompt_style="chat", data_dir=d, eval_file="math.jsonl",
                                       reward_timeout_s=timeout))
            rows.append(bench(task, task.eval_items(), max(n // 10, 40)))

    header = ("| task | style | reward timeout | completions | completions/s (1 core) | mean µs | slowest ms | cold start s |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [_row(r) for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    if args.out is not None:
        cmd = "python -m benchmarks.bench_rewards " + " ".join(argv if argv is not None else sys.argv[1:])
        md = (
            "# Reward throughput\n\n"
            f"Command: `{cmd}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, one process "
            "(shared 2-core CPU box; other jobs were running).\n\n"
            "Mix per task: 1/4 reference answers, 1/4 mutated answers, 1/4 random junk, 1/4 adversarial strings "
            "(10 kB of parentheses, power towers, NUL bytes, 8 kB of digits, 1000 unclosed tags, empty).\n"
            "MATH (math-verify, LaTeX parser only, guarded) runs on 5 built-in problems.\n"
            "Reward timeout: `inline` computes the reward in the caller's thread (no timeout can hold there off the "
            "main thread); `5 s, child process` runs it in the reward child (`common.tasks.guard`), one pipe round "
            "trip per completion, killed when late. The defaults: MATH 5 s in the child, the others inline. "
            "Cold start = the first reward after the child was stopped (spawn + imports), the most a timed-out "
            "reward costs the next one. Every row is steady state: the mix is scored once untimed first (lazy imports, "
            "gold-answer caches), then timed.\n\n"
            f"{table}\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


if __name__ == "__main__":
    main()
