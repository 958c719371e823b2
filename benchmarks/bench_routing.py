"""Log-ratio drift between rollout and learner on a mixture of experts, with the learner replaying the rollout's
routing or recomputing it (``learner.routing``).

    python -m benchmarks.bench_routing --cpu --out /tmp/br            # small-llada2, sampler bf16, learner fp32
    python -m benchmarks.bench_routing --out results/routing          # GPU: llada2-mini shape, bf16 both sides

The sampler decodes with ``record_routing`` in bf16; the learner rescores every recorded draw of every step on the
same weights in ``--learner-dtype`` (CPU default fp32: the learner's masters against the rollout's bf16 copy; GPU
default bf16, with the full-forward rebuild instead of the sampler's cached block forwards). Reported: mean and max
|log pi_learner - log pi_sampler| over the scored draws (committed and discarded). Random weights: the numbers
measure kernels and routing, not a trained model's confidence.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode (small-llada2)")
    p.add_argument("--preset", default=None, help="model preset (default llada2-mini GPU / small-llada2 CPU)")
    p.add_argument("--layers", type=int, default=None, help="keep the preset's first N layers (time on a device)")
    p.add_argument("--batch", type=int, default=None, help="sequences sampled together (default 8 GPU, 4 CPU)")
    p.add_argument("--learner-dtype", default=None, help="learner compute dtype (default float32 CPU, bfloat16 GPU)")
    p.add_argument("--out", required=True, help="directory for bench_routing.json and bench_routing.md")
    args = p.parse_args()

    import torch

    from common.config.sampler import SamplerConfig
    from common.model import build_model, preset_config
    from learner.step_states import policy_hidden
    from learner.losses.actions import step_rows
    from learner.losses.base import sampler_logprobs
    from rollout.sampler import generate

    gpu = not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    preset = args.preset or ("llada2-mini" if gpu else "small-llada2")
    B = args.batch or (8 if gpu else 4)
    learner_dtype = args.learner_dtype or ("bfloat16" if gpu else "float32")
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = preset_config(preset, **overrides)
    sampler_model = build_model(config, dtype="bfloat16", device=device, seed=0).eval()
    learner_model = build_model(config, dtype=learner_dtype, device=device, seed=0).eval()
    learner_model.load_state_dict({k: v.to(getattr(torch, learner_dtype)) for k, v in sampler_model.state_dict().items()})
    P, G, K = (64, 256, config.block_size) if gpu else (16, 32, config.block_size)
    low = 5  # past the special ids of the tiny presets' character vocabulary
    high = config.mask_token_id if config.mask_token_id > low else config.vocab_size
    ids = torch.randint(low, high, (B, P), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    cfg = SamplerConfig(gen_length=G, block_length=K, steps=G, temperature=0.6, block_grid="sequence",
                        position_ids="packed", remasking="low_confidence", threshold=0.95, threshold_floor="schedule",
                        cache="prefix", record_routing=True)
    with torch.no_grad():
        traj = generate(sampler_model, ids, None, cfg, mask_id=config.mask_token_id, eos_id=config.eos_token_id,
                        pad_id=config.pad_token_id, seed=1)
    recompute = {k: v for k, v in traj.extras.items() if not k.startswith("routing_")}
    results = {}
    for mode in ("replay", "recompute"):
        diffs = []
        for t in range(traj.num_steps):
            # the learner scores each step on its own rows (another batch composition than the sampler's)
            step_B = torch.full((B,), t, device=device)
            rows = step_rows(traj, step_B, torch.ones(B, dtype=torch.bool, device=device), discarded=True,
                             device=device)
            if len(rows.b_N) == 0:
                continue
            scored = traj if mode == "replay" else _with_extras(traj, recompute)
            with torch.no_grad():
                hidden = policy_hidden(learner_model, scored, step_B, config.mask_token_id, device)
                logits = learner_model.vocab_logits(hidden.rows(rows.b_N, P + rows.g_N)).float()
                logp = sampler_logprobs(logits, rows.token_N, temperature=traj.temperature, cutoff_N=rows.cutoff_N,
                                        banned_ids=traj.banned_ids)
            diffs.append((logp - rows.old_logp_N).abs())
        d = torch.cat(diffs)
        results[mode] = {"mean_abs_log_ratio": float(d.mean()), "max_abs_log_ratio": float(d.max()), "draws": d.numel()}
    results["setting"] = dict(preset=preset, layers=config.num_hidden_layers, batch=B, prompt=P, gen=G, block=K,
                              sampler_dtype="bfloat16", learner_dtype=learner_dtype,
                              device=torch.cuda.get_device_name() if gpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_routing.json").write_text(json.dumps(results, indent=1) + "\n")
    s = results["setting"]
    lines = [f"Routing drift, {s['preset']} ({s['layers']} layers, random weights), {s['device']}: sampler "
             f"{s['sampler_dtype']}, learner {s['learner_dtype']}, batch {B}, prompt {P}, gen {G}, block {K}, "
             "temperature 0.6, threshold 0.95", "",
             "| learner.routing | scored draws | mean abs log-ratio | max abs log-ratio |", "|---|---:|---:|---:|"]
    for mode in ("replay", "recompute"):
        r = results[mode]
        lines.append(f"| {mode} | {r['draws']} | {r['mean_abs_log_ratio']:.3e} | {r['max_abs_log_ratio']:.3e} |")
    (out / "bench_routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _with_extras(traj, extras):
    import dataclasses

    return dataclasses.replace(traj, extras=extras)


if __name__ == "__main__":
    main()
