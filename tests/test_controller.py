"""The controller's lifecycle: a run that cannot start shuts down what it started, and refuses a run
directory where it would be lost."""
import logging
import time

import pytest

from common.config import load_config
from driver.runtime import RunError


class _Learner:
    """Stands in for the learner group: records its shutdown."""

    def __init__(self, blind):
        self.blind, self.shut = blind, 0

    def check_shared(self, path, token):
        return self.blind

    def shutdown(self):
        self.shut += 1


def _cfg(tmp_path, *more):
    return load_config("tiny_countdown", [f"run.root={tmp_path}", "run.name=partial", *more])


@pytest.mark.ray
def test_a_run_that_fails_while_building_shuts_down_what_it_started(tmp_path, monkeypatch, ray_local):
    import ray

    import driver.components
    from driver.train import Controller

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The learner group is built, then the run root is found not shared: the group must not keep running.
    learner = _Learner(["node n1 cannot read it"])
    monkeypatch.setattr(driver.components, "build_learner", lambda *a: learner)
    with pytest.raises(RunError, match="not shared"):
        Controller(_cfg(tmp_path), run_dir, resume=False)
    assert learner.shut == 1
    # Learner and queue built, then no rollout worker can be placed: both go.
    learner = _Learner([])
    monkeypatch.setattr(driver.components, "build_learner", lambda *a: learner)

    def no_pool(*a):
        raise RunError("no rollout worker could be placed")

    monkeypatch.setattr(driver.components, "build_pool", no_pool)
    with pytest.raises(RunError, match="placed"):
        Controller(_cfg(tmp_path), run_dir, resume=False)
    assert learner.shut == 1
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ray.get_actor(f"unmask-queue-{run_dir.name}")
        except ValueError:
            break  # the queue actor is gone
        time.sleep(0.2)
    else:
        pytest.fail("the replay queue actor outlived the run that failed to start")


def test_a_run_root_inside_a_ray_job_package_is_refused_in_one_line(tmp_path, monkeypatch, caplog):
    """Under `ray job submit --working-dir` a relative run.root lands in the unpacked package Ray deletes."""
    import driver.runtime
    from driver.runtime import new_run_dir
    from driver.train import train

    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    with pytest.raises(RunError, match="working-dir package"):
        new_run_dir(load_config("tiny_countdown", ["run.root=runs"]))
    assert not (pkg / "runs").exists()

    def no_ray(*a, **k):
        raise AssertionError("the run should have been refused before connecting to Ray")

    monkeypatch.setattr(driver.runtime, "connect_ray", no_ray)
    with caplog.at_level(logging.ERROR, logger="unmask"):
        assert train(load_config("tiny_countdown", ["run.root=runs"])) == 1
    assert [r.getMessage().count("\n") for r in caplog.records if "working-dir package" in r.getMessage()] == [0]
    # An absolute root elsewhere is kept.
    assert new_run_dir(load_config("tiny_countdown", [f"run.root={tmp_path / 'kept'}"])).parent == tmp_path / "kept"
