"""Per-step sampling math over [rows, V] bf16 logits: GB/s and % of the GPU's measured copy bandwidth.

    python -m benchmarks.bench_kernel --out benchmarks/results/kernel.md        # CUDA
    python -m benchmarks.bench_kernel --cpu --out benchmarks/results/kernel_cpu.md

Letters: N rows, V vocabulary. Methods, all on the same logits at the same temperature:
- copy: a device-to-device copy of the logits (bandwidth = bytes read + bytes written / time);
- llada_float64: LLaDA's generate() step: float64 Gumbel noise ``exp(x) / (-log u)**T``, argmax,
  softmax gather of the confidence (no logp/entropy/margin: it does not compute them);
- eager_fp32: ``sample_rows_reference`` (Philox noise, logp, entropy, margin, confidence);
- torch_compile: ``torch.compile`` of that reference;
- triton: the fused kernel ``sample_rows_triton``.
A method's GB/s counts one read of the logits (N * V * 2 bytes), the least any of them must move.
Timing: CUDA events, warm-up, median of repeats. ``--cpu`` runs small shapes, torch paths only.
A method that runs out of GPU memory is reported as "OOM".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="markdown results path; a .json beside it gets the raw numbers")
    p.add_argument("--cpu", action="store_true", help="small shapes on CPU, torch paths only")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="row counts (default 256 2048 8192; CPU 4 32)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 126464; CPU 8192)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def llada_float64_step(logits_NV, temperature: float):
    """LLaDA's add_gumbel_noise + argmax + low-confidence score, as its generate() does per step."""
    import torch

    x = logits_NV.to(torch.float64)
    u = torch.rand_like(x)
    token = (x.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    p = torch.softmax(logits_NV.float(), dim=-1)
    return token, p.gather(-1, token[:, None])[:, 0]


def _timer(device: str):
    """Return time_ms(fn): one call timed with CUDA events (GPU) or perf_counter (CPU)."""
    import torch

    def time_ms(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return time_ms


def _measure(fn, time_ms, warmup: int, repeats: int):
    """Median milliseconds of ``fn`` after warm-up, or None when it runs out of GPU memory."""
    import torch

    try:
        for _ in range(warmup):
            fn()
        return statistics.median(time_ms(fn) for _ in range(repeats))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(args) -> dict:
    """Measure every method at every row count; returns the JSON-ready results."""
    import torch

    from rollout.kernels import sample_rows_reference

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the small CPU shapes")
    rows = args.rows or ([4, 32] if args.cpu else [256, 2048, 8192])
    V = args.vocab or (8192 if args.cpu else 126_464)
    T = args.temperature
    time_ms = _timer(device)
    methods = {
        "llada_float64": lambda x, ids: llada_float64_step(x, T),
        "eager_fp32": lambda x, ids: sample_rows_reference(x, T, 1, ids),
    }
    if not args.cpu:
        from rollout.kernels.triton_sampling import sample_rows_triton

        compiled = torch.compile(sample_rows_reference, dynamic=False)
        methods["torch_compile"] = lambda x, ids: compiled(x, T, 1, ids)
        methods["triton"] = lambda x, ids: sample_rows_triton(x, T, 1, ids)

    results = []
    for N in rows:
        gen = torch.Generator(device=device).manual_seed(N)
        logits = (torch.randn(N, V, device=device, generator=gen) * 4).to(torch.bfloat16)
        ids = torch.arange(N, device=device)
        read_gb = logits.numel() * logits.element_size() / 1e9
        dst = torch.empty_like(logits)
        copy_ms = _measure(lambda: dst.copy_(logits), time_ms, args.warmup, args.repeats)
        del dst
        copy_gbs = 2 * read_gb / (copy_ms / 1e3)
        entry = {"rows": N, "vocab": V, "read_gb": read_gb, "copy_ms": copy_ms, "copy_gbs": copy_gbs, "methods": {}}
        for name, fn in methods.items():
            ms = _measure(lambda: fn(logits, ids), time_ms, args.warmup, args.repeats)
            gbs = None if ms is None else read_gb / (ms / 1e3)
            entry["methods"][name] = {"ms": ms, "gbs": gbs, "pct_copy": None if ms is None else 100 * gbs / copy_gbs}
        if "triton" in methods:
            want = sample_rows_reference(logits, T, 1, ids).token_N
            same = methods["triton"](logits, ids).token_N == want
            entry["triton_tokens_equal_reference"] = float(same.float().mean())
        results.append(entry)
        print(_row_line(entry), flush=True)
        del logits
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "temperature": T,
        "repeats": args.repeats,
        "results": results,
    }


def _row_line(entry) -> str:
    cells = [f"{entry['rows']:>5} rows: copy {entry['copy_gbs']:.3g} GB/s"]
    for name, m in entry["methods"].items():
        cells.append(f"{name} " + ("OOM" if m["ms"] is None else f"{m['ms']:.3f} ms ({m['pct_copy']:.3g}%)"))
    return " | ".join(cells)


def to_markdown(res: dict, command: str) -> str:
    """The results table: ms, GB/s and % of copy bandwidth per method and row count."""
    names = list(res["results"][0]["methods"])
    lines = [
        "# Fused sampling kernel benchmark",
        "",
        f"Command: `{command}`  ",
        f"Device: {res['device']}, torch {res['torch']}; temperature {res['temperature']}; "
        f"median of {res['repeats']} after warm-up. GB/s counts one read of the bf16 logits; "
        "% is of the measured copy bandwidth (read + write of the same bytes).",
        "",
        "| rows x V | one read (floor) | copy GB/s | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for e in res["results"]:
        floor_ms = e["read_gb"] / e["copy_gbs"] * 1e3
        cells = []
        for n in names:
            m = e["methods"][n]
            cells.append("OOM" if m["ms"] is None else f"{m['ms']:.3f} ms, {m['gbs']:.3g} GB/s ({m['pct_copy']:.3g}%)")
        head = f"| {e['rows']} x {e['vocab']} | {floor_ms:.3f} ms | {e['copy_gbs']:.3g} | "
        lines.append(head + " | ".join(cells) + " |")
    if res["device"] == "cpu":
        lines += ["", "CPU mode: torch paths on small shapes only, on whatever CPU ran it (a shared box gives noisy "
                  "numbers); the kernel's numbers come from a CUDA run."]
    eq = [e for e in res["results"] if "triton_tokens_equal_reference" in e]
    if eq:
        lines += ["", "Triton tokens equal to the reference's (same Philox stream): " + ", ".join(
            f"{e['rows']} rows {100 * e['triton_tokens_equal_reference']:.3f}%" for e in eq)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = _parse(argv)
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_kernel " + " ".join(sys.argv[1:] if argv is None else argv)
    md = to_markdown(res, command)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    print(md)


if __name__ == "__main__":
    main()
