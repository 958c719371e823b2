"""Learner benchmark: tokens/s and MFU of the SFT loss's forward+backward, memory with and without
activation checkpointing, and weight-sync time over cuda_ipc (two processes, one GPU) and object_store.

    python -m benchmarks.bench_learner --out results/bench_learner          # GPU: 1b preset, bf16
    python -m benchmarks.bench_learner --preset tiny --batch 4 --seq 64 --out /tmp/bl   # CPU mode

FLOPs per step (model FLOPs; activation recomputation is not counted):
    6 * N_blocks * B*L                    matmuls in the transformer blocks (N_blocks = block parameters)
  + 12 * n_layers * L * d_model * B*L     attention scores and values (fwd 4*L^2*D per layer, x3 for fwd+bwd)
  + 6 * V * d_model * M                   the LM head, applied only to the M masked tokens (as the loss does)
MFU = FLOPs / time / peak dense bf16 FLOP/s of the device (H100/H200: 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default: 1b on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="samples per micro-batch (default 8 GPU, 4 CPU)")
    p.add_argument("--seq", type=int, default=None, help="prompt+completion tokens (default 1024 GPU, 64 CPU)")
    p.add_argument("--iters", type=int, default=5, help="timed forward+backward iterations")
    p.add_argument("--sync-iters", type=int, default=5, help="timed weight syncs per transport")
    p.add_argument("--out", required=True, help="directory for bench_learner.json and bench_learner.md")
    return p.parse_args()


# --- learner forward+backward
def make_batch(B: int, L: int, vocab: int, seed: int = 0):
    import torch

    from common.trajectory import Trajectory

    P = L // 4
    G = L - P
    g = torch.Generator().manual_seed(seed)
    zf = torch.zeros(B, G)
    return Trajectory(torch.randint(5, vocab, (B, P), generator=g), torch.ones(B, P, dtype=torch.bool),
                      torch.randint(5, vocab, (B, G), generator=g), torch.zeros(B, G, dtype=torch.long), zf, zf, zf,
                      zf, torch.zeros(B, 1), torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long))


def flops_per_step(config, B: int, L: int, masked: float) -> float:
    d, n = config.d_model, config.n_layers
    block_params = n * (2 * d + 2 * d * d + 2 * d * config.n_kv_heads * config.head_dim + 3 * d * config.mlp_hidden_size)
    return 6 * block_params * B * L + 12 * n * L * d * B * L + 6 * config.embedding_size * d * masked


def bench_fwd_bwd(preset: str, B: int, L: int, iters: int, activation_checkpointing: bool, cuda: bool) -> dict:
    import functools
    import time

    import torch

    from common.config import LearnerConfig, ModelConfig
    from learner.losses.base import select_rows
    from learner.sft import build_sft_loss
    from learner.worker import LearnerRank

    dtype = "bfloat16" if cuda else "float32"
    cfg = LearnerConfig(num_gpus_per_rank=1.0 if cuda else 0.0, param_dtype=dtype, micro_batch_tokens=B * L)
    model_cfg = ModelConfig(preset=preset, dtype=dtype, gradient_checkpointing=activation_checkpointing)
    loss_factory = functools.partial(build_sft_loss, mask_id=3)
    rank = LearnerRank(cfg, model_cfg, rank=0, world_size=1, loss_factory=loss_factory, seed=0)
    rank.setup("127.0.0.1", 0)
    config = rank.hf_config
    batch = rank.loss.prepare(make_batch(B, L, config.vocab_size), seed=0)
    micro = select_rows(batch, slice(0, B)).to(rank.device)
    masked = float(batch.extras["sft_masked_BG"].sum())
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    rank.loss.backward(rank.model, micro, total_samples=B)  # warm-up (allocator, kernels)
    rank.optimizer.zero_grad(set_to_none=False)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    for _ in range(iters):
        rank.loss.backward(rank.model, micro, total_samples=B)
    sync()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    step_start = time.perf_counter()
    rank.step(make_batch(B, L, config.vocab_size, seed=1), step_seed=1)
    step_seconds = time.perf_counter() - step_start
    flops = flops_per_step(config, B, L, masked)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    result = {
        "preset": preset, "device": name, "activation_checkpointing": activation_checkpointing,
        "batch": B, "seq": L, "params": sum(p.numel() for p in rank.model.parameters()),
        "fwd_bwd_s": seconds, "tokens_per_s": B * L / seconds, "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak_flops if peak_flops else None, "full_step_s": step_seconds,
        "peak_mem_gb": peak / 1e9, "activation_mem_gb": (peak - before) / 1e9,
    }
    rank.model = rank.optimizer = None
    del rank
    if cuda:
        torch.cuda.empty_cache()
    return result


# --- weight sync
def _ipc_receiver(preset: str, queue, done) -> None:
    import time

    import torch

    from common.model import build_model, preset_config
    from rollout.weight_sync import CudaIpcReceiver

    model = build_model(preset_config(preset), dtype="bfloat16", device="meta").to_empty(device="cuda")
    receiver = CudaIpcReceiver()
    while (update := queue.get()) is not None:
        start = time.perf_counter()
        receiver.receive(model, update)
        done.put(time.perf_counter() - start)


def bench_cuda_ipc(preset: str, iters: int) -> dict:
    import time

    import torch
    import torch.multiprocessing as mp

    from common.model import build_model, preset_config
    from learner.weight_sync import CudaIpcSender

    model = build_model(preset_config(preset), dtype="bfloat16", device="meta").to_empty(device="cuda")
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_receiver, args=(preset, queue, done))
    proc.start()
    sender = CudaIpcSender()
    totals, receives, sends = [], [], []
    for _ in range(iters + 1):
        start = time.perf_counter()
        update = sender.send(model.state_dict().items(), 0)
        queue.put(update)
        receive_s = done.get(timeout=300)
        totals.append(time.perf_counter() - start)
        receives.append(receive_s)
        sends.append(update.metrics["sync/seconds"])
    queue.put(None)
    proc.join(timeout=60)
    gbytes = update.total_bytes / 1e9
    steady = sorted(totals[1:])[len(totals[1:]) // 2]
    return {"transport": "cuda_ipc", "gbytes": gbytes, "first_s": totals[0], "median_s": steady,
            "send_s": sorted(sends[1:])[iters // 2], "receive_s": sorted(receives[1:])[iters // 2],
            "gb_per_s": gbytes / steady}


def bench_object_store(preset: str, iters: int, cuda: bool) -> dict:
    import time

    import ray

    from common.model import build_model, preset_config
    from learner.weight_sync import ObjectStoreSender

    ray.init(address="local", include_dashboard=False, log_to_driver=False)

    @ray.remote(num_gpus=0.5 if cuda else 0)
    class Receiver:
        def __init__(self):
            from rollout.weight_sync import ObjectStoreReceiver

            device = "cuda" if cuda else "cpu"
            self.model = build_model(preset_config(preset), dtype="bfloat16", device="meta").to_empty(device=device)
            self.receiver = ObjectStoreReceiver()

        def receive(self, update):
            start = time.perf_counter()
            self.receiver.receive(self.model, update)
            if cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter() - start

    device = "cuda" if cuda else "cpu"
    model = build_model(preset_config(preset), dtype="bfloat16", device="meta").to_empty(device=device)
    receiver = Receiver.remote()
    ray.get(receiver.__ray_ready__.remote())
    sender = ObjectStoreSender()
    totals, sends, receives = [], [], []
    for _ in range(iters):
        start = time.perf_counter()
        update = sender.send(model.state_dict().items(), 0)
        receives.append(ray.get(receiver.receive.remote(update)))
        totals.append(time.perf_counter() - start)
        sends.append(update.metrics["sync/seconds"])
    ray.shutdown()
    gbytes = update.total_bytes / 1e9
    mid = iters // 2
    return {"transport": "object_store", "gbytes": gbytes, "first_s": totals[0], "median_s": sorted(totals)[mid],
            "send_s": sorted(sends)[mid], "receive_s": sorted(receives)[mid], "gb_per_s": gbytes / sorted(totals)[mid]}


def main() -> None:
    args = parse()
    import torch
    import torch.distributed as dist

    from learner.worker import free_port

    cuda = torch.cuda.is_available()
    preset = args.preset or ("1b" if cuda else "tiny")
    B = args.batch or (8 if cuda else 4)
    L = args.seq or (1024 if cuda else 64)
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0) if cuda else None)
    learner = [bench_fwd_bwd(preset, B, L, args.iters, ac, cuda) for ac in (False, True)]
    dist.destroy_process_group()
    sync = [bench_object_store(preset, args.sync_iters, cuda)]
    if cuda:
        sync.insert(0, bench_cuda_ipc(preset, args.sync_iters))

    lines = [f"## Learner ({preset}, batch {B} x {L} tokens, {learner[0]['device']})", "",
             "| activation ckpt | fwd+bwd s | tokens/s | TFLOP/s | MFU | full step s | peak GB | activations GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in learner:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['activation_checkpointing']} | {r['fwd_bwd_s']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops_per_s']:.2f} | {mfu} | {r['full_step_s']:.3f} | {r['peak_mem_gb']:.2f} | "
                     f"{r['activation_mem_gb']:.2f} |")
    lines += ["", f"## Weight sync ({preset}, bf16)", "",
              "| transport | GB | first s | median s | send s | receive s | GB/s |", "|---|---|---|---|---|---|---|"]
    for r in sync:
        lines.append(f"| {r['transport']} | {r['gbytes']:.3f} | {r['first_s']:.4f} | {r['median_s']:.4f} | "
                     f"{r['send_s']:.4f} | {r['receive_s']:.4f} | {r['gb_per_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_learner " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    (out / "bench_learner.json").write_text(json.dumps({"command": command, "learner": learner, "sync": sync}, indent=2))
    (out / "bench_learner.md").write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
