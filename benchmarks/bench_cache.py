"""Block KV cache (sampler.cache none / prefix / dual): forward FLOPs and wall time per rollout call, the
learner's cost per sampled step, |log ratio| on fresh rollouts, and held-out accuracy of the tiny bases.

    # committed results (CPU, 2 cores):
    python -m benchmarks.bench_cache --sections sampler learner --batches 1 --temperature 0 \
        --out benchmarks/results/cache_cpu.md
    python -m benchmarks.bench_cache --sections learner --batches 1 --temperature 0 \
        --out benchmarks/results/cache_learner_cpu.md
    python -m benchmarks.bench_cache --sections ratio accuracy --out benchmarks/results/cache_quality.md
    # GPU rows (benchmarks/gpu_all.sh cache): LLaDA-8B shape, random bf16 weights, beside the reference
    python -m benchmarks.bench_cache --sections sampler --preset llada-8b --batches 1 8 32 --repeats 1 \
        --temperature 0 --tiny-batch 0 --reference --out $OUT/cache_gpu.md

Sections: ``sampler`` (per mode: FLOPs per generated token counted from the shapes each forward and LM-head
call ran, wall seconds per generate() call, tok/s, speed-up over ``none``; on CUDA also LLaDA's
reference generate() as the baseline row), ``learner`` (AGRPO forward+backward seconds per sampled step
on those rollouts; alone, on one dual rollout relabelled per rule), ``ratio`` (max |log p_learner - log p_sampler| over every drawn token, tiny model),
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
    p.add_argument("--repeats", type=int, default=2, help="timed generate() calls per row, minimum reported")
    p.add_argument("--tiny-repeats", type=int, default=5, help="the same for the tiny preset (overhead-bound, noisy)")
    p.add_argument("--learner-steps", type=int, default=4, help="sampled steps per trajectory in the learner section")
    p.add_argument("--learner-repeats", type=int, default=3, help="timed rounds of the learner section, minimum reported")
    p.add_argument("--reference", action="store_true", help="add LLaDA's reference generate() (default on CUDA)")
    return p.parse_args(argv)


# --- FLOP counting from the shapes each call ran


class FlopCounter:
    """Wraps ``model.hidden_states`` and ``model.vocab_logits`` on the instance and sums their FLOPs."""

    def __init__(self, model):
        cfg = model.config
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.block_params = cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * cfg.mlp_hidden_size)
        self.n_layers, self.d, self.vocab = cfg.n_layers, d, cfg.embedding_size
        self.model, self.flops = model, 0.0
        self._hidden, self._head = model.hidden_states, model.vocab_logits

    def __enter__(self):
        def hidden_states(input_ids, *args, kv_cache=None, **kwargs):
            B, Q = input_ids.shape
            Lk = Q if kv_cache is None else kv_cache.keys[0].shape[2]
            self.flops += 2.0 * B * Q * self.block_params + 4.0 * self.n_layers * B * Q * Lk * self.d
            return self._hidden(input_ids, *args, kv_cache=kv_cache, **kwargs)

        def vocab_logits(h):
            self.flops += 2.0 * h[..., 0].numel() * self.d * self.vocab
            return self._head(h)

        self.model.hidden_states, self.model.vocab_logits = hidden_states, vocab_logits
        return self

    def __exit__(self, *exc):
        del self.model.hidden_states, self.model.vocab_logits  # back to the class methods


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

        def call(mode, steps=T):
            if mode is None:
                return reference_generate(model, x_BP, None, steps=steps, gen_length=G, block_length=K,
                                          temperature=args.temperature, mask_id=mc.mask_token_id)
            cfg = SamplerConfig(gen_length=G, block_length=K, steps=steps, temperature=args.temperature, cache=mode)
            return generate(model, x_BP, None, cfg, mask_id=mc.mask_token_id, eos_id=mc.eos_token_id,
                            pad_id=mc.pad_token_id, seed=1)

        # Repeats go round the implementations (none, prefix, dual, none, ...) so that load from other
        # processes hits them alike; the minimum is reported (contention only ever adds time).
        times = {name: [] for name, _ in impls}
        flops = {}
        for r in range(-1, repeats):
            for name, mode in impls:
                if times[name] is None:
                    continue
                try:
                    if r < 0:
                        call(mode, G // K * 2)  # warm-up: the same shapes, 2 steps per block
                        continue
                    with FlopCounter(model) as fc:
                        _sync(device)
                        t0 = time.perf_counter()
                        out = call(mode)
                        _sync(device)
                        times[name].append(time.perf_counter() - t0)
                    flops[name] = fc.flops
                    if mode is not None and B == batches[0]:
                        trajs[mode] = out
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    times[name] = None
        for name, mode in impls:
            seconds = None if not times[name] else min(times[name])
            row = dict(preset=preset, impl=name, batch=B, seconds=seconds, all_seconds=times[name],
                       flops_per_token=flops.get(name, 0.0) / (B * G),
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
    """AGRPO forward+backward seconds per sampled step for each cache rule, on the same rows and the same
    drawn steps. Rounds go round the rules and the minimum is reported (contention only adds time). A rule
    without its own rollout reuses another mode's rollout relabelled (cost only: its ratio is not 1)."""
    import copy

    import torch

    from common.config import AgrpoConfig
    from learner.losses import build_loss

    mc = model.config
    model.train().requires_grad_(True)
    source = trajs.get("dual") or next(iter(trajs.values()))
    batches = {}
    for mode in MODES:
        traj = trajs.get(mode)
        if traj is None:
            traj = copy.copy(source)
            traj.extras = dict(source.extras, cache=mode)
        B = len(traj)
        traj.rewards_B = torch.arange(B, dtype=torch.float32, device=traj.logp_BG.device)
        traj.group_B = torch.zeros(B, dtype=torch.long, device=traj.logp_BG.device)
        loss = build_loss(AgrpoConfig(k_steps=args.learner_steps, step_sampling="stratified"),
                          mask_id=mc.mask_token_id, pad_id=mc.pad_token_id, eos_id=mc.eos_token_id)
        batches[mode] = (loss, loss.prepare(traj, seed=0), mode in trajs)
    times, last = {mode: [] for mode in MODES}, {}
    for _ in range(args.learner_repeats):
        for mode, (loss, batch, _own) in batches.items():
            with FlopCounter(model) as fc:
                _sync(device)
                t0 = time.perf_counter()
                m = loss.backward(model, batch, total_samples=len(batch))
                _sync(device)
                times[mode].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            last[mode] = (fc.flops, m)
    rows = []
    k = args.learner_steps
    for mode, (loss, batch, own) in batches.items():
        flops, m = last[mode]
        row = dict(mode=mode, batch=len(batch), steps=k, seconds_per_step=min(times[mode]) / k,
                   all_seconds=times[mode], fwd_flops_per_step=flops / k, own_rollout=own,
                   mean_abs_log_ratio=m["abs_log_ratio_sum"] / max(m["tokens"], 1) if own else None)
        rows.append(row)
        print(_learner_row(row, rows), flush=True)
    model.eval().requires_grad_(False)
    return rows


def _learner_row(row: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "none"), None)
    rel = "-" if base is None else f"{row['seconds_per_step'] / base['seconds_per_step']:.2f}x"
    return (f"| {row['mode']} | {row['batch']} | {row['steps']} | {row['fwd_flops_per_step'] / 1e9:.1f} | "
            f"{row['seconds_per_step']:.2f} | {rel} | "
            f"{'-' if row['mean_abs_log_ratio'] is None else format(row['mean_abs_log_ratio'], '.1e')} |")


RATIO_SETTINGS = {
    "greedy, low_confidence": dict(temperature=0.0),
    "T=1, random, top-k 7 + top-p 0.9": dict(temperature=1.0, top_k=7, top_p=0.9, remasking="random"),
    "T=0.7, margin, EOS/EoT demoted": dict(temperature=0.7, remasking="margin", confidence_eos_eot_inf=True),
    "T=1, threshold 0.012 (rows finish blocks at different steps)": dict(temperature=1.0, threshold=0.012),
    "T=1, low_confidence, refresh every 2": dict(temperature=1.0, cache_refresh=2),
}


def ratio_section() -> list[dict]:
    """max |log ratio| of every drawn token (committed and discarded draws) on fresh tiny-model rollouts,
    rebuilt as the learner does with the rows of a batch at different steps (so at different blocks);
    beside it the same rebuild without the cache rule (a full forward), to show the cache matters."""
    import copy

    import torch

    from common.config.sampler import SamplerConfig
    from common.model import build_model, preset_config
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
                worst, n = _worst_log_ratio(model, traj)
                plain = copy.copy(traj)
                plain.extras = dict(traj.extras, cache="none", cache_refresh=None)
                off = None if mode == "none" else _worst_log_ratio(model, plain)[0]
                rows.append(dict(setting=name, position_ids=positions, cache=mode, draws=n, max_abs_log_ratio=worst,
                                 without_cache_rule=off))
                print(_ratio_row(rows[-1]), flush=True)
    return rows


def _ratio_row(r: dict) -> str:
    off = "-" if r["without_cache_rule"] is None else f"{r['without_cache_rule']:.1e}"
    return f"| {r['setting']} | {r['position_ids']} | {r['cache']} | {r['draws']} | {r['max_abs_log_ratio']:.1e} | {off} |"


def _worst_log_ratio(model, traj) -> tuple[float, int]:
    """(max |log p_learner - log p_sampler|, draws) over all steps; at round t row b is rebuilt at step
    (t + 5b) mod T, so every batch mixes blocks as the learner's step draws do."""
    import torch

    from learner.step_states import policy_hidden
    from learner.losses.base import sampler_logprobs

    B, P, T = len(traj), traj.prompt_ids_BP.shape[1], traj.num_steps
    worst, n = 0.0, 0
    for t in range(T):
        step_B = (t + 5 * torch.arange(B)) % T
        b_N, g_N, tok_N, old_N, cut_N = _drawn_at(traj, step_B)
        if len(b_N) == 0:
            continue
        with torch.no_grad():
            h_ND = policy_hidden(model, traj, step_B, 3, "cpu").rows(b_N, P + g_N)
            logp_N = sampler_logprobs(model.vocab_logits(h_ND), tok_N, temperature=traj.temperature, cutoff_N=cut_N,
                                      banned_ids=traj.banned_ids)
        worst, n = max(worst, (logp_N - old_N).abs().max().item()), n + len(b_N)
    return worst, n


def _drawn_at(traj, step_B):
    """(b, g, token, behaviour logp, cut-off) of every draw row b made at step ``step_B[b]``: committed
    tokens, and the discarded draws recorded for the exact estimator."""
    import torch

    chosen_BG = (traj.unmask_step_BG == step_B[:, None]) & ~traj.extras["filled_BG"]
    b_N, g_N = chosen_BG.nonzero(as_tuple=True)
    parts = [(b_N, g_N, traj.completion_ids_BG[b_N, g_N], traj.logp_BG[b_N, g_N], traj.cutoff_BG[b_N, g_N])]
    ids_BGS = traj.discard_ids_BGS
    if ids_BGS is not None and ids_BGS.shape[2] > 0:
        G = traj.completion_ids_BG.shape[1]
        spb = traj.num_steps // (G // traj.block_length)
        slot_B = step_B % spb
        in_block_BG = (torch.arange(G) // traj.block_length)[None, :] == (step_B // spb)[:, None]
        slot_BG1 = slot_B.clamp(max=ids_BGS.shape[2] - 1)[:, None, None].expand(-1, G, 1)
        draw_BG = ids_BGS.gather(2, slot_BG1)[..., 0]
        has_BG = (draw_BG >= 0) & in_block_BG & (slot_B < ids_BGS.shape[2])[:, None]
        b_D, g_D = has_BG.nonzero(as_tuple=True)
        s_D = slot_B[b_D]
        cut = traj.discard_cutoff_BGS
        parts.append((b_D, g_D, ids_BGS[b_D, g_D, s_D], traj.discard_logp_BGS[b_D, g_D, s_D],
                      torch.full((len(b_D),), float("-inf")) if cut is None else cut[b_D, g_D, s_D]))
    return tuple(torch.cat(x) for x in zip(*parts))


ACCURACY_RUNS = {"tiny_countdown": [16, 8, 4], "tiny_sudoku": [24, 12, 6]}
ACCURACY_CACHES = {"none": [], "prefix": ["sampler.cache=prefix"], "dual": ["sampler.cache=dual"],
                   "dual, refresh 2": ["sampler.cache=dual", "sampler.cache_refresh=2"]}


def accuracy_section() -> list[dict]:
    """Greedy held-out accuracy (the task loader's default eval set) per base, cache mode and step count."""
    import contextlib
    import io

    from common.config import load_config
    from driver.evaluate import evaluate_checkpoint

    rows = []
    for config, steps_list in ACCURACY_RUNS.items():
        for cache, overrides in ACCURACY_CACHES.items():
            cfg = load_config(config, overrides)
            with contextlib.redirect_stdout(io.StringIO()):
                res = evaluate_checkpoint(cfg, steps_list)  # batches of rollout.eval_batch_tokens
            for steps, r in res.items():
                rows.append(dict(base=cfg.model.path, cache=cache, steps=steps, items=cfg.task.eval_size,
                                 accuracy=r["accuracy"], seconds=r["seconds"]))
                print(_accuracy_row(rows[-1]), flush=True)
    return rows


def _accuracy_row(r: dict) -> str:
    return f"| {r['base']} | {r['cache']} | {r['steps']} | {r['items']} | {100 * r['accuracy']:.1f}% | {r['seconds']:.1f} |"


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
        out.append(f"## Learner: AGRPO forward+backward per sampled step ({res['learner'][0]['batch']} rollout(s) of "
                   f"preset `{a['preset']}`, prompt {a['prompt']}, gen {a['gen']}, block {a['block']}, {a['steps']} steps; "
                   f"{a['learner_steps']} stratified steps each, the same for every rule; minimum of "
                   f"{a['learner_repeats']} rounds)\n")
        out.append("A rule without its own rollout in this run trains on another rule's rollout relabelled: the "
                   "cost is the same, its ratio is not 1 and is left out (-).\n")
        out.append("| rollouts from | batch | steps | forward GFLOP/step | seconds/step | vs none | mean abs log ratio |\n"
                   "|---|---|---|---|---|---|---|")
        out += [_learner_row(r, res["learner"]) for r in res["learner"]]
        out.append("")
    if res.get("ratio"):
        out.append("## Ratio 1: max |log p_learner - log p_sampler| over every drawn token (committed and "
                   "discarded draws), tiny model, 6 rows (3 left-padded), gen 24, block 8, 12 steps\n")
        out.append("The learner's rebuild (`learner.step_states.policy_hidden`) with the rows of each batch at different "
                   "steps and blocks; the last column rebuilds the same rollouts with a full forward instead (the "
                   "cache rule ignored), which is what a learner unaware of the cache would compute.\n")
        out.append("| sampler setting | position_ids | cache | draws | max abs log ratio | without the cache rule |\n"
                   "|---|---|---|---|---|---|")
        out += [_ratio_row(r) for r in res["ratio"]]
        out.append("")
    if res.get("accuracy"):
        out.append("## Held-out accuracy of the shipped tiny bases (greedy, the task's default eval set)\n")
        out.append("| base | cache | steps | items | accuracy | seconds |\n|---|---|---|---|---|---|")
        out += [_accuracy_row(r) for r in res["accuracy"]]
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
    if "learner" in args.sections and "sampler" not in args.sections:
        # learner section alone: one dual rollout (the cheapest), relabelled for the other rules
        from common.config.sampler import SamplerConfig
        from common.model import build_model, preset_config
        from rollout.sampler import generate

        model = build_model(preset_config(args.preset), device=device, seed=0).eval()
        mc = model.config
        x_BP = torch.randint(0, mc.mask_token_id, (args.batches[0], args.prompt), generator=torch.Generator().manual_seed(1))
        cfg = SamplerConfig(gen_length=args.gen, block_length=args.block, steps=args.steps,
                            temperature=args.temperature, cache="dual")
        traj = generate(model, x_BP.to(device), None, cfg, mask_id=mc.mask_token_id, eos_id=mc.eos_token_id,
                        pad_id=mc.pad_token_id, seed=1)
        res["learner"] = learner_section(args, model, {"dual": traj}, device)
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
