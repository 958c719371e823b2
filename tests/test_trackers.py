"""Experiment trackers get what metrics.jsonl gets, plus the plots; a missing one fails at config load."""
import glob
import json
import subprocess
import sys

import pytest

from common.config import ConfigError, load_config
from common.metrics import MetricsLog, read_metrics
from driver.trackers import build_trackers, scalars_of

RECORDS = [
    {"step": 0, "eval_accuracy": 0.25, "eval_reward": 0.3},
    {"event": "rollout", "worker": "w0", "tokens_per_s": 120.5, "groups": 2},
    {"step": 1, "reward": 0.5, "accuracy": 0.4, "loss": 0.125, "skipped": False, "version": 1},
    {"event": "rollout", "worker": "w1", "tokens_per_s": 99.0, "groups": 1},
    {"step": 2, "reward": 0.75, "accuracy": 0.6, "loss": float("nan"), "version": 2},
]


def _run(tmp_path, trackers):
    """A run directory whose MetricsLog feeds ``trackers``, fed RECORDS and one plot, then closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_config(None, [f"run.trackers=[{', '.join(trackers)}]"])
    run_dir = tmp_path / "tiny-run-1"
    (run_dir / "plots").mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(run_dir / "plots" / "curves.png")
    plt.close(fig)
    sink = build_trackers(cfg.run, run_dir, cfg.model_dump(mode="json"))
    log = MetricsLog(run_dir / "metrics.jsonl", sinks=[sink])
    for record in RECORDS:
        log.log(dict(record))
    sink.log_plots(run_dir / "plots")
    sink.close()
    return run_dir


def test_scalars_keep_metrics_names_and_namespace_events():
    assert scalars_of(RECORDS[2]) == {"reward": 0.5, "accuracy": 0.4, "loss": 0.125, "skipped": 0.0, "version": 1.0}
    assert scalars_of({"time": 1.0, **RECORDS[1]}) == {"rollout/tokens_per_s": 120.5, "rollout/groups": 2.0}
    assert "loss" not in scalars_of(RECORDS[4])  # NaN stays in metrics.jsonl only


def test_no_tracker_is_the_default_and_writes_nothing(tmp_path):
    run_dir = _run(tmp_path, [])
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "plots"]
    assert len(read_metrics(run_dir / "metrics.jsonl")) == len(RECORDS)


def test_a_chosen_tracker_that_is_not_installed_fails_at_config_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.trackers=[wandb]"])
    assert str(e.value) == ("config error at run.trackers: tracker 'wandb' is chosen but 'wandb' is not installed "
                            "(pip install 'unmask[wandb]')")
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["run.trackers=[tensorboard, tensorboard]"])


def test_config_load_imports_no_tracker():
    code = ("from common.config import load_config; import sys; "
            "load_config(None, ['run.trackers=[tensorboard, wandb, mlflow]']); "
            "print([m for m in ('tensorboard', 'wandb', 'mlflow', 'torch.utils.tensorboard') if m in sys.modules])")
    for module in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tensorboard_gets_every_scalar_and_the_plots(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["reward"] == [(1, 0.5), (2, 0.75)]
    assert scalars["eval_accuracy"] == [(0, 0.25)]
    assert scalars["rollout/tokens_per_s"] == [(0, 120.5), (1, 99.0)]  # at the last learner step seen
    assert scalars["loss"] == [(1, 0.125)]
    images = events.Images("plots/curves")
    assert len(images) == 1 and images[0].step == 2 and images[0].width == 200


def test_wandb_runs_offline_under_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _run(tmp_path, ["wandb"])
    (offline,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    (log,) = glob.glob(f"{offline}/run-*.wandb")
    assert log.endswith("run-tiny-run-1.wandb")  # the run id is the run directory's name: resume continues it
    data = open(log, "rb").read()
    for name in ("eval_accuracy", "rollout/tokens_per_s", "reward", "accuracy"):
        assert name.encode() in data
    assert len(glob.glob(f"{offline}/files/media/images/plots/curves_*.png")) == 1


def test_mlflow_logs_to_a_store_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run_dir = _run(tmp_path, ["mlflow"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-run-1"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward")] == [(1, 0.5), (2, 0.75)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rollout/tokens_per_s")] == [0, 1]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]
    config = json.loads(next((run_dir / "mlartifacts").glob("*/artifacts/config.json")).read_text())
    assert config["run"]["trackers"] == ["mlflow"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-run-1"]
