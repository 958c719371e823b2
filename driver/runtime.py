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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def new_run_dir(cfg: UnmaskConfig) -> Path:
    """``<run.root>/<run.name>-<timestamp>`` with the resolved config written into it."""
    root = Path(cfg.run.root)
    run_dir = root / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    for sub in ("checkpoints", "trajectories", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir.resolve()


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
    """Attach to ``address``/RAY_ADDRESS (cluster, `ray job submit`) or start a local instance.

    A local instance binds its dashboard to 127.0.0.1 only.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # Under `ray job submit` the job's runtime_env applies; passing another one here is a conflict.
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return address
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
             logging_level=logging.WARNING, configure_logging=True)
    ctx = ray.get_runtime_context()
    log.info("started a local Ray instance (dashboard: %s)", getattr(ray, "_private").worker._global_node.webui_url
             if hasattr(ray, "_private") else "127.0.0.1")
    return ctx.gcs_address
