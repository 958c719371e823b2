"""`run:` section: the loop, its directory and where Ray lives."""
from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, field_validator

from common.config.base import Section

# tracker -> (the module it needs, the pyproject extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


class RunConfig(Section):
    """Length of the run, evaluation and the run directory."""

    name: str = Field(default="tiny-countdown", description="Run name; the run directory is <root>/<name>-<timestamp>.")
    root: str = Field(default="runs", description="Directory under which run directories are created.")
    seed: int = Field(default=0, description="Global seed.")
    total_steps: int = Field(default=20, ge=0, description="Learner optimizer steps.")
    eval_every: int = Field(default=0, ge=0, description="Evaluate every n steps (0: before and after only).")
    eval_temperature: float = Field(
        default=0.0, ge=0.0, description="Sampling temperature of held-out evaluations (0: greedy, as papers report)."
    )
    eval_sampling_steps: list[int] = Field(
        default_factory=list, description="Extra sampling-step counts evaluated at the end (accuracy vs steps)."
    )
    cpu_threads: int = Field(
        default=1, ge=1, description="Intra-op CPU threads of computation outside Ray actors (unmask eval, SFT's evaluations); actors use the CPUs Ray assigns them. 1 is fastest for the tiny presets on a shared machine (common/threads.py)."
    )
    eval_timeout_s: float = Field(
        default=1800.0, gt=0, description="Longest wait for one held-out evaluation; workers that have not answered by then are left out (logged)."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster address; None attaches to RAY_ADDRESS or starts a local instance."
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers fed the scalars of metrics.jsonl and, at the end, the plots (driver/trackers.py): "
        "tensorboard writes <run dir>/tensorboard; wandb runs in wandb_mode under <run dir>/wandb; mlflow logs to "
        "MLFLOW_TRACKING_URI, else <run dir>/mlruns. Each needs its package (pip install 'unmask[NAME]').",
    )
    tracker_project: str = Field(
        default="unmask", description="wandb project and MLflow experiment the run is logged under (run name: the run directory's)."
    )
    wandb_mode: Literal["offline", "online"] = Field(
        default="offline", description="offline: written under the run directory only (upload later with `wandb sync`)."
    )

    @field_validator("trackers")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"{trackers}: a tracker is listed twice")
        for name in trackers:
            module, extra = TRACKERS[name]
            if importlib.util.find_spec(module) is None:  # found, not imported: trackers load only when a run starts
                raise ValueError(f"tracker {name!r} is chosen but {module!r} is not installed (pip install 'unmask[{extra}]')")
        return trackers

    def held_out_decoding(self) -> dict:
        """The sampler fields every held-out evaluation overrides (a run's, `unmask eval`'s, the ``ours``
        protocol's): temperature ``eval_temperature`` (greedy by default, as papers report), no top-k/top-p."""
        return {"temperature": self.eval_temperature, "top_k": None, "top_p": None}
