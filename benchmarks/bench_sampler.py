"""End-to-end sampler throughput (completion tokens/s): our sampler against LLaDA's reference generate().

Other families (``--preset dream-7b`` / ``sdar-8b``) decode with their family's settings (Dream's timestep
schedule, SDAR's sequence grid with blocks of its block_size) and have no reference row.

    python -m benchmarks.bench_sampler --out benchmarks/results/sampler.md          # CUDA, LLaDA-8B shape
    python -m benchmarks.bench_sampler --cpu --out benchmarks/results/sampler_cpu.md
    # the forward compiled at the larger batches too (each shape compiles once, ~minutes for 8B):
    python -m benchmarks.bench_sampler --batches 8 32 --compile-batches 8 32 --compile-modes default \
        --out benchmarks/results/sampler_compiled.md

GPU mode: LLaDA-8B shape with random bf16 weights, prompt 64, gen 256, block 32, 128 steps, batch 1/8/32,
temperature 0 and 0.9; at batch 1 also our sampler with the model forward under torch.compile
(``--compile-modes``, 'reduce-overhead' = CUDA graphs). CPU mode: the tiny model on small shapes, same table.
A run that runs out of GPU memory is reported as "OOM". Reference = tests/llada_reference.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="markdown results path; a .json beside it gets the raw numbers")
    p.add_argument("--cpu", action="store_true", help="tiny model on CPU with small shapes")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.9])
    p.add_argument("--compile-modes", nargs="*", default=None,
                   help="torch.compile modes of the forward to add at --compile-batches "
                        "(default: reduce-overhead and default on CUDA, none on CPU)")
    p.add_argument("--compile-batches", type=int, nargs="+", default=[1])
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default 64 GPU / 16 CPU)")
    p.add_argument("--gen", type=int, default=None, help="gen_length (default 256 GPU / 64 CPU)")
    p.add_argument("--block", type=int, default=None, help="block_length (default 32 GPU / 16 CPU)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 128 GPU / 32 CPU)")
    p.add_argument("--preset", default=None, help="model preset (default llada-8b GPU / tiny CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row, median reported (1 GPU / 3 CPU)")
    p.add_argument("--skip-reference", action="store_true")
    return p.parse_args(argv)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float | None:
    """Median seconds of ``fn()``, or None when it runs out of GPU memory."""
    import torch

    times = []
    try:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return sorted(times)[len(times) // 2]


def run(args) -> dict:
    import torch

    from common.config.sampler import SamplerConfig
    from common.model import build_model, family_of, preset_config
    from rollout.sampler import generate
    from tests.llada_reference import generate as reference_generate

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --cpu for the CPU mode")
    device = torch.device("cuda" if gpu else "cpu")
    repeats = args.repeats or (1 if gpu else 3)
    if not gpu:
        torch.set_num_threads(1)  # tiny shapes: intra-op threads only add noise on shared cores
    preset = args.preset or ("llada-8b" if gpu else "tiny")
    P = args.prompt or (64 if gpu else 16)
    G = args.gen or (256 if gpu else 64)
    K = args.block or (32 if gpu else 16)
    T = args.steps or (128 if gpu else 32)
    batches = args.batches or [1, 8, 32]
    modes = args.compile_modes if args.compile_modes is not None else (["reduce-overhead", "default"] if gpu else [])

    model = build_model(preset_config(preset), dtype="bfloat16" if gpu else "float32", device=device, seed=0).eval()
    mcfg = model.config
    family = family_of(model)
    decoding = {k: v for k, v in family.decoding.items() if k != "remasking"}
    K = family.block_size(mcfg) or K  # a block-causal model decodes in its own blocks
    skip_reference = args.skip_reference or family.name != "llada"  # the reference is LLaDA's generate()
    mask_id, eos_id = mcfg.mask_token_id, mcfg.eos_token_id
    low = 5 if preset == "tiny" else 0
    high = min(mcfg.vocab_size, mask_id) if mask_id > low else mcfg.vocab_size

    def ours(x_BP, temperature, compile_mode, steps=T, block=K):
        cfg = SamplerConfig(gen_length=G, block_length=block, steps=steps, temperature=temperature,
                            compile_forward=compile_mode, **decoding)
        return generate(model, x_BP, None, cfg, mask_id=mask_id, eos_id=eos_id, pad_id=mcfg.pad_token_id)

    def reference(x_BP, temperature, steps=T, block=K):
        return reference_generate(model, x_BP, None, steps=steps, gen_length=G, block_length=block,
                                  temperature=temperature, mask_id=mask_id)

    rows = []
    for B in batches:
        x_BP = torch.randint(low, high, (B, P), device=device, generator=None)
        for temperature in args.temperatures:
            impls = [] if skip_reference else [("reference", lambda s=T, k=K: reference(x_BP, temperature, s, k))]
            impls.append(("ours", lambda s=T, k=K: ours(x_BP, temperature, "none", s, k)))
            if B in args.compile_batches:
                for mode in modes:
                    impls.append((f"ours+compile({mode})",
                                  lambda s=T, k=K, m=mode: ours(x_BP, temperature, m, s, k)))
            for name, fn in impls:
                warm_steps, warm_block = (2, G) if family.block_size(mcfg) is None else (-(-G // K), K)
                warm = _timed(lambda: fn(warm_steps, warm_block), device, 2 if "compile" in name else 1)  # same shapes
                seconds = None if warm is None else _timed(fn, device, repeats)
                row = dict(impl=name, batch=B, temperature=temperature, seconds=seconds,
                           tok_per_s=None if seconds is None else B * G / seconds)
                rows.append(row)
                print(_format_row(row, rows), flush=True)
                if gpu:
                    torch.cuda.empty_cache()
    return dict(
        device=torch.cuda.get_device_name() if gpu else "cpu",
        torch=torch.__version__,
        preset=preset, dtype=str(next(model.parameters()).dtype),
        prompt=P, gen_length=G, block_length=K, steps=T, rows=rows,
    )


def _speedup(row: dict, rows: list[dict]) -> float | None:
    for r in rows:
        if r["impl"] == "reference" and r["batch"] == row["batch"] and r["temperature"] == row["temperature"]:
            if r["tok_per_s"] and row["tok_per_s"]:
                return row["tok_per_s"] / r["tok_per_s"]
    return None


def _format_row(row: dict, rows: list[dict]) -> str:
    tps = "OOM" if row["tok_per_s"] is None else f"{row['tok_per_s']:.1f}"
    secs = "OOM" if row["seconds"] is None else f"{row['seconds']:.2f}"
    sp = _speedup(row, rows)
    return f"| {row['impl']} | {row['batch']} | {row['temperature']:g} | {secs} | {tps} | " \
           f"{'-' if sp is None else f'{sp:.2f}x'} |"


def to_markdown(res: dict) -> str:
    head = (f"# Sampler end to end ({res['device']}, torch {res['torch']})\n\n"
            f"Model preset `{res['preset']}` ({res['dtype']}, random weights), prompt {res['prompt']}, "
            f"gen {res['gen_length']}, block {res['block_length']}, {res['steps']} steps. "
            "Tokens/s = batch x gen / wall time of one full generate().\n\n"
            "| sampler | batch | temperature | seconds | tok/s | vs reference |\n|---|---|---|---|---|---|\n")
    for r in res["rows"]:
        r["speedup"] = _speedup(r, res["rows"])
    return head + "\n".join(_format_row(r, res["rows"]) for r in res["rows"]) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
