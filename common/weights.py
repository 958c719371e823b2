"""The weight-broadcast interface both sides share: transports, the wire layout and the update message.

Protocol (one version): the driver asks the learner group to ``send`` the policy; learner rank 0's
``WeightSender.send(named_tensors, version)`` returns a small picklable ``WeightUpdate``; the driver hands
it to every rollout actor, whose ``WeightReceiver.receive(model, update)`` loads the weights and returns
the version. Rollout actors call ``receive`` only between rollouts and stamp trajectories with the version.

Wire layout: tensors in the order of the model's ``state_dict()`` (the same on every side, since both
build the same architecture), packed into one flat byte buffer at 256-byte aligned offsets
(``flat_layout``). ``nccl`` cuts that buffer into buckets; ``cuda_ipc`` shares it; ``object_store`` puts it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

TRANSPORTS = ("object_store", "cuda_ipc", "nccl")
ALIGN_BYTES = 256


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in the flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    offset: int  # bytes from the start of the flat buffer
    nbytes: int


@dataclass
class WeightUpdate:
    """The message the driver forwards from the learner to rollout actors for one policy version."""

    version: int
    transport: str
    layout: tuple[TensorMeta, ...]
    total_bytes: int
    payload: Any = None  # object_store: ObjectRef of the flat buffer; cuda_ipc: (buffer id, IPC handle)
    metrics: dict[str, float] = field(default_factory=dict)  # sender side: sync seconds, GB/s
    # Adapter-only sync (LoRA over a checkpoint base): {module prefix: scale}; the layout then holds
    # "<prefix>.lora_A" / "<prefix>.lora_B" and receivers merge W = W0 + scale * B @ A into their own base.
    lora_scales: dict[str, float] | None = None


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a weight layout")
    return dtype


def flat_layout(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[tuple[TensorMeta, ...], int]:
    """Aligned offsets of (name, shape, dtype) in one flat byte buffer; returns (layout, total bytes)."""
    layout, offset = [], 0
    for name, shape, dtype in specs:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        layout.append(TensorMeta(name, tuple(shape), str(dtype).removeprefix("torch."), offset, nbytes))
        offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(layout), offset


def view_in(buffer_U8: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """The tensor ``meta`` describes, as a view into the flat uint8 buffer."""
    raw = buffer_U8[meta.offset: meta.offset + meta.nbytes]
    return raw.view(dtype_of(meta.dtype)).view(meta.shape)


def model_layout(model: torch.nn.Module) -> tuple[tuple[TensorMeta, ...], int]:
    """The wire layout of ``model``'s own state dict (what a receiver expects)."""
    return flat_layout((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())


def load_views(targets: dict[str, torch.Tensor], views: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Copy (name, tensor) pairs into ``targets`` (a state dict, or adapter buffers) in place; returns bytes."""
    copied, seen = 0, set()
    with torch.no_grad():
        for name, tensor in views:
            if name not in targets:
                raise ValueError(f"weight update has tensor {name!r} the rollout side does not have")
            if targets[name].shape != tensor.shape:
                raise ValueError(f"weight update: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the rollout model has {tuple(targets[name].shape)}")
            targets[name].copy_(tensor, non_blocking=True)
            copied += tensor.numel() * tensor.element_size()
            seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(f"weight update lacks {missing[0]!r} ({len(missing)} tensors missing): "
                         "learner and rollout models differ")
    return copied


def check_layout(update: WeightUpdate, targets: dict[str, torch.Tensor]) -> None:
    """Fail with one line when the update's tensors do not match the receiving side's ``targets``."""
    names = [m.name for m in update.layout]
    expected = list(targets)
    for i in range(max(len(names), len(expected))):
        sent = names[i] if i < len(names) else None
        held = expected[i] if i < len(expected) else None
        if sent != held:
            raise ValueError(f"weight layout mismatch at tensor {i}: sender has {sent!r}, receiver has {held!r}")


@dataclass(frozen=True)
class Bucket:
    """A run of consecutive tensors broadcast as one flat buffer (offsets relative to the bucket)."""

    metas: tuple[TensorMeta, ...]
    nbytes: int


def bucketize(layout: tuple[TensorMeta, ...], bucket_bytes: int) -> list[Bucket]:
    """Cut a layout into consecutive buckets of at most ``bucket_bytes`` (a bigger tensor gets its own)."""
    buckets, current, size = [], [], 0
    for meta in layout:
        padded = -(-meta.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        if current and size + padded > bucket_bytes:
            buckets.append(Bucket(tuple(current), size))
            current, size = [], 0
        current.append(TensorMeta(meta.name, meta.shape, meta.dtype, size, meta.nbytes))
        size += padded
    if current:
        buckets.append(Bucket(tuple(current), size))
    return buckets


def connect_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0):
    """A process group of its own (not the default one) for weight broadcast; rank 0 hosts the store.

    Learner rank 0 already belongs to the learner's default group, so the weight group is built from a
    private TCPStore instead of ``init_process_group``.
    """
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore("unmask-weights", dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"weight group backend must be nccl or gloo, got {backend!r}")


def close_group(group) -> None:
    """Shut a replaced weight-broadcast group down (communicators, and the TCPStore it holds) rather than
    dropping it: with pool churn every rebuild would otherwise leak a group and a listening store."""
    if group is not None:
        group.shutdown()


class WeightSender(ABC):
    """Learner side (rank 0 sends; other learner ranks only take part in gathering the full tensors)."""

    name: str

    @abstractmethod
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightUpdate:
        """Publish full tensors (state-dict order) as ``version``; returns the message for the receivers."""

    def close(self) -> None:
        """Release buffers and groups."""


class WeightReceiver(ABC):
    """Rollout side: load a published version into the local model."""

    name: str

    def receive(self, model: torch.nn.Module, update: WeightUpdate | None = None) -> int:
        """Load ``update`` into ``model`` in place; returns the policy version now held (nccl needs no
        ``update``: its broadcast header carries the version)."""
        return self.receive_into(model.state_dict(), update)

    @abstractmethod
    def receive_into(self, targets: dict[str, torch.Tensor], update: WeightUpdate | None) -> int:
        """Load ``update`` into ``targets`` (a state dict, or adapter buffers) in place; returns its version."""

    def close(self) -> None:
        """Release handles and groups."""


def resolve_transport(choice: str, *, learner_gpus: float, rollout_gpus: float) -> str:
    """``auto``: nccl when learner and rollout actors have GPUs, object_store on CPU. cuda_ipc (learner and
    rollout actors sharing one GPU through fractional num_gpus) is chosen by name."""
    if choice != "auto":
        if choice not in TRANSPORTS:
            raise ValueError(f"unknown weight transport {choice!r}; choose auto or one of {TRANSPORTS}")
        return choice
    return "nccl" if learner_gpus > 0 and rollout_gpus > 0 else "object_store"
