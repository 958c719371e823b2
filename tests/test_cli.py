"""What a newcomer types: every user mistake is one `unmask: ...` line and exit 2, before Ray starts."""
import json
from pathlib import Path

import pytest

from driver.cli import main

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unmask: ") and "\n" not in err, err
    return err


def test_bare_unmask_prints_the_help_and_starts_nothing(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: unmask" in out and "train" in out and "eval" in out


@pytest.mark.parametrize("steps", ["4,x", "0", "", "8,-4"])
def test_bad_step_counts_are_one_line(capsys, steps):
    err = _one_line_error(capsys, ["eval", "--steps", steps])
    assert "--steps" in err and "positive integers" in err


def test_a_step_count_the_sampler_cannot_use_is_one_line(capsys):
    err = _one_line_error(capsys, ["eval", "--steps", "5"])  # 5 steps over 2 blocks of the tiny preset
    assert err.startswith("unmask: config error at sampler")


def test_eval_of_a_missing_model_directory_is_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, ["eval", "--model", str(tmp_path / "nope")])
    assert "not a checkpoint directory" in err


def test_a_missing_data_file_fails_before_ray_and_leaves_no_run_directory(capsys, tmp_path):
    root = tmp_path / "runs"
    err = _one_line_error(capsys, ["train", "--set", f"run.root={root}", "--set", f"task.data_dir={tmp_path}"])
    assert str(tmp_path / "countdown" / "cd3_test.jsonl") in err and "task.eval_file" in err
    assert not root.exists()
    err = _one_line_error(capsys, ["eval", "--set", "task.name=sudoku", "--set", f"task.eval_file={tmp_path}/x.csv"])
    assert "x.csv" in err and "task.eval_file" in err
    err = _one_line_error(capsys, ["train", "--set", "task.name=math", "--set", "task.prompt_style=chat",
                                   "--set", f"run.root={root}"])
    assert "task.train_file" in err and not root.exists()


@pytest.fixture
def run_dir(tmp_path, capsys):
    """A run directory as `unmask train` leaves it: its resolved config and control file."""
    run = tmp_path / "tiny-countdown-20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["config", "--set", f"run.root={tmp_path}"]) == 0
    (run / "config.yaml").write_text(capsys.readouterr().out)
    (run / "control.json").write_text(json.dumps({"rollout_workers": 1, "stop": False}))
    return run


def test_resume_without_a_checkpoint_refuses(capsys, run_dir):
    err = _one_line_error(capsys, ["train", "--resume", str(run_dir)])
    assert "no checkpoint to resume from" in err and "unmask train --config" in err


def test_a_finished_run_says_so_and_nothing_changes(capsys, run_dir):
    (run_dir / "checkpoints" / "step_60").mkdir()
    (run_dir / "finished.json").write_text(json.dumps({"step": 60}))
    control = (run_dir / "control.json").read_text()
    assert "finished at step 60 of 60" in _one_line_error(capsys, ["train", "--resume", str(run_dir)])
    assert "finished at step 60" in _one_line_error(capsys, ["scale", str(run_dir), "--rollout-workers", "2"])
    assert "finished at step 60" in _one_line_error(capsys, ["stop", str(run_dir)])
    assert (run_dir / "control.json").read_text() == control and (run_dir / "finished.json").is_file()


def test_scale_and_stop_of_a_running_run_write_the_control_file(capsys, run_dir):
    assert main(["scale", str(run_dir), "--rollout-workers", "2"]) == 0
    assert main(["stop", str(run_dir)]) == 0
    assert json.loads((run_dir / "control.json").read_text()) == {"rollout_workers": 2, "stop": True}
    assert "not a run directory" in _one_line_error(capsys, ["stop", str(run_dir / "checkpoints")])


def test_sft_writes_a_new_directory_unless_told_otherwise():
    from common.config import load_config

    for recipe in ("sft_tiny_countdown", "sft_tiny_sudoku"):
        assert load_config(recipe).sft.output is None  # <run dir>/model: the shipped bases are never overwritten
