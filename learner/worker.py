"""One learner rank: the policy under FSDP2, AdamW, the step loop over micro-batches, checkpoints, weight sending.

``LearnerGroup`` runs M of these as Ray actors in one torch.distributed group; tests also run a single
rank in-process. Every public method is collective: all ranks must call it, in the same order.

Step semantics: every rank receives the whole batch and, for each of ``inner_epochs`` optimizer steps,
``loss.prepare``s it with the step seed and the epoch (identical on all ranks), takes its contiguous shard of samples, cuts it into micro-batches of at most
``micro_batch_tokens // (P + G)`` samples, and calls ``loss.backward`` per micro-batch with
``total_samples`` = the global batch size. Every rank runs the same number of micro-batches (FSDP's
collectives must pair up); a rank short of samples replays one row with ``total_samples=inf`` (zero
weight). The loss must therefore run the same number of forward/backward passes for every micro-batch, or agree
on them with the other ranks (the canvas losses: ``learner.canvas_steps.backward_by_prompt_length``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from common.config import LearnerConfig, ModelConfig
from common.model import family_of, to_dtype
from common.trajectory import Trajectory
from common.weights import WeightUpdate, flat_layout
from learner import checkpoint as ckpt
from learner.losses import EDIT_LOSSES
from learner.losses.base import PolicyLoss, select_rows
from learner.losses.offpolicy import LAG_KEY, lag_metrics, policy_lag, weight_summary
from learner.lora import apply_lora, is_adapter, lora_scales
from learner.optim import build_optimizer, lr_at, set_lr
from learner.step_states import editing
from learner.weight_sync import build_sender

log = logging.getLogger("unmask.learner")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's address as Ray reports it (works inside and outside a Ray worker)."""
    import ray

    return ray.util.get_node_ip_address()


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous split of ``total`` samples; the first ``total % world_size`` ranks get one more."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TooManyBadSteps(RuntimeError):
    """More than ``learner.max_bad_steps`` consecutive non-finite steps: the run must stop."""


class LearnerRank:
    """One rank; construct, then ``setup(master_addr, master_port)`` on every rank at once."""

    def __init__(self, cfg: LearnerConfig, model_cfg: ModelConfig, *, rank: int, world_size: int,
                 loss_factory: Callable[[], object], seed: int, ref_model: bool = False):
        from common.threads import set_cpu_threads

        set_cpu_threads()  # the CPUs Ray assigned this rank
        self.cfg, self.model_cfg = cfg, model_cfg
        self.rank, self.world_size = rank, world_size
        self.loss_factory, self.seed, self.use_ref = loss_factory, seed, ref_model
        self.device = torch.device("cuda", 0) if cfg.num_gpus_per_rank > 0 else torch.device("cpu")
        self.version = 0  # policy version = optimizer steps taken
        self.step_count = 0  # step() calls, including skipped ones
        self.bad_steps = 0  # consecutive skipped steps
        self.sender = None

    def address(self) -> tuple[str, int]:
        """(ip, free port) of this rank's node: rank 0's becomes the group's rendezvous."""
        return node_ip(), free_port()

    # --- setup
    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group, build and shard the policy, build the optimizer and the loss."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

        from common.model import build_model
        from common.policy import policy_config

        backend = self._join_group(master_addr, master_port)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # Trained weights are fp32 masters (MixedPrecisionPolicy casts them for compute); a frozen LoRA base is
        # stored in the compute dtype (an fp32 copy of LLaDA-8B's base would be 32 GB for nothing).
        base_dtype = to_dtype(self.cfg.param_dtype) if self.cfg.lora.enabled else torch.float32
        full_state = self._rank0_state(base_dtype)
        self._buffers = self._rank0_buffers()
        mp = MixedPrecisionPolicy(param_dtype=to_dtype(self.cfg.param_dtype), reduce_dtype=to_dtype(self.cfg.reduce_dtype))

        model = build_model(policy_config(self.model_cfg), dtype=base_dtype, device="meta")
        self.hf_config = model.config
        if self.cfg.lora.enabled:
            apply_lora(model, self.cfg.lora)
        self.lora_scales = lora_scales(model)
        model.set_activation_checkpointing(self.model_cfg.gradient_checkpointing)
        model = self._sharded(model, full_state, mesh, mp)
        self.ref_model = None
        if self.use_ref:  # the frozen initial policy, sharded like the policy (an 8B copy per rank would not fit)
            ref_state = None if full_state is None else {  # in the ref's dtype: the broadcast needs them equal
                k: v.to(to_dtype(self.cfg.param_dtype)) for k, v in full_state.items() if not is_adapter(k)}
            ref = build_model(policy_config(self.model_cfg), dtype=self.cfg.param_dtype, device="meta")
            self.ref_model = self._sharded(ref, ref_state, mesh, mp).eval().requires_grad_(False)
        del full_state
        # Losses already divide by the global sample count, so ranks must SUM gradients (FSDP averages by default).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        model.train()
        self.model = model
        self.optimizer = build_optimizer(self.cfg, model.parameters())
        self.loss = self.loss_factory()
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.rank == 0:
            log.info("learner: %d ranks on %s (%s), %.2fM params (%.2fM trainable), lora=%s",
                     self.world_size, self.device.type, backend, n_params / 1e6, n_train / 1e6, self.cfg.lora.enabled)
        return {"params": n_params, "trainable_params": n_train, "backend": backend}

    def _join_group(self, master_addr: str, master_port: int) -> str:
        """Join the learner's default process group; returns its backend."""
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # In-process tests build several single-rank learners in one process: they share one group.
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.rank, world_size=self.world_size)
        return backend

    def _rank0_state(self, base_dtype: torch.dtype) -> dict | None:
        """The full initial state on rank 0 (None elsewhere). Only rank 0 reads the weights (an 8B checkpoint
        once per node, not once per rank); the others build on the meta device and receive their shards."""
        from common.policy import load_policy

        if self.rank != 0:
            return None
        torch.manual_seed(self.seed)
        full, _ = load_policy(self.model_cfg)
        persistent = full.state_dict().keys()  # the others keep their own dtype (not the cast below)
        self._full_buffers = {n: b.clone() for n, b in full.named_buffers() if n not in persistent}
        full = full.to(base_dtype)
        if self.cfg.lora.enabled:  # adapters in fp32
            apply_lora(full, self.cfg.lora)
        return full.state_dict()

    def _rank0_buffers(self) -> dict[str, torch.Tensor]:
        """Every rank's copy of rank 0's non-persistent buffers (rotary frequencies, embedding scales): a state
        dict leaves them out, and a model built on the meta device holds garbage there after ``to_empty``."""
        buffers = [getattr(self, "_full_buffers", None)]
        if self.world_size > 1:
            dist.broadcast_object_list(buffers, src=0)
        return buffers[0] or {}

    def _sharded(self, model: torch.nn.Module, state: dict | None, mesh, mp) -> torch.nn.Module:
        """fully_shard per block and at the root, then fill every rank's shards from rank 0's ``state``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if not family_of(model).canvases:  # DiffusionGemma's encoder and decoder layers share
            for block in model.blocks:  # their parameters: one root unit holds both (FSDP2 shards shared ones once)
                fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.to_empty(device=self.device)
        # (a copy: set_model_state_dict writes the local shards back into the dict it is given)
        set_model_state_dict(model, dict(state or {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in self._buffers:
                    buffer.copy_(self._buffers[name].to(buffer.dtype))
        # Losses call hidden_states + vocab_logits directly (to project only the rows they need), so those
        # methods need FSDP's unshard/reshard hooks just like forward (and DiffusionGemma's encode).
        for method in ("hidden_states", "vocab_logits", "encode"):  # encode: DiffusionGemma's encoder
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
        return model

    # --- step
    def step(self, batch: Trajectory, step_seed: int) -> dict[str, float]:
        """``inner_epochs`` optimizer steps over the whole batch; returns metrics all-reduced over ranks (same
        on every rank): sums over the epochs, ``loss`` and ``grad_norm`` their means. The policy version and
        the LR schedule advance once per batch (rollouts see only the batch's last weights)."""
        start = time.perf_counter()
        total = len(batch)
        if total == 0:
            raise ValueError("learner step got an empty batch")
        if editing(batch) and not getattr(self.loss, "scores_edits", False):
            raise ValueError(f"the batch was decoded with token editing (sampler.edit_threshold), which "
                             f"{type(self.loss).__name__} does not score; train it with algorithm.name "
                             f"{' or '.join(EDIT_LOSSES)}")
        if self.cfg.routing == "recompute":  # the router chooses again: the sampler's record is not read
            batch = dataclasses.replace(batch, extras={k: v for k, v in batch.extras.items()
                                                       if k not in ("routing_settled_BLR", "routing_step_BTKR")})
        seq_len = batch.prompt_ids_BP.shape[1] + batch.completion_ids_BG.shape[1]
        per_micro = max(1, self.cfg.micro_batch_tokens // seq_len)
        num_micro = math.ceil(math.ceil(total / self.world_size) / per_micro)
        lr = lr_at(self.cfg, self.version)
        metrics: dict[str, float] = {}
        if isinstance(self.loss, PolicyLoss) and batch.policy_version_B is not None:  # SFT rows have no sampler
            batch.extras[LAG_KEY] = policy_lag(batch.policy_version_B, self.version)
            metrics.update(lag_metrics(batch.extras[LAG_KEY], batch.group_B))
        norms, applied = [], 0
        epochs = getattr(self.loss, "inner_epochs", 1)  # algorithm.inner_epochs; SFT takes one pass
        for epoch in range(epochs):
            prepared = self.loss.prepare(batch, seed=step_seed, **({"epoch": epoch} if epochs > 1 else {}))
            sums = self._accumulate(prepared, per_micro, num_micro)
            for k, v in sums.items():
                metrics[k] = metrics.get(k, 0.0) + v
            grad_norm, ok = self._apply(lr, sums.get("loss", 0.0))
            norms.append(grad_norm)
            applied += ok
        self.step_count += 1
        skipped = applied == 0
        if not skipped:
            self.version += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        metrics["loss"] = metrics.get("loss", 0.0) / epochs
        metrics.update(weight_summary(metrics))
        routed = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith("expert_tokens/")]}
        if routed:  # share of routed slots per expert (mean over MoE layers); max share x experts: 1 is balanced
            total_routed = sum(routed.values())
            metrics.update({f"expert_share/{k.split('/')[1]}": v / total_routed for k, v in routed.items()})
            metrics["expert_load_max"] = max(routed.values()) / total_routed * len(routed)
        if "tokens" in metrics:  # the loss's count of scored tokens (what its ratio sums are over); not the batch's
            metrics["scored_tokens"] = metrics.pop("tokens")
        metrics.update({
            "grad_norm": sum(norms) / len(norms), "lr": lr, "step_time_s": seconds, "tokens": float(total * seq_len),
            "tokens_per_s": total * seq_len / seconds, "batch_samples": float(total), "micro_batches": float(num_micro),
            "skipped": float(skipped), "version": float(self.version), "optimizer_steps": float(applied),
        })
        return metrics

    def _accumulate(self, batch: Trajectory, per_micro: int, num_micro: int) -> dict[str, float]:
        """Gradients of one prepared batch, accumulated over this rank's micro-batches; metric sums of all ranks."""
        total = len(batch)
        lo, hi = shard_bounds(total, self.world_size, self.rank)
        sums: dict[str, float] = {}
        for i in range(num_micro):
            last_micro = i == num_micro - 1
            self._grad_sync(last_micro, True)  # for a loss that makes one pass and calls no hook
            hook = functools.partial(self._grad_sync, last_micro)
            a, b = lo + i * per_micro, min(hi, lo + (i + 1) * per_micro)
            if a < b:
                metrics = self.loss.backward(self.model, select_rows(batch, slice(a, b)).to(self.device),
                                             total_samples=total, ref_model=self.ref_model, before_backward=hook)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            else:  # zero-weight replay so this rank's FSDP collectives pair with the other ranks'
                self.loss.backward(self.model, select_rows(batch, slice(0, 1)).to(self.device),
                                   total_samples=math.inf, ref_model=self.ref_model, before_backward=hook)
        if family_of(self.model).routed:  # the expert load of this step's forwards, summed over ranks below
            for e, n in enumerate(self.model.take_expert_counts().tolist()):
                sums[f"expert_tokens/{e}"] = float(n)
        return self._all_reduce_sums(sums)

    def _grad_sync(self, last_micro: bool, last_pass: bool) -> None:
        """Reduce-scatter gradients only on the optimizer step's last backward: the earlier ones accumulate
        unsharded gradients locally (in the reduce dtype), so collectives per step do not grow with K or M
        (``learner.reduce_every_backward`` trades that accumulator's memory for K x M reductions)."""
        self.model.set_requires_gradient_sync(self.cfg.reduce_every_backward or (last_micro and last_pass))

    def _apply(self, lr: float, loss_value: float) -> tuple[float, bool]:
        """Clip and take the optimizer step unless the loss or gradient is non-finite; returns (grad norm, taken)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)))
        ok = math.isfinite(grad_norm) and math.isfinite(loss_value)
        if not ok:
            self.bad_steps += 1
            reason = f"non-finite {'loss' if not math.isfinite(loss_value) else 'grad norm'} " \
                     f"(loss={loss_value}, grad_norm={grad_norm})"
            if self.rank == 0:
                log.warning("learner step %d skipped: %s", self.step_count + 1, reason)
            if self.bad_steps > self.cfg.max_bad_steps:
                raise TooManyBadSteps(f"{self.bad_steps} consecutive learner steps had a {reason}; more than "
                                   f"learner.max_bad_steps={self.cfg.max_bad_steps}: lower learner.lr or check the data")
        else:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            self.bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def _all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, sums)
        out: dict[str, float] = {}
        for part in gathered:
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    # --- checkpoints
    def save(self, root: str, run_state: dict) -> str:
        """Checkpoint into ``root/step_<version>`` and prune to ``keep_checkpoints``; returns the directory."""
        directory = ckpt.step_dir(root, self.version)
        meta = {"step": self.step_count, "version": self.version, "run_state": run_state,
                "world_size": self.world_size, "bad_steps": self.bad_steps}
        ckpt.save_checkpoint(directory, self.model, self.optimizer, meta=meta, rank=self.rank)
        if self.rank == 0:
            ckpt.prune_checkpoints(Path(root), self.cfg.keep_checkpoints)
        dist.barrier()
        return str(directory)

    def load(self, directory: str) -> dict:
        """Restore from a complete checkpoint directory; returns its record (incl. the driver's ``run_state``)."""
        meta = ckpt.load_checkpoint(Path(directory), self.model, self.optimizer, rank=self.rank)
        self.step_count, self.version, self.bad_steps = meta["step"], meta["version"], meta.get("bad_steps", 0)
        return meta

    def full_state(self) -> dict | None:
        """Unsharded model and optimizer state on CPU (rank 0; None elsewhere), for tests and debugging."""
        model = ckpt.full_model_state(self.model)
        optim = ckpt.full_optimizer_state(self.model, self.optimizer)
        ref = ckpt.full_model_state(self.ref_model) if self.ref_model is not None else None
        if self.rank != 0:
            return None
        return {"model": model, "optim": optim, "ref": ref, "version": self.version, "step": self.step_count}

    def export_hf(self, directory: str) -> str | None:
        """HF-format policy (LoRA merged) in the model's dtype, written by rank 0."""
        state = self.state_dict_for_sync()  # the same tensors rollout actors get: LoRA merged, model dtype
        if self.rank != 0:
            return None
        return str(ckpt.export_hf(state, self.hf_config, directory, dtype=self.model_cfg.dtype))

    # --- weight sync
    @property
    def sync_adapters(self) -> bool:
        """Send only LoRA adapters: rollout actors hold the same checkpoint base and merge them themselves."""
        return bool(self.lora_scales) and self.cfg.lora.sync_adapters and self.model_cfg.path is not None

    def sync_tensors(self, adapters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective generator in state-dict order: full tensors, LoRA merged, in the rollout dtype; or with
        ``adapters`` only the full fp32 ``lora_A`` / ``lora_B`` tensors."""
        dtype = to_dtype(self.model_cfg.dtype)
        state = self.model.state_dict()
        if adapters:
            for name, tensor in state.items():
                if is_adapter(name):
                    yield name, _full(tensor.detach()).float()
            return
        for name, tensor in state.items():
            if is_adapter(name):
                continue
            full = _full(tensor.detach())
            prefix = name.removesuffix(".weight")
            if prefix in self.lora_scales:
                delta = _full(state[f"{prefix}.lora_B"].detach()).float() @ _full(state[f"{prefix}.lora_A"].detach()).float()
                full = full.float() + self.lora_scales[prefix] * delta
            yield name, full.to(dtype)

    def state_dict_for_sync(self) -> dict[str, torch.Tensor] | None:
        """What a weight sync sends, as CPU tensors (rank 0; None elsewhere)."""
        out = {name: t.to("cpu", copy=True) for name, t in self.sync_tensors()}  # never alias live parameters
        return out if self.rank == 0 else None

    def sync_layout(self, adapters: bool = False):
        """The wire layout of the synced tensors (names, global shapes, dtype on the wire)."""
        dtype = torch.float32 if adapters else to_dtype(self.model_cfg.dtype)
        return flat_layout((n, tuple(t.shape), dtype) for n, t in self.model.state_dict().items()
                           if is_adapter(n) == adapters)

    def init_weight_sync(self, transport: str, num_receivers: int = 0) -> dict | None:
        """Build rank 0's sender; for nccl returns the rendezvous (host, port, world_size) receivers need."""
        if self.rank != 0:
            return None
        info: dict = {"transport": transport}
        kwargs: dict = {}
        if transport == "nccl":
            if num_receivers < 1:
                raise ValueError("nccl weight sync needs num_receivers >= 1 (the rollout actors)")
            layout, total = self.sync_layout(self.sync_adapters)
            host, port = node_ip(), free_port()
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            info.update(host=host, port=port, world_size=num_receivers + 1, backend=backend,
                        bucket_bytes=self.cfg.sync_bucket_mb << 20, timeout_s=self.cfg.sync_timeout_s, layout=layout,
                        lora_scales=dict(self.lora_scales) if self.sync_adapters else None)
            kwargs = dict(host=host, port=port, world_size=num_receivers + 1, layout=layout, total_bytes=total,
                          bucket_bytes=self.cfg.sync_bucket_mb << 20, backend=backend, device=self.device,
                          timeout_s=self.cfg.sync_timeout_s)
        if self.sender is not None:
            self.sender.close()
        self.sender = build_sender(transport, **kwargs)
        return info

    def sync_weights(self) -> WeightUpdate | None:
        """Collective: gather the synced tensors and send them as the current version (rank 0 returns the update)."""
        adapters = self.sync_adapters
        tensors = self.sync_tensors(adapters)
        if self.rank != 0:
            for _ in tensors:  # take part in every gather rank 0 makes
                pass
            return None
        if self.sender is None:
            raise ValueError("call init_weight_sync(transport) before sync_weights()")
        update = self.sender.send(tensors, self.version)
        if adapters:
            update.lora_scales = dict(self.lora_scales)
        return update

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def reads(self, path: str, token: str) -> str | None:
        """None when ``path`` holds ``token`` on this rank's node; else what this node sees (for the error)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            return f"{node_ip()}: {type(e).__name__}"
        return None if text == token else f"{node_ip()}: another file"

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
