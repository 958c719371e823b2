"""Block KV cache (sampler.cache none / prefix / dual): forward FLOPs and wall time per rollout call, the
learner's cost per sampled step, |log ratio| on fresh rollouts, and held-out accuracy of the tiny bases.

    python -m benchmarks.bench_cache --out benchmarks/results/cache_cpu.md          # every section, CPU
    python -m benchmarks.bench_cache --sections sampler --preset llada-8b --batches 1 8 32 \
        --out $OUT/cache_gpu.md                                                     # GPU rows (gpu_all.sh)

Sections: ``sampler`` (per mode: FLOPs per generated token counted from the shapes each forward and LM-head
call ran, wall seconds per generate() call, tok/s, speed-up over ``none``; on CUDA also LLaDA's
reference generate() as the baseline row), ``learner`` (AGRPO forward+backward seconds per sampled step
on those rollouts), ``ratio`` (max |log p_learner - log p_sampler| over every drawn token, tiny model),
``accuracy`` (greedy held-out accuracy of checkpoints/tiny-{countdown,sudoku}-base per mode and step count).

FLOPs of one forward over B x Q query tokens attending to Lk keys (Lk = Q without a cache):
2 * B*Q * (block matmul parameters) + 4 * n_layers * B*Q*Lk*d_model, plus 2 * rows * d_model * V for
the LM head on the rows the sampler scores. Embedding lookups and norms are not counted.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODES = ("none", "prefix", "dual")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="markdown results path; a .json beside it gets the raw numbers")
    p.add_argument("--sections", nargs="+", default=["sampler", "learner", "ratio", "accuracy"])
    p.add_argument("--preset", default="100m", help="model preset of the sampler/learner sections (random weights)")
    p.add_argument("--batches", type=int, nargs="+", default=[2], help="rollout batch sizes")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tiny-batch", type=int, default=8, help="batch of the same shape on the tiny preset (0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--repeats", type=int, default=1, help="timed generate() calls per row, median reported")
    p.add_argument("--tiny-repeats", type=int, default=5, help="the same for the tiny preset (overhead-bound, noisy)")
    p.add_argument("--learner-steps", type=int, default=2, help="sampled steps per trajectory in the learner section")
    p.add_argument("--reference", action="store_true", help="add LLaDA's reference generate() (default on CUDA)")
    return p.parse_args(argv)


# --- FLOP counting from the shapes each call ran


class FlopCounter:
    """Wraps ``model.hidden_states`` and ``model.lm_head`` on the instance and sums their FLOPs."""

    def __init__(self, model):
        cfg = model.config
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.block_params = cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden_size)
        self.n_layers, self.d, self.vocab = cfg.n_layers, d, cfg.embedding_size
        self.model, self.flops = model, 0.0
        self._hidden, self._head = model.hidden_states, model.lm_head

    def __enter__(self):
        def hidden_states(input_ids, *args, kv_cache=None, **kwargs):
            B, Q = input_ids.shape
            Lk = Q if kv_cache is None else kv_cache.keys[0].shape[2]
            self.flops += 2.0 * B * Q * self.block_params + 4.0 * self.n_layers * B * Q * Lk * self.d
            return self._hidden(input_ids, *args, kv_cache=kv_cache, **kwargs)

        def lm_head(h):
            self.flops += 2.0 * h[..., 0].numel() * self.d * self.vocab
            return self._head(h)

        self.model.hidden_states, self.model.lm_head = hidden_states, lm_head
        return self

    def __exit__(self, *exc):
        del self.model.hidden_states, self.model.lm_head  # back to the class methods


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --- sections


def sampler_section(args, preset: str, batches: list[int], device, reference: bool,
                    repeats: int) -> tuple[list[dict], dict]:
    """Per (batch, mode): FLOPs per generated token, seconds per generate() call, tok/s. Also returns the
    trajectories of the first batch (the learner section trains on them)."""
    import torch

    from common.config.sampler import SamplerConfig
    from common.model import build_model, preset_config
    from rollout.sampler import generate
    from tests.llada_reference import generate as reference_generate

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = build_model(preset_config(preset), dtype=dtype, device=device, seed=0).eval()
    mc = model.config
    P, G, K, T = args.prompt, args.gen, args.block, args.steps
    low = 5 if preset == "tiny" else 0
    high = mc.mask_token_id if mc.mask_token_id > low else mc.vocab_size
    rows, trajs = [], {}
    for B in batches:
        x_BP = torch.randint(low, high, (B, P), device=device, generator=torch.Generator(device).manual_seed(B))
        impls = [("reference", None)] if reference else []
        impls += [(f"ours cache={mode}", mode) for mode in MODES]
        for name, mode in impls:
            def call(steps=T):
                if mode is None:
                    return reference_generate(model, x_BP, None, steps=steps, gen_length=G, block_length=K,
                                              temperature=args.temperature, mask_id=mc.mask_token_id)
                cfg = SamplerConfig(gen_length=G, block_length=K, steps=steps, temperature=args.temperature,
                                    cache=mode)
                return generate(model, x_BP, None, cfg, mask_id=mc.mask_token_id, eos_id=mc.eos_token_id,
                                pad_id=mc.pad_token_id, seed=1)

            try:
                call(G // K * 2)  # warm-up: the same shapes, 2 steps per block
                times = []
                for r in range(repeats):
                    with FlopCounter(model) as fc:
                        _sync(device)
                        t0 = time.perf_counter()
                        out = call()
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                seconds = sorted(times)[len(times) // 2]
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                out, seconds = None, None
            if mode is not None and B == batches[0] and out is not None:
                trajs[mode] = out
            row = dict(preset=preset, impl=name, batch=B, seconds=seconds, flops_per_token=fc.flops / (B * G),
                       tok_per_s=None if seconds is None else B * G / seconds)
            rows.append(row)
            print(_sampler_row(row, rows), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, dict(model=model, trajs=trajs)


def _sampler_row(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["impl"] == "ours cache=none" and r["batch"] == row["batch"]
                 and r["preset"] == row["preset"]), None)
    sp_wall = sp_flops = "-"
    if base and base["seconds"] and row["seconds"]:
        sp_wall = f"{base['seconds'] / row['seconds']:.2f}x"
    if base and row["flops_per_token"]:
        sp_flops = f"{base['flops_per_token'] / row['flops_per_token']:.2f}x"
    secs = "OOM" if row["seconds"] is None else f"{row['seconds']:.2f}"
    tps = "OOM" if row["tok_per_s"] is None else f"{row['tok_per_s']:.1f}"
    return (f"| {row['preset']} | {row['impl']} | {row['batch']} | {row['flops_per_token'] / 1e9:.2f} | {sp_flops} | "
            f"{secs} | {tps} | {sp_wall} |")


def learner_section(args, model, trajs: dict, device) -> list[dict]:
    """AGRPO forward+backward seconds per sampled step on each mode's rollouts (same rows, same steps)."""
    import torch

    from common.config import AgrpoConfig
    from learner.losses import build_loss

    mc = model.config
    model.train().requires_grad_(True)
    rows = []
    for mode, traj in trajs.items():
        B = len(traj)
        traj.rewards_B = torch.arange(B, dtype=torch.float32, device=traj.logp_BG.device)
        traj.group_B = torch.zeros(B, dtype=torch.long, device=traj.logp_BG.device)
        loss = build_loss(AgrpoConfig(k_steps=args.learner_steps, step_sampling="stratified"),
                          mask_id=mc.mask_token_id, pad_id=mc.pad_token_id, eos_id=mc.eos_token_id)
        batch = loss.prepare(traj, seed=0)
        with FlopCounter(model) as fc:
            _sync(device)
            t0 = time.perf_counter()
            m = loss.backward(model, batch, total_samples=B)
            _sync(device)
            seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        k = args.learner_steps
        row = dict(mode=mode, batch=B, steps=k, seconds_per_step=seconds / k, fwd_flops_per_step=fc.flops / k,
                   mean_abs_log_ratio=m["abs_log_ratio_sum"] / max(m["tokens"], 1), tokens=m["tokens"])
        rows.append(row)
        print(_learner_row(row, rows), flush=True)
    model.eval().requires_grad_(False)
    return rows


def _learner_row(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "none"), None)
    rel = "-" if base is None else f"{row['seconds_per_step'] / base['seconds_per_step']:.2f}x"
    return (f"| {row['mode']} | {row['batch']} | {row['steps']} | {row['fwd_flops_per_step'] / 1e9:.1f} | "
            f"{row['seconds_per_step']:.2f} | {rel} | {row['mean_abs_log_ratio']:.1e} |")


RATIO_SETTINGS = {
    "greedy, low_confidence": dict(temperature=0.0),
    "T=1, random, top-k 7 + top-p 0.9": dict(temperature=1.0, top_k=7, top_p=0.9, remasking="random"),
    "T=0.7, margin, EOS/EoT demoted": dict(temperature=0.7, remasking="margin", confidence_eos_eot_inf=True),
    "T=1, threshold 0.05": dict(temperature=1.0, threshold=0.05),
    "T=1, low_confidence, refresh every 2": dict(temperature=1.0, cache_refresh=2),
}


def ratio_section() -> list[dict]:
    """max |log ratio| of every drawn token (committed and discarded draws) on fresh tiny-model rollouts."""
    import torch

    from common.config.sampler import SamplerConfig
    from common.model import build_model, preset_config
    from common.states import policy_hidden
    from learner.losses.base import sampler_logprobs
    from rollout.sampler import generate

    model = build_model(preset_config("tiny"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompt_BP = torch.randint(5, 101, (6, 10), generator=g)
    mask_BP = torch.ones(6, 10, dtype=torch.bool)
    mask_BP[:3, :4] = False  # half the rows padded
    prompt_BP = prompt_BP.masked_fill(~mask_BP, 0)
    rows = []
    for name, opts in RATIO_SETTINGS.items():
        for positions in ("absolute", "packed"):
            for mode in MODES:
                if mode == "none" and "cache_refresh" in opts:
                    continue
                cfg = SamplerConfig(gen_length=24, block_length=8, steps=12, cache=mode, position_ids=positions, **opts)
                traj = generate(model, prompt_BP, mask_BP, cfg, mask_id=3, eos_id=2, eot_id=4, pad_id=0, seed=7)
                worst, n = 0.0, 0
                for t in range(traj.num_steps):
                    b_N, g_N, tok_N, old_N, cut_N = _drawn_at(traj, t)
                    if len(b_N) == 0:
                        continue
                    with torch.no_grad():
                        h_ND = policy_hidden(model, traj, torch.full((6,), t), 3, "cpu").rows(b_N, 10 + g_N)
                        logp_N = sampler_logprobs(model.lm_head(h_ND), tok_N, temperature=traj.temperature,
                                                  cutoff_N=cut_N, banned_ids=traj.banned_ids)
                    worst, n = max(worst, (logp_N - old_N).abs().max().item()), n + len(b_N)
                rows.append(dict(setting=name, position_ids=positions, cache=mode, draws=n, max_abs_log_ratio=worst))
                print(f"| {name} | {positions} | {mode} | {n} | {worst:.1e} |", flush=True)
    return rows


def _drawn_at(traj, t: int):
    """(b, g, token, behaviour logp, cut-off) of every draw at step t: committed tokens, and the discarded
    draws recorded for the exact estimator when the sampler keeps them."""
    import torch

    chosen_BG = (traj.unmask_step_BG == t) & ~traj.extras["filled_BG"]
    b_N, g_N = chosen_BG.nonzero(as_tuple=True)
    parts = [(b_N, g_N, traj.completion_ids_BG[b_N, g_N], traj.logp_BG[b_N, g_N], traj.cutoff_BG[b_N, g_N])]
    ids_BGS = getattr(traj, "discard_ids_BGS", None)
    if ids_BGS is not None and ids_BGS.shape[2] > 0:
        spb = traj.num_steps // (traj.completion_ids_BG.shape[1] // traj.block_length)
        slot = t % spb
        if slot < ids_BGS.shape[2]:
            block_G = torch.arange(traj.completion_ids_BG.shape[1]) // traj.block_length
            has_BG = (ids_BGS[:, :, slot] >= 0) & (block_G == t // spb)[None, :]
            b_D, g_D = has_BG.nonzero(as_tuple=True)
            cut = traj.discard_cutoff_BGS
            parts.append((b_D, g_D, ids_BGS[b_D, g_D, slot], traj.discard_logp_BGS[b_D, g_D, slot],
                          torch.full((len(b_D),), float("-inf")) if cut is None else cut[b_D, g_D, slot]))
    return tuple(torch.cat(x) for x in zip(*parts))


ACCURACY_RUNS = {"tiny_countdown": [16, 8, 4], "tiny_sudoku": [24, 12, 6]}


def accuracy_section() -> list[dict]:
    """Greedy held-out accuracy (the task loader's default eval set) per base, cache mode and step count."""
    import contextlib
    import io

    from common.config import load_config
    from driver.evaluate import evaluate_checkpoint

    rows = []
    for config, steps_list in ACCURACY_RUNS.items():
        for mode in MODES:
            cfg = load_config(config, [f"sampler.cache={mode}"])
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                res = evaluate_checkpoint(cfg, steps_list, batch_size=128)
            for steps, r in res.items():
                rows.append(dict(base=cfg.model.path, cache=mode, steps=steps, items=r.get("n", r.get("items")),
                                 accuracy=r["accuracy"], seconds=r["seconds"]))
                print(f"| {cfg.model.path} | {mode} | {steps} | {100 * r['accuracy']:.1f}% | {r['seconds']:.1f} |",
                      flush=True)
            print(f"  ({config} cache={mode}: {time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


# --- output


def to_markdown(res: dict) -> str:
    a = res["args"]
    out = [f"# Block KV cache ({res['device']}, torch {res['torch']}, {res['threads']} threads)\n",
           f"Command: `{res['command']}`\n"]
    if res.get("sampler"):
        out.append(f"## Sampler: one generate() call, prompt {a['prompt']}, gen {a['gen']}, block {a['block']}, "
                   f"{a['steps']} steps, temperature {a['temperature']:g}, random weights\n")
        out.append("GFLOP/token = forward FLOPs (blocks + attention + LM head on scored rows) per generated token, "
                   "counted from the shapes run; speed-ups are over `cache=none` at the same batch.\n")
        out.append("| preset | sampler | batch | GFLOP/token | fewer FLOPs | seconds | tok/s | faster |\n"
                   "|---|---|---|---|---|---|---|---|")
        out += [_sampler_row(r, res["sampler"]) for r in res["sampler"]]
        out.append("")
    if res.get("learner"):
        out.append(f"## Learner: AGRPO forward+backward per sampled step ({res['learner'][0]['batch']} rollouts of "
                   f"preset `{a['preset']}` from the sampler section, {a['learner_steps']} stratified steps each)\n")
        out.append("| rollouts from | batch | steps | forward GFLOP/step | seconds/step | vs none | mean abs log ratio |\n"
                   "|---|---|---|---|---|---|---|")
        out += [_learner_row(r, res["learner"]) for r in res["learner"]]
        out.append("")
    if res.get("ratio"):
        out.append("## Ratio 1: max |log p_learner - log p_sampler| over every drawn token (committed and "
                   "discarded draws), tiny model, 6 rows (3 left-padded), gen 24, block 8, 12 steps\n")
        out.append("| sampler setting | position_ids | cache | draws | max abs log ratio |\n|---|---|---|---|---|")
        out += [f"| {r['setting']} | {r['position_ids']} | {r['cache']} | {r['draws']} | {r['max_abs_log_ratio']:.1e} |"
                for r in res["ratio"]]
        out.append("")
    if res.get("accuracy"):
        out.append("## Held-out accuracy of the shipped tiny bases (greedy, the task's default eval set)\n")
        out.append("| base | cache | steps | accuracy | seconds |\n|---|---|---|---|---|")
        out += [f"| {r['base']} | {r['cache']} | {r['steps']} | {100 * r['accuracy']:.1f}% | {r['seconds']:.1f} |"
                for r in res["accuracy"]]
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    import sys

    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               threads=torch.get_num_threads(), args=vars(args),
               command="python -m benchmarks.bench_cache " + " ".join(sys.argv[1:] if argv is None else argv))
    if "sampler" in args.sections:
        reference = args.reference or device.type == "cuda"
        res["sampler"], state = sampler_section(args, args.preset, args.batches, device, reference, args.repeats)
        if "learner" in args.sections:
            res["learner"] = learner_section(args, state["model"], state["trajs"], device)
        del state
        if args.tiny_batch:
            tiny_rows, _ = sampler_section(args, "tiny", [args.tiny_batch], device, False, args.tiny_repeats)
            res["sampler"] += tiny_rows
    if "ratio" in args.sections:
        res["ratio"] = ratio_section()
    if "accuracy" in args.sections:
        res["accuracy"] = accuracy_section()
    md = to_markdown(res)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
