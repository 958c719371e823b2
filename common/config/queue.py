"""`queue:` section: the Arrow replay queue between rollout and learner."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config.base import Section


class QueueConfig(Section):
    """Capacity, staleness budget and spill of the replay queue."""

    capacity_groups: int = Field(default=64, ge=1, description="Prompt groups held before producers block.")
    max_staleness: int = Field(
        default=1,
        ge=0,
        description="Policy versions a group may lag the learner when consumed; 0 is synchronous on-policy. 1 (rollouts "
        "one version ahead, overlapping the learner step) is as accurate as 0 and 1.5-1.6x faster on both tiny tasks "
        "(pre-registered, n = 8: docs/results/async_design.md, docs/RESULTS.md); runs are then not bit-reproducible.",
    )
    spill: bool = Field(
        default=True,
        description="Append every admitted group to Arrow IPC files in the run directory, with a ledger of "
        "consumed ids, so a restarted queue recovers and trajectories stay for analysis.",
    )
    spill_file_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Start a new spill file once the current one reaches this many bytes.",
    )
    on_corrupt_spill: Literal["skip", "raise"] = Field(
        default="skip",
        description="When recovery finds a corrupted or truncated spill record: 'skip' logs a warning, counts it "
        "(stats()['spill_corrupt']) and loads nothing from it; 'raise' refuses to start the queue.",
    )
