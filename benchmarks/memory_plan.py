"""Per-GPU memory plan of the LLaDA-8B presets: a learner rank and a rollout worker, checked against the GPU
the deploy manifests request.

    python -m benchmarks.memory_plan                                   # both llada8b presets, to stdout
    python -m benchmarks.memory_plan --out benchmarks/results/memory_plan.md

Parameter counts come from the model built on the meta device (the presets' model.path is not needed: when it
is missing the `llada-8b` preset, LLaDA-8B's shape, stands in). Everything else is arithmetic on the preset:

learner rank (W = learner.num_ranks, FSDP2 per block + root):
  weights      trained parameters as fp32 masters / W; a frozen LoRA base in learner.param_dtype / W;
               plus the all-gathered compute copies (param dtype): the root's (embedding, LM head, final
               norm: unsharded for the whole forward+backward) and two blocks (the current one, the prefetched)
  grads        sharded grads (reduce dtype) / W, plus the unsharded gradient accumulator of every trained
               parameter: gradients are reduced once per optimizer step, so backwards before the last keep
               their unsharded sum (the price of collectives that do not grow with K or the micro-batches;
               learner.reduce_every_backward drops it)
  optimizer    AdamW's two fp32 moments / W
  reference    the frozen reference policy (algorithm.beta_kl > 0 only), param dtype / W
  activations  one micro-batch of learner.micro_batch_tokens // (max_prompt_tokens + gen_length) sequences at
               the longest prompt; one sampled step at a time (K does not multiply it). Per token and block,
               the tensors autograd keeps: 10 d_model + 4 mlp_hidden (+ 7 r with LoRA) bf16 values
               (norm inputs and outputs, q/k/v, rotated q/k, attention output, four MLP intermediates; attention
               by a fused SDPA kernel, O(L) memory). With activation checkpointing: every block's input plus one
               block's full set during its recompute. The LM head runs on the step's block rows only
               (sequences x block_length rows x vocabulary, ~10 bytes per logit: bf16, fp32, fp32 grad).
rollout worker (one GPU):
  weights      all parameters in model.dtype
  sync staging adapter-only LoRA sync: a copy of the adapted base weights (model dtype) + fp32 adapter
               buffers (rollout/lora_merge.py); full-weight nccl sync: one staging copy of the weights
  activations  the larger of a rollout call (prompts_per_call x group_size sequences, x2 under cfg_scale) and
               an evaluation batch (rollout.eval_batch_tokens), at the longest prompt: the residual stream plus
               one block's transients (4 d_model + 3 mlp_hidden bf16 values per token)
  KV cache     sampler.cache prefix/dual: keys and values of every layer for the whole sequence, model dtype
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
# deploy/cluster.yaml: learner node g6e.12xlarge (4 x NVIDIA L40S), rollout node g6e.2xlarge (1 x L40S).
# deploy/rayjob.yaml requests nvidia.com/gpu without naming a type: the same L40S is assumed. An L40S has
# 48 GB (44.7 GiB); 1 GiB of it is set aside for the CUDA context, NCCL buffers and allocator slack.
GPU_NAME, GPU_BYTES, RESERVED_BYTES = "NVIDIA L40S 48 GB", 48e9, 1 * GiB
PRESETS = ("configs/llada8b_gsm8k.yaml", "configs/llada8b_countdown.yaml")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    d: int
    mlp: int
    layers: int
    vocab: int
    params: int  # all parameters, adapters included
    adapters: int
    root: int  # embedding + LM head + final norm
    block: int  # one block's parameters, adapters included
    adapted: int  # base weights of the layers that carry adapters


def model_shape(cfg) -> Shape:
    """Counts from the policy built on the meta device (with the preset's LoRA adapters)."""
    from common.config import ModelConfig
    from common.model import build_model
    from common.policy import policy_config, resolve_path
    from learner.lora import LoraLinear, apply_lora, is_adapter

    model_cfg = cfg.model
    if model_cfg.path is not None and not (resolve_path(model_cfg.path) / "config.json").is_file():
        model_cfg = ModelConfig(preset="llada-8b", dtype=cfg.model.dtype)  # LLaDA-8B's shape, no weights needed
    model = build_model(policy_config(model_cfg), device="meta")
    if cfg.learner.lora.enabled:
        apply_lora(model, cfg.learner.lora)
    named = dict(model.named_parameters())
    c = model.config
    return Shape(d=c.d_model, mlp=c.mlp_hidden_size, layers=c.n_layers, vocab=c.embedding_size or c.vocab_size,
                 params=sum(p.numel() for p in named.values()),
                 adapters=sum(p.numel() for n, p in named.items() if is_adapter(n)),
                 root=sum(p.numel() for n, p in named.items() if ".blocks." not in n),
                 block=sum(p.numel() for n, p in named.items() if ".blocks.0." in n),
                 adapted=sum(m.weight.numel() for m in model.modules() if isinstance(m, LoraLinear)))


def learner_rank(cfg, s: Shape, *, lora: bool, checkpointing: bool, every_backward: bool = False) -> dict[str, float]:
    """Bytes per learner rank, by component."""
    L = cfg.learner
    W, pbytes, rbytes = L.num_ranks, BYTES[L.param_dtype], BYTES[L.reduce_dtype]
    trained = s.adapters if lora else s.params
    frozen = s.params - trained
    seq = cfg.rollout.max_prompt_tokens + cfg.sampler.gen_length
    rows = max(1, L.micro_batch_tokens // seq)
    tokens = rows * seq
    r = L.lora.r if lora else 0
    per_token_block = 2 * (10 * s.d + 4 * s.mlp + 7 * r)
    block_acts = tokens * per_token_block
    acts = (s.layers * tokens * s.d * 2 + block_acts) if checkpointing else s.layers * block_acts
    logits = rows * cfg.sampler.block_length * s.vocab * 10
    ref = s.params - s.adapters if cfg.algorithm.beta_kl > 0 else 0
    return {
        "weights (sharded)": (trained * 4 + frozen * pbytes) / W,
        "weights (gathered root + 2 blocks)": (s.root + 2 * s.block) * pbytes,
        "grads (sharded" + (")" if every_backward else " + unsharded accumulator)"):
            trained * rbytes / W + (0 if every_backward else trained * rbytes),
        "optimizer (AdamW moments)": 2 * trained * 4 / W,
        "reference policy": ref * pbytes / W,
        f"activations ({rows} seq x {seq} tok)": acts,
        "LM-head rows": logits,
    }


def rollout_worker(cfg, s: Shape, *, lora: bool, cache: str) -> dict[str, float]:
    """Bytes per rollout worker (one GPU), by component."""
    R, S = cfg.rollout, cfg.sampler
    mbytes = BYTES[cfg.model.dtype]
    seq = R.max_prompt_tokens + S.gen_length
    rows = max(R.prompts_per_call * R.group_size * (2 if S.cfg_scale > 0 else 1), max(1, R.eval_batch_tokens // seq))
    tokens = rows * seq
    base = s.params - s.adapters
    staging = s.adapted * mbytes + s.adapters * 4 if lora and cfg.learner.lora.sync_adapters else base * mbytes
    kv = 0 if cache == "none" else 2 * s.layers * tokens * s.d * mbytes
    return {
        "weights": base * mbytes,
        "weight-sync staging": staging,
        f"activations ({rows} seq x {seq} tok)": tokens * (s.d * 2 + 2 * (4 * s.d + 3 * s.mlp)),
        f"KV cache ({cache})": kv,
    }


def _table(title: str, parts: dict[str, float]) -> list[str]:
    total = sum(parts.values())
    usable = GPU_BYTES - RESERVED_BYTES
    verdict = "fits" if total <= usable else "DOES NOT FIT"
    lines = [f"| {title} | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v / GiB:.2f} |" for k, v in parts.items()]
    lines.append(f"| **total** ({verdict} in {usable / GiB:.1f} GiB usable of the {GPU_NAME}) | **{total / GiB:.2f}** |")
    return lines + [""]


def plan(config: str) -> list[str]:
    """The markdown section of one preset: its configured learner and rollout worker, then the alternatives."""
    from common.config import load_config

    cfg = load_config(config)
    lora = cfg.learner.lora.enabled
    s = model_shape(cfg)
    ac = cfg.model.gradient_checkpointing
    out = [f"## {Path(config).name}", "",
           f"{s.params / 1e9:.2f}B parameters ({s.adapters / 1e6:.1f}M LoRA r={cfg.learner.lora.r}), "
           f"{cfg.learner.num_ranks} learner ranks, micro_batch_tokens {cfg.learner.micro_batch_tokens}, "
           f"prompt <= {cfg.rollout.max_prompt_tokens} + gen {cfg.sampler.gen_length} tokens, sampler.cache "
           f"{cfg.sampler.cache}, rollout.eval_batch_tokens {cfg.rollout.eval_batch_tokens}.", ""]
    out += _table(f"learner rank as configured (lora={lora}, activation checkpointing={ac})",
                  learner_rank(cfg, s, lora=lora, checkpointing=ac))
    out += _table(f"learner rank, activation checkpointing={not ac}", learner_rank(cfg, s, lora=lora, checkpointing=not ac))
    out += _table("learner rank, full fine-tuning (lora off)", learner_rank(cfg, s, lora=False, checkpointing=ac))
    out += _table("learner rank, full fine-tuning, learner.reduce_every_backward",
                  learner_rank(cfg, s, lora=False, checkpointing=ac, every_backward=True))
    out += _table(f"rollout worker as configured (cache={cfg.sampler.cache})",
                  rollout_worker(cfg, s, lora=lora, cache=cfg.sampler.cache))
    for cache in ("prefix", "dual"):
        if cache != cfg.sampler.cache:
            out += _table(f"rollout worker, cache={cache}", rollout_worker(cfg, s, lora=lora, cache=cache))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="preset(s) to plan (default: both llada8b presets)")
    p.add_argument("--out", help="also write the plan to this markdown file")
    args = p.parse_args(argv)
    lines = ["# Memory plan of the LLaDA-8B presets (per GPU)", "",
             "Written by `python -m benchmarks.memory_plan --out benchmarks/results/memory_plan.md`; the formulas are "
             "in the script's docstring. GPU: the deploy manifests' " f"{GPU_NAME} (deploy/cluster.yaml: learner node "
             "g6e.12xlarge = 4 x L40S, rollout node g6e.2xlarge = 1 x L40S; deploy/rayjob.yaml asks for "
             "nvidia.com/gpu without a type, the same GPU is assumed), 1 GiB of it kept for the CUDA context, NCCL and "
             "allocator slack. Estimates, not measurements: check them on the first real run "
             "(torch.cuda.max_memory_allocated per component).", ""]
    for config in args.config or PRESETS:
        lines += plan(config)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
