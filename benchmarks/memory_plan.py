"""Per-GPU memory plan of the GPU presets (LLaDA, Dream, SDAR 8B; LLaDA2.0-mini 16B MoE): a learner rank and a
rollout worker, checked against the GPU the deploy manifests request.

    python -m benchmarks.memory_plan                                   # every preset in PRESETS, to stdout
    python -m benchmarks.memory_plan --out benchmarks/results/memory_plan.md

Parameter counts come from the model built on the meta device, split by its own structure: a block is
the largest of ``model.blocks`` (the ModuleList every family has; a mixture of experts' MoE layer, not its dense
first one), the root is every parameter outside ``model.blocks``. The
presets' model.path is not needed: when its config.json is missing, the public shape named by the path's folder
stands in (STAND_INS: LLaDA-8B-Instruct -> llada-8b, Dream-v0-Instruct-7B -> dream-7b, SDAR-8B-Chat -> sdar-8b,
LLaDA2.0-mini -> llada2-mini). For LLaDA2 the MLP width is the dense layer's intermediate_size (5120), an upper
bound of a MoE layer's per-token activations (8 routed experts x 512 + the shared 512 = 4608).
Widths come from the config under each family's names (CONFIG_NAMES); kv = key/value heads x head width (GQA:
Dream 4 x 128, SDAR-8B 8 x 128; LLaDA-8B has as many key/value heads as heads, so kv = d_model there).
Everything else is arithmetic on the preset:

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
               the tensors autograd keeps: 7 d_model + 3 kv + 4 mlp_hidden (+ 7 r with LoRA) bf16 values
               (norm inputs and outputs, q, k, v, rotated q and k, attention output, four MLP intermediates; the
               query width is d_model in every shipped shape), + d_model + kv with per-head q/k norms (SDAR's
               Qwen3 body: the normed q and k); attention by a fused SDPA kernel, O(L) memory. With activation
               checkpointing: every block's input plus one block's full set during its recompute. The LM head
               runs on the step's block rows only (sequences x block_length rows x vocabulary, ~10 bytes per
               logit: bf16, fp32, fp32 grad).
rollout worker (one GPU):
  weights      all parameters in model.dtype
  sync staging adapter-only LoRA sync: a copy of the adapted base weights (model dtype) + fp32 adapter
               buffers (rollout/lora_merge.py); full-weight sync: one staging copy of the weights (nccl, or the
               object_store / cuda_ipc prefetch of rollout.prefetch_weights)
  activations  the larger of a rollout call (prompts_per_call x group_size sequences, x2 under cfg_scale) and
               an evaluation batch (rollout.eval_batch_tokens), at the longest prompt: the residual stream plus
               one block's transients (4 d_model + 3 mlp_hidden bf16 values per token; an upper bound under GQA,
               whose k and v are kv wide)
  KV cache     sampler.cache prefix/dual: keys and values of every layer for the whole sequence (2 kv values per
               token and layer: GQA caches only the key/value heads), model dtype
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
PRESETS = ("configs/llada8b_gsm8k.yaml", "configs/llada8b_countdown.yaml", "configs/dream7b_gsm8k.yaml",
           "configs/sdar8b_gsm8k.yaml", "configs/llada2mini_gsm8k.yaml")
# The public checkpoint a model.path folder names -> the preset of its exact shape (when config.json is absent).
STAND_INS = {"LLaDA-8B-Instruct": "llada-8b", "Dream-v0-Instruct-7B": "dream-7b", "SDAR-8B-Chat": "sdar-8b",
             "SDAR-1.7B-Chat": "sdar-1.7b", "LLaDA2.0-mini": "llada2-mini"}
# Per family, the config names of (width, MLP width, layers, vocabulary rows).
CONFIG_NAMES = {"llada": ("d_model", "mlp_hidden_size", "n_layers", "embedding_size"),
                "dream": ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"),
                "sdar": ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"),
                "llada2": ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    d: int
    mlp: int
    layers: int
    vocab: int
    kv: int  # key/value width: key/value heads x head width (< d under GQA)
    qk_norm: bool  # per-head q/k RMSNorm in each block (Qwen3: SDAR)
    params: int  # all parameters, adapters included
    adapters: int
    root: int  # embedding + LM head + final norm
    block: int  # one block's parameters, adapters included
    adapted: int  # base weights of the layers that carry adapters


def stand_in(path: str) -> str:
    """The preset of the public checkpoint a model.path folder names (used when its config.json is absent)."""
    name = Path(path).name
    if name not in STAND_INS:
        raise ValueError(f"model.path {path!r} has no config.json here and its folder names no known public shape; "
                         f"known: {sorted(STAND_INS)}")
    return STAND_INS[name]


def model_shape(cfg) -> Shape:
    """Counts from the policy built on the meta device (with the preset's LoRA adapters)."""
    from common.config import ModelConfig
    from common.model import build_model, family_of
    from common.policy import policy_config, resolve_path
    from learner.lora import LoraLinear, apply_lora, is_adapter

    model_cfg = cfg.model
    if model_cfg.path is not None and not (resolve_path(model_cfg.path) / "config.json").is_file():
        model_cfg = ModelConfig(preset=stand_in(model_cfg.path), dtype=cfg.model.dtype)  # the shape, no weights
    model = build_model(policy_config(model_cfg), device="meta")
    if cfg.learner.lora.enabled:
        apply_lora(model, cfg.learner.lora)
    named = dict(model.named_parameters())
    in_blocks = {id(p) for p in model.blocks.parameters()}
    block = max(model.blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    c = model.config
    d, mlp, layers, vocab = (getattr(c, k) for k in CONFIG_NAMES[family_of(c).name])
    return Shape(d=d, mlp=mlp, layers=layers, vocab=vocab or c.vocab_size, kv=model.n_kv_heads * model.head_dim,
                 qk_norm=any(n.endswith(("q_norm.weight", "k_norm.weight", "query_layernorm.weight"))
                             for n, _ in block.named_parameters()),
                 params=sum(p.numel() for p in named.values()),
                 adapters=sum(p.numel() for n, p in named.items() if is_adapter(n)),
                 root=sum(p.numel() for p in named.values() if id(p) not in in_blocks),
                 block=sum(p.numel() for p in block.parameters()),
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
    per_token_block = 2 * (7 * s.d + 3 * s.kv + 4 * s.mlp + 7 * r + ((s.d + s.kv) if s.qk_norm else 0))
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
    kv = 0 if cache == "none" else 2 * s.layers * tokens * s.kv * mbytes
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
    # the sequence grid (block-causal models) has one cache, 'prefix' (the finished blocks), and refuses 'dual'
    for cache in ("prefix",) if cfg.sampler.block_grid == "sequence" else ("prefix", "dual"):
        if cache != cfg.sampler.cache:
            out += _table(f"rollout worker, cache={cache}", rollout_worker(cfg, s, lora=lora, cache=cache))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="preset(s) to plan (default: PRESETS)")
    p.add_argument("--out", help="also write the plan to this markdown file")
    args = p.parse_args(argv)
    lines = ["# Memory plan of the GPU presets (per GPU)", "",
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
