"""Intra-op CPU threads, set deliberately in every process that computes.

torch's default (one thread per core) oversubscribes a shared machine: `unmask eval` of the tiny Countdown
base took 27.1 s with 2 threads and 4.4 s with 1 while two other processes kept both cores busy (3.6 s vs
3.0 s on an idle box). Ray actors use the CPUs they are assigned; in-process commands use ``run.cpu_threads``.
"""
from __future__ import annotations


def set_cpu_threads(n: float | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (at least 1), or to the CPUs Ray assigned this actor when None."""
    import torch

    if n is None:
        import ray

        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        n = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if in_actor else 1.0
    threads = max(1, int(n))
    torch.set_num_threads(threads)
    return threads
