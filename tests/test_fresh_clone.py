"""The README's quick start from a bare clone with nothing beside it (no ../shared), as a newcomer runs it.

The clone's own packages are imported (PYTHONPATH points at it, ahead of the editable install), so a file
that is not committed, or data read from outside the repository, fails here.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bare") / "unmask"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["unmask"]  # nothing beside it
    return path


def _run(clone: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(clone)
    proc = subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_the_clone_imports_its_own_code_and_reads_its_own_data(clone):
    script = (
        "import common, driver\n"
        "from common.config.task import TaskConfig\n"
        "from common.tasks import check_data, get_task\n"
        "print(common.__file__, driver.__file__)\n"
        "for name, style, splits in [('countdown', 'compact', ('train', 'eval')), ('sudoku', 'compact', ('train', 'eval')),\n"
        "                            ('gsm8k', 'chat', ('train', 'eval')), ('math', 'chat', ('eval',))]:\n"
        "    cfg = TaskConfig(name=name, prompt_style=style)\n"
        "    check_data(cfg, splits)\n"
        "    task = get_task(cfg)\n"
        "    print(name, len(task.eval_items()), *task.data_files(splits).values())\n"
    )
    out = _run(clone, "-c", script).stdout.splitlines()
    assert all(p.startswith(str(clone)) for p in out[0].split())
    counts = {line.split()[0]: int(line.split()[1]) for line in out[1:]}
    assert counts == {"countdown": 256, "sudoku": 500, "gsm8k": 1319, "math": 500}
    for line in out[1:]:
        assert all(p.startswith(str(clone / "common" / "data")) for p in line.split()[2:]), line


def test_quick_start_train_eval_and_sft_in_the_clone(clone, tmp_path):
    runs = tmp_path / "runs"
    out = _run(clone, "-m", "driver", "train", "--set", f"run.root={runs}", "--set", "run.total_steps=2",
               "--set", "task.eval_size=8", "--set", "run.eval_sampling_steps=[]", "--set",
               "learner.groups_per_step=1", "--set", "rollout.prompts_per_call=1")
    log = out.stdout + out.stderr
    assert "held-out before training" in log and "held-out after training" in log and "step 2/2" in log
    run_dir = next(runs.glob("tiny-countdown-*"))
    assert (run_dir / "finished.json").is_file() and (run_dir / "policy" / "model.safetensors").is_file()

    ev = _run(clone, "-m", "driver", "eval", "--model", "checkpoints/tiny-countdown-base", "--task", "countdown",
              "--steps", "8,16", "--limit", "16", "--out", str(tmp_path / "eval"))
    assert "steps   16: accuracy" in ev.stdout and (tmp_path / "eval" / "accuracy_vs_steps.png").is_file()

    # The README's SFT command leaves the shipped (git-tracked) base untouched: its output is a new directory.
    _run(clone, "-m", "driver", "sft", "--config", "sft_tiny_countdown", "--set", f"run.root={runs}", "--set",
         "sft.steps=2", "--set", "sft.batch_size=8", "--set", "sft.eval_size=8")
    assert (next(runs.glob("sft-tiny-countdown-*")) / "model" / "config.json").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", status


def test_a_wheel_carries_the_data(clone, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(clone)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("unmask-*.whl"))).namelist())
    for rel in ("countdown/cd3_test.jsonl", "sudoku/4x4_test.csv", "gsm8k/train.jsonl", "gsm8k/test.jsonl",
                "math/math500.jsonl", "README.md"):
        assert f"common/data/{rel}" in names, rel
