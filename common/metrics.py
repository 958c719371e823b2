"""Metrics: Ray dashboard/Prometheus (ray.util.metrics) plus a JSONL file in the run directory.

All metric names start with ``unmask_`` so they are easy to find on the dashboard's Metrics view and in
the Prometheus export (Ray prefixes them with ``ray_``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# name -> (kind, description, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rollout_tokens_per_s": ("gauge", "completion tokens generated per second, per rollout worker", ("worker",)),
    "rollout_groups": ("counter", "prompt groups produced, per rollout worker", ("worker",)),
    "queue_depth": ("gauge", "groups waiting in the replay queue", ()),
    "staleness": ("gauge", "mean policy-version lag of the last consumed batch", ()),
    "learner_step_seconds": ("histogram", "wall time of one learner optimizer step", ()),
    "loss": ("gauge", "learner loss of the last step", ()),
    "reward": ("gauge", "mean reward of the last consumed batch", ()),
    "accuracy": ("gauge", "fraction of correct samples in the last consumed batch", ()),
    "eval_accuracy": ("gauge", "held-out accuracy at the last evaluation", ()),
    "weight_sync_seconds": ("gauge", "seconds to broadcast weights to every rollout worker", ()),
    "policy_version": ("gauge", "learner policy version", ()),
    "rollout_workers": ("gauge", "rollout workers alive", ()),
}

_STEP_BOUNDARIES = [0.1, 0.3, 1, 3, 10, 30, 100, 300]


class RayMetrics:
    """Lazily created ``ray.util.metrics`` objects; recording is a no-op outside a Ray session."""

    def __init__(self):
        self._objects: dict[str, Any] = {}

    def _get(self, name: str):
        if name not in self._objects:
            from ray.util import metrics

            kind, description, tags = METRICS[name]
            full = f"unmask_{name}"
            if kind == "gauge":
                self._objects[name] = metrics.Gauge(full, description=description, tag_keys=tags)
            elif kind == "counter":
                self._objects[name] = metrics.Counter(full, description=description, tag_keys=tags)
            else:
                self._objects[name] = metrics.Histogram(full, description=description, boundaries=_STEP_BOUNDARIES,
                                                        tag_keys=tags)
        return self._objects[name]

    def record(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        import ray

        if not ray.is_initialized() or value is None or not math.isfinite(value):
            return
        metric = self._get(name)
        kind = METRICS[name][0]
        if kind == "gauge":
            metric.set(value, tags=tags)
        elif kind == "counter":
            if value > 0:  # Ray counters reject zero increments
                metric.inc(value, tags=tags)
        else:
            metric.observe(value, tags=tags)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, mirrors known names to Ray, and hands every
    record to ``sinks`` (callables; the driver's experiment trackers)."""

    def __init__(self, path: str | Path, ray_metrics: RayMetrics | None = None,
                 sinks: Sequence[Callable[[dict[str, Any]], None]] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ray = ray_metrics or RayMetrics()
        self.sinks = list(sinks)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        for name, value in record.items():
            if name in METRICS and METRICS[name][2] == () and isinstance(value, (int, float)):
                self.ray.record(name, float(value))
        for sink in self.sinks:
            sink(record)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (skipping a torn last line from a killed driver)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
