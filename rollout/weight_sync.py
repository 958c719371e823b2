"""Weight receivers (rollout actors): object_store, cuda_ipc, nccl. Senders live in learner/weight_sync.py.

A rollout actor builds one receiver for its transport and calls ``receive(model, update)`` between
rollouts with the ``WeightUpdate`` the driver forwards (or ``receive_into(buffers, update)`` for an
adapter-only update, then ``AdapterMerge.apply``); it returns the version now loaded.
"""
from __future__ import annotations

import threading
import time
import warnings

import torch
import torch.distributed as dist

from common.weights import (WeightReceiver, WeightUpdate, bucketize, check_layout, close_group, connect_group, flat_layout,
                            load_views, view_in)


class ObjectStoreReceiver(WeightReceiver):
    """``ray.get`` the flat buffer (zero-copy from shared memory on the same node) and copy into the model."""

    name = "object_store"

    def __init__(self):
        self.last_seconds = 0.0

    def receive_into(self, targets: dict[str, torch.Tensor], update: WeightUpdate | None) -> int:
        import ray

        start = time.perf_counter()
        check_layout(update, targets)
        array = ray.get(update.payload)
        with warnings.catch_warnings():  # the shared-memory array is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            buffer_U8 = torch.from_numpy(array)
        load_views(targets, ((m.name, view_in(buffer_U8, m)) for m in update.layout))
        self.last_seconds = time.perf_counter() - start
        return update.version


class CudaIpcReceiver(WeightReceiver):
    """Open the learner's shared CUDA buffer once (again only when it is reallocated) and copy from it."""

    name = "cuda_ipc"

    def __init__(self):
        self._buffer_id = ""
        self._buffer_U8: torch.Tensor | None = None
        self.last_seconds = 0.0

    def receive_into(self, targets: dict[str, torch.Tensor], update: WeightUpdate | None) -> int:
        start = time.perf_counter()
        check_layout(update, targets)
        buffer_id, (rebuild, args) = update.payload
        if buffer_id != self._buffer_id:
            args = list(args)
            # Argument 6 is the device index as the sender numbered it; the GPU is the same one, but this
            # process may see it under another index (Ray sets CUDA_VISIBLE_DEVICES per actor).
            args[6] = torch.cuda.current_device()
            self._buffer_U8 = rebuild(*args)
            self._buffer_id = buffer_id
        load_views(targets, ((m.name, view_in(self._buffer_U8, m)) for m in update.layout))
        torch.cuda.synchronize()  # the sender may overwrite the buffer once we return
        self.last_seconds = time.perf_counter() - start
        return update.version

    def close(self) -> None:
        self._buffer_U8 = None
        self._buffer_id = ""


class NcclReceiver(WeightReceiver):
    """Group rank ``rank`` (>= 1) of the learner's weight broadcast group; buckets mirror the sender's.

    ``receive`` must run while the learner's ``send`` of the same version runs (the driver launches both).
    It runs on the actor's weights thread beside a running rollout, so on a GPU it uses a CUDA stream of its
    own: its collectives and copies never queue behind the rollout's kernels, and it waits only for its
    own work before the staged weights are handed over.
    """

    name = "nccl"

    def __init__(self, *, host: str, port: int, rank: int, world_size: int, bucket_bytes: int = 256 << 20,
                 backend: str = "nccl", device: str | torch.device = "cuda", timeout_s: float = 120.0):
        if rank < 1:
            raise ValueError("nccl receivers take group ranks 1..world_size-1; rank 0 is the learner")
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.bucket_bytes, self.backend, self.device = bucket_bytes, backend, torch.device(device)
        self.timeout_s = timeout_s
        self._group = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.last_seconds = 0.0

    def receive_into(self, targets: dict[str, torch.Tensor], update: WeightUpdate | None = None) -> int:
        """Receive the next broadcast into ``targets`` (a state dict, a staging copy, or adapter buffers)."""
        start = time.perf_counter()
        if self._stream is None:
            version = self._receive(targets)
        else:
            with torch.cuda.stream(self._stream):
                version = self._receive(targets)
            self._stream.synchronize()  # this stream only: the rollout's kernels on the default stream run on
        self.last_seconds = time.perf_counter() - start
        return version

    def _receive(self, targets: dict[str, torch.Tensor]) -> int:
        layout, total = flat_layout((k, tuple(v.shape), v.dtype) for k, v in targets.items())
        buckets = bucketize(layout, self.bucket_bytes)
        if self._group is None:
            self._group = connect_group(self.host, self.port, self.rank, self.world_size, self.backend, self.timeout_s)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._group.broadcast([header], opts).wait()
        version, count, nbytes = header.tolist()
        if (count, nbytes) != (len(layout), total):
            raise ValueError(f"nccl weight sync: learner sends {count} tensors / {nbytes} bytes, this model has "
                             f"{len(layout)} / {total}; learner and rollout models differ")
        size = max(b.nbytes for b in buckets)
        buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        pending = self._group.broadcast([buffers[0][: buckets[0].nbytes]], opts)
        with torch.no_grad():
            for i, bucket in enumerate(buckets):
                pending.wait()
                if i + 1 < len(buckets):  # receive the next bucket while this one is unpacked
                    pending = self._group.broadcast([buffers[(i + 1) % 2][: buckets[i + 1].nbytes]], opts)
                for meta in bucket.metas:
                    targets[meta.name].copy_(view_in(buffers[i % 2], meta))
        return int(version)

    def close(self) -> None:
        close_group(self._group)
        self._group = None


def staging_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An uninitialised second copy of the model's state, for an update to land in beside a running rollout."""
    return {k: torch.empty_like(v) for k, v in model.state_dict().items()}


def copy_into(model: torch.nn.Module, staged: dict[str, torch.Tensor]) -> None:
    """Swap a staged copy (``staging_copy``) into the model, in place: between rollouts, never during one."""
    with torch.no_grad():
        for name, target in model.state_dict().items():
            target.copy_(staged[name])


class PrefetchBuffer:
    """A rollout actor's double buffer for full-weights updates (object_store / cuda_ipc): ``fill`` receives an
    update into a second copy of the weights (on the actor's weights thread, beside a running rollout);
    ``take``, between rollouts, copies it into the model if it holds that very update (waiting for a ``fill``
    still running), else leaves the update to the ordinary receive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[str, torch.Tensor] | None = None
        self._key: tuple | None = None
        self._receivers: dict[str, WeightReceiver] = {}  # its own: receivers keep per-thread state (IPC handles)

    def fill(self, model: torch.nn.Module, update: WeightUpdate) -> None:
        with self._lock:
            self._key = None
            if update.transport not in self._receivers:
                self._receivers[update.transport] = build_receiver(update.transport)
            if self._buffers is None:  # one extra copy of the weights, allocated once
                self._buffers = staging_copy(model)
            self._receivers[update.transport].receive_into(self._buffers, update)
            self._key = _update_key(update)

    def take(self, model: torch.nn.Module, update: WeightUpdate) -> bool:
        with self._lock:
            if self._key is None or self._key != _update_key(update):
                return False
            copy_into(model, self._buffers)
            self._key = None
            return True


def _update_key(update: WeightUpdate) -> tuple:
    """What identifies one update across calls: its version and payload (an object ref, or a CUDA buffer id: a
    rebuilt learner resending an older version sends another payload)."""
    payload = update.payload
    return update.version, update.transport, payload.hex() if hasattr(payload, "hex") else str(payload[0])


def build_receiver(name: str, **kwargs) -> WeightReceiver:
    """A receiver by transport name (``nccl`` needs host, port, rank, world_size)."""
    receivers = {"object_store": ObjectStoreReceiver, "cuda_ipc": CudaIpcReceiver, "nccl": NcclReceiver}
    if name not in receivers:
        raise ValueError(f"unknown weight transport {name!r}; choose one of {sorted(receivers)}")
    return receivers[name](**kwargs)
