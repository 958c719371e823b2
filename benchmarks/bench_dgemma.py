"""DiffusionGemma: our uniform-noise sampler beside transformers' ``generate`` (tokens/s, same seed, same
tokens), and the learner's cost of the exact self-conditioned score against the stop-gradient surrogate.

    python -m benchmarks.bench_dgemma --preset tiny-dgemma --out benchmarks/results/dgemma_cpu.md
    python -m benchmarks.bench_dgemma --preset dgemma-26b-a4b --dtype bfloat16 --batches 1 8 --out $OUT/dgemma.md
    python -m benchmarks.bench_dgemma --preset dgemma-26b-a4b --plan   # parameter counts and memory rows, no run

Random weights; every row's canvas runs all its steps unless the model stops it (confidence threshold as given).
"""
from __future__ import annotations

import argparse
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-dgemma")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--learner-batch", type=int, default=2, help="rows scored in the learner section (0: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--plan", action="store_true", help="print the parameter counts and memory plan rows and stop")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_plan(preset: str) -> str:
    """Parameter counts of the text model (built on meta) and the bytes a rollout GPU and a learner rank hold."""
    import torch

    import common.model as M

    config = M.preset_config(preset)
    with torch.device("meta"):
        model = M.family_of(config).model_class(config)
    t = config.text_config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * t.top_k_experts // t.num_experts
    lora = sum(model.blocks[0].get_submodule(n).weight.numel() for n in M.family_of(model).lora_targets)
    gb = 1e9
    rows = [f"# Memory plan, preset {preset} (text only; {t.num_hidden_layers} layers, {t.num_experts} experts, "
            f"top {t.top_k_experts})", "",
            "| quantity | value |", "|---|---:|",
            f"| parameters | {total / 1e9:.2f} B |", f"| of which experts | {experts / 1e9:.2f} B |",
            f"| active per token (shared + {t.top_k_experts} experts) | {active / 1e9:.2f} B |",
            f"| rollout GPU: weights in bf16 | {2 * total / gb:.1f} GB |",
            f"| learner, full fine-tune: fp32 master + 2 AdamW moments + bf16 grads, per rank of W | "
            f"{14 * total / gb:.0f} GB / W |",
            f"| learner, frozen bf16 base sharded over W | {2 * total / gb:.1f} GB / W |",
            f"| decoder logits of one step, canvas {config.canvas_length}, fp32 | "
            f"{4 * config.canvas_length * t.vocab_size / gb:.2f} GB per row |",
            f"| LoRA-targetable linear weights per layer (defaults) | {lora / 1e6:.1f} M |"]
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    import common.model as M
    from common.model.dgemma.modeling import UniformDecoding
    from learner.canvas_steps import acting_steps, step_logps
    from rollout.uniform_sampler import generate_uniform

    if args.plan:
        return print(memory_plan(args.preset))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = M.to_dtype(args.dtype)
    config = M.preset_config(args.preset)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: the 26B shape does not fit in float32
    with torch.device(device):
        model = M.family_of(config).model_class(config).eval()
    torch.set_default_dtype(default)
    V = config.text_config.vocab_size
    d = UniformDecoding(max_new_tokens=args.new_tokens, steps=args.steps)
    lines = [f"# DiffusionGemma, preset {args.preset}, {args.dtype}, {device.type} "
             f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), prompt {args.prompt}, "
             f"{args.new_tokens} new tokens (canvas {config.canvas_length}), up to {args.steps} steps a canvas", "",
             "| batch | transformers generate tok/s | ours tok/s | same tokens |", "|---:|---:|---:|---|"]
    for B in args.batches:
        prompt = torch.randint(3, V, (B, args.prompt), device=device)
        times, outs = {}, {}
        for name in ("public", "ours"):
            torch.manual_seed(1)
            _sync(device)
            t0 = time.perf_counter()
            if name == "public":
                outs[name] = model.generate(prompt, max_new_tokens=d.max_new_tokens, max_denoising_steps=d.steps,
                                            t_min=d.t_min, t_max=d.t_max,
                                            sampler_config=EntropyBoundSamplerConfig(entropy_bound=d.entropy_bound),
                                            stability_threshold=d.stability_threshold,
                                            confidence_threshold=d.confidence_threshold).sequences
            else:
                outs[name] = generate_uniform(model, prompt, d).sequences
            _sync(device)
            times[name] = time.perf_counter() - t0
        n = B * args.new_tokens
        lines.append(f"| {B} | {n / times['public']:.1f} | {n / times['ours']:.1f} | "
                     f"{torch.equal(outs['public'], outs['ours'])} |")
        print(lines[-1], flush=True)
    if args.learner_batch:
        B = args.learner_batch
        prompt = torch.randint(3, V, (B, args.prompt), device=device)
        torch.manual_seed(2)
        rec = generate_uniform(model, prompt, d)
        scored = acting_steps(rec.active)
        lines += ["", f"Learner: {B} rows, {rec.canvases} canvases, {int(scored.sum())} acting steps scored "
                  "(forward + backward of every step's log-prob)", "",
                  "| score | seconds | peak GPU memory (GiB) |", "|---|---:|---:|"]
        for exact in (True, False):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            step_logps(model, prompt, rec, d, exact=exact, scored=scored).sum().backward()
            _sync(device)
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
            lines.append(f"| {'exact (chain with gradient)' if exact else 'stop-gradient surrogate'} | "
                         f"{time.perf_counter() - t0:.2f} | {peak} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
