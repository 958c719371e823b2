"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) fed the same records as metrics.jsonl.

``build_trackers(run_cfg, run_dir, config)`` returns a ``Trackers`` that ``MetricsLog`` calls with every
record it writes, and that the driver hands the plots at the end. Each tracker's package is imported
only when ``run.trackers`` names it (the config already checked it is installed).

Names: a record's numbers keep their metrics.jsonl keys (``reward``, ``eval_accuracy``, ...); records of
an event are namespaced by it (``rollout/tokens_per_s``). The step is the record's ``step``, else the last
learner step seen (rollout records carry none).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

from common.config import RunConfig

log = logging.getLogger("unmask")

_NOT_SCALARS = ("time", "step", "event")


class Tracker(Protocol):
    def log_scalars(self, scalars: dict[str, float], step: int) -> None: ...
    def log_image(self, name: str, png: Path, step: int) -> None: ...
    def close(self) -> None: ...


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, under the names trackers show them."""
    prefix = f"{record['event']}/" if isinstance(record.get("event"), str) else ""
    return {prefix + key: float(value) for key, value in record.items()
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and math.isfinite(value)}


class TensorBoardTracker:
    """Event files under ``<run dir>/tensorboard`` (``tensorboard --logdir <run dir>``)."""

    def __init__(self, run_dir: Path, run_cfg: RunConfig, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, name: str, png: Path, step: int) -> None:
        import matplotlib.image

        pixels = matplotlib.image.imread(png)[..., :3]  # H, W, RGB(A) floats in [0, 1]
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run named after the run directory; a resumed run continues the same wandb run."""

    def __init__(self, run_dir: Path, run_cfg: RunConfig, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=run_cfg.tracker_project, name=run_dir.name, id=_safe_id(run_dir.name),
                              dir=str(run_dir), mode=run_cfg.wandb_mode, config=config, resume="allow",
                              settings=wandb.Settings(console="off", silent=True))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_image(self, name: str, png: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before wandb's service process has written the run's records to the offline
        # .wandb file (seen in CI: a header-only file); teardown waits for the service to finish and exit.
        self.wandb.teardown()


class MlflowTracker:
    """An MLflow run in experiment ``run.tracker_project``, on MLFLOW_TRACKING_URI or a SQLite store in the run
    directory (MLflow 3 refuses its old file store); the run id is kept in the run directory for resume."""

    def __init__(self, run_dir: Path, run_cfg: RunConfig, config: dict):
        import os

        from mlflow.tracking import MlflowClient

        server = os.environ.get("MLFLOW_TRACKING_URI")
        local = run_dir.resolve()
        self.client = MlflowClient(tracking_uri=server or f"sqlite:///{local / 'mlflow.db'}")
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        experiment = self.client.get_experiment_by_name(run_cfg.tracker_project)
        # A local store keeps its artifacts in the run directory too (MLflow's default is ./mlartifacts).
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            run_cfg.tracker_project, artifact_location=None if server else (local / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        id_file.write_text(self.run_id)
        self.client.log_dict(self.run_id, config, "config.json")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, name: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png), artifact_path=str(Path(name).parent))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _safe_id(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[-64:]


class Trackers:
    """Every chosen tracker behind one call; with none chosen, every call does nothing."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.step = 0

    def __call__(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record (``MetricsLog`` sink)."""
        if not self.trackers:
            return
        if isinstance(record.get("step"), int):
            self.step = record["step"]
        scalars = scalars_of(record)
        if scalars:
            for tracker in self.trackers:
                tracker.log_scalars(scalars, self.step)

    def log_plots(self, plot_dir: Path) -> None:
        """Every PNG in ``plot_dir`` as an image named ``plots/<file stem>`` at the last step."""
        for png in sorted(Path(plot_dir).glob("*.png")):
            for tracker in self.trackers:
                tracker.log_image(f"plots/{png.stem}", png, self.step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def build_trackers(run_cfg: RunConfig, run_dir: Path, config: dict) -> Trackers:
    """The trackers ``run.trackers`` names, opened on ``run_dir``; ``config`` is logged as the run's parameters."""
    trackers = [BACKENDS[name](Path(run_dir), run_cfg, config) for name in run_cfg.trackers]
    if trackers:
        log.info("experiment trackers: %s", ", ".join(run_cfg.trackers))
    return Trackers(trackers)
