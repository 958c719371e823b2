"""Run directory and Ray connection: the two things every `unmask` command sets up first."""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

from common.config import UnmaskConfig
from common.config.loader import dump_config

log = logging.getLogger("unmask")


class RunError(Exception):
    """A run cannot go on, for a reason the user can act on: printed as one line, exit code 1."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_root_problem(root: Path) -> str | None:
    """Why run directories may not go under ``root`` (one line), or None.

    Under `ray job submit --working-dir` the driver runs inside the unpacked working-dir package
    (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``), which Ray deletes: a relative
    ``run.root`` would put the checkpoints and the exported policy there.
    """
    parts = root.resolve().parts
    if any(a == "working_dir_files" and b.startswith("_ray_pkg_") for a, b in zip(parts, parts[1:])):
        return (f"run.root {root} resolves to {root.resolve()}, inside the Ray job's working-dir package, which Ray "
                "deletes: set run.root to an absolute path you keep (shared storage on a cluster), e.g. "
                "--set run.root=/mnt/runs")
    return None


def new_run_dir(cfg: UnmaskConfig) -> Path:
    """``<run.root>/<run.name>-<timestamp>`` with the resolved config written into it; ``RunError`` for a root
    Ray deletes (``run_root_problem``)."""
    root = Path(cfg.run.root)
    problem = run_root_problem(root)
    if problem:
        raise RunError(problem)
    run_dir = root / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    for sub in ("checkpoints", "trajectories", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir.resolve()


def mark_finished(run_dir: Path, step: int) -> None:
    """Record that the run ended normally at ``step`` (its final evaluation, checkpoint and export are done)."""
    (run_dir / "finished.json").write_text(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}))


def finished_step(run_dir: Path) -> int | None:
    """The step a finished run ended at; None while it runs (or after it crashed)."""
    path = run_dir / "finished.json"
    return int(json.loads(path.read_text())["step"]) if path.is_file() else None


def resume_problem(run_dir: Path, total_steps: int) -> str | None:
    """Why ``run_dir`` cannot be resumed (one line), or None."""
    if not (run_dir / "config.yaml").is_file():
        return f"{run_dir} is not a run directory (no config.yaml)"
    done = finished_step(run_dir)
    if done is not None and done >= total_steps:
        return (f"{run_dir} finished at step {done} of {total_steps}; nothing to resume (nothing changed). To train "
                f"further: unmask train --resume {run_dir} --set run.total_steps=N with N > {done}")
    if not any((run_dir / "checkpoints").glob("step_*")):
        return (f"{run_dir} has no checkpoint to resume from (it stopped before its first one); start it again "
                f"with: unmask train --config {run_dir / 'config.yaml'}")
    return None


def read_control(run_dir: Path) -> dict:
    """Live controls written by `unmask scale` (e.g. the desired number of rollout workers)."""
    path = run_dir / "control.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def write_control(run_dir: Path, **values) -> None:
    path = run_dir / "control.json"
    control = {**read_control(run_dir), **values}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(control))
    os.replace(tmp, path)


def connect_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Attach to ``address``/RAY_ADDRESS (cluster, `ray job submit`) or start a new local instance.

    Never attaches to a Ray instance that merely happens to run on this machine: no address means a new
    local instance, whose dashboard binds 127.0.0.1 only. Logs where to watch the run.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # Under `ray job submit` the job's runtime_env applies; passing another one here is a conflict.
        ctx = ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       runtime_env=env, logging_level=logging.WARNING, configure_logging=True)
        log.info("started a local Ray instance with %d CPU(s)", int(ray.cluster_resources().get("CPU", 0)))
    _log_monitoring(ctx)
    return address or ray.get_runtime_context().gcs_address


def _log_monitoring(ctx) -> None:
    """Where to watch the run: the dashboard (and how to log in), and each node's Prometheus export."""
    import ray

    url = getattr(ctx, "dashboard_url", None)
    if url:
        url = url if url.startswith("http") else f"http://{url}"
        log.info("Ray dashboard: %s%s", url, _auth_hint())
    exports = sorted({f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                      for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")})
    if exports:
        log.info("metrics (ray_unmask_*, Prometheus text): %s; the dashboard's Metrics view needs Grafana + "
                 "Prometheus (README, Monitoring)", ", ".join(exports))


def _auth_hint() -> str:
    """The dashboard asks for a token when Ray's token authentication is on."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        enabled = is_token_auth_enabled()
    except (ImportError, AttributeError):  # Ray versions before token authentication
        return ""
    return " (token authentication is on: paste the output of `ray get-auth-token` when it asks)" if enabled else ""
