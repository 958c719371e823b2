"""Weight senders (learner rank 0): object_store, cuda_ipc, nccl. Receivers live in rollout/weight_sync.py.

Every sender consumes full tensors in state-dict order (``named_tensors``: the learner's ranks gather
them together; only rank 0 sends) and returns the ``WeightUpdate`` the driver forwards to rollout actors.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import torch
import torch.distributed as dist

from common.weights import (TensorMeta, WeightSender, WeightUpdate, bucketize, close_group, connect_group, flat_layout,
                            view_in)



def _metrics(name: str, seconds: float, total_bytes: int) -> dict[str, float]:
    return {f"sync/{name}_seconds": seconds, "sync/seconds": seconds, "sync/gbytes": total_bytes / 1e9,
            "sync/gb_per_s": total_bytes / 1e9 / max(seconds, 1e-9)}


def _pack(named: list[tuple[str, torch.Tensor]], buffer_U8: torch.Tensor, layout: tuple[TensorMeta, ...]) -> None:
    for meta, (name, tensor) in zip(layout, named, strict=True):
        assert meta.name == name
        view_in(buffer_U8, meta).copy_(tensor)


class ObjectStoreSender(WeightSender):
    """CPU path: pack the full weights into one flat buffer, ``ray.put`` it once; receivers ``ray.get`` it."""

    name = "object_store"

    def __init__(self):
        self._ref = None  # keeps the newest version alive in the object store until the next send

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightUpdate:
        import ray

        start = time.perf_counter()
        named = [(n, t.detach().to("cpu")) for n, t in named_tensors]
        layout, total = flat_layout((n, tuple(t.shape), t.dtype) for n, t in named)
        buffer_U8 = torch.empty(total, dtype=torch.uint8)
        _pack(named, buffer_U8, layout)
        self._ref = ray.put(buffer_U8.numpy())
        metrics = _metrics(self.name, time.perf_counter() - start, total)
        return WeightUpdate(version, self.name, layout, total, payload=self._ref, metrics=metrics)

    def close(self) -> None:
        self._ref = None


class CudaIpcSender(WeightSender):
    """Same GPU: one persistent flat CUDA buffer shared by IPC handle; each version is copied into it.

    The handle is created once (and again only if the layout changes); receivers open it once and copy
    from it on every version. The driver must not start the next ``send`` before the receivers of the
    previous version have returned (it overwrites the buffer).
    """

    name = "cuda_ipc"

    def __init__(self):
        self._buffer_U8: torch.Tensor | None = None
        self._layout: tuple[TensorMeta, ...] | None = None
        self._handle = None
        self._buffer_id = ""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightUpdate:
        from torch.multiprocessing.reductions import reduce_tensor

        start = time.perf_counter()
        named = list(named_tensors)
        layout, total = flat_layout((n, tuple(t.shape), t.dtype) for n, t in named)
        if layout != self._layout:
            device = named[0][1].device
            if device.type != "cuda":
                raise ValueError("cuda_ipc weight transport needs the learner on a GPU; use object_store on CPU")
            self._buffer_U8 = torch.empty(total, dtype=torch.uint8, device=device)
            self._handle = reduce_tensor(self._buffer_U8)
            self._layout, self._buffer_id = layout, uuid.uuid4().hex
        _pack(named, self._buffer_U8, layout)
        torch.cuda.synchronize(self._buffer_U8.device)
        metrics = _metrics(self.name, time.perf_counter() - start, total)
        return WeightUpdate(version, self.name, layout, total, payload=(self._buffer_id, self._handle), metrics=metrics)

    def close(self) -> None:
        self._buffer_U8 = self._handle = self._layout = None


class NcclSender(WeightSender):
    """Broadcast from learner rank 0 (group rank 0) to every rollout actor over a separate process group.

    The flat layout is cut into buckets of ~``bucket_bytes``; two bucket buffers alternate so packing
    bucket i+1 overlaps the broadcast of bucket i. Receivers compute the same layout and buckets from
    their own model, so only a 3-number header (version, tensors, bytes) travels besides the weights.
    ``backend='gloo'`` runs the same code on CPU (used by the tests).
    """

    name = "nccl"

    def __init__(self, *, host: str, port: int, world_size: int, layout: tuple[TensorMeta, ...], total_bytes: int,
                 bucket_bytes: int = 256 << 20, backend: str = "nccl", device: str | torch.device = "cuda",
                 timeout_s: float = 120.0):
        self.host, self.port, self.world_size, self.backend = host, port, world_size, backend
        self.timeout_s = timeout_s
        self.layout, self.total_bytes = layout, total_bytes
        self.buckets = bucketize(layout, bucket_bytes)
        self.device = torch.device(device)
        self._group = None
        self._buffers: list[torch.Tensor] = []

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightUpdate:
        start = time.perf_counter()
        if self._group is None:
            self._group = connect_group(self.host, self.port, 0, self.world_size, self.backend, self.timeout_s)
            size = max(b.nbytes for b in self.buckets)
            self._buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        header = torch.tensor([version, len(self.layout), self.total_bytes], dtype=torch.int64, device=self.device)
        self._group.broadcast([header], opts).wait()
        works = [None, None]
        named = iter(named_tensors)
        for i, bucket in enumerate(self.buckets):
            slot = i % 2
            if works[slot] is not None:
                works[slot].wait()  # the broadcast that last used this buffer must finish before we refill it
            buffer_U8 = self._buffers[slot]
            for meta in bucket.metas:
                name, tensor = next(named)
                if name != meta.name:
                    raise ValueError(f"nccl weight sync: got {name!r} where the layout has {meta.name!r}")
                view_in(buffer_U8, meta).copy_(tensor)
            works[slot] = self._group.broadcast([buffer_U8[: bucket.nbytes]], opts)
        for work in works:
            if work is not None:
                work.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics = _metrics(self.name, time.perf_counter() - start, self.total_bytes)
        return WeightUpdate(version, self.name, self.layout, self.total_bytes, metrics=metrics)

    def close(self) -> None:
        close_group(self._group)
        self._group = None
        self._buffers = []


def build_sender(name: str, **kwargs) -> WeightSender:
    """A sender by transport name (``nccl`` needs host, port, world_size, layout, total_bytes)."""
    senders = {"object_store": ObjectStoreSender, "cuda_ipc": CudaIpcSender, "nccl": NcclSender}
    if name not in senders:
        raise ValueError(f"unknown weight transport {name!r}; choose one of {sorted(senders)}")
    return senders[name](**kwargs)
