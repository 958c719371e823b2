"""The replay queue (``common.queue``) as the Ray async actor the driver starts on its own node; rollout
workers reach it by name."""
from __future__ import annotations

import ray

from common.config.queue import QueueConfig
from common.queue import ReplayQueueCore


@ray.remote(num_cpus=0)
class ReplayQueue(ReplayQueueCore):
    """``ReplayQueue.options(name=...).remote(cfg, groups_per_step, spill_dir)``: the queue as an async actor."""

    def __init__(self, cfg: QueueConfig, groups_per_step: int, spill_dir: str | None = None):
        super().__init__(cfg, groups_per_step, spill_dir, name=ray.get_runtime_context().get_actor_name() or "replay")

    def node_id(self) -> str:
        """The Ray node this queue (and its spill directory) lives on."""
        return ray.get_runtime_context().get_node_id()
