"""Reward timeouts in a child process (common/tasks/guard.py): they hold off the main thread."""
from __future__ import annotations

import threading
import time

import pytest

from common.config.task import TaskConfig
from common.tasks import Item, get_task
from common.tasks.countdown import CountdownTask
from common.tasks.guard import GUARD, RewardProcessError

# Loaded by the reward child only: countdown rewards that sleep or raise on request.
PATCH = '''
import time
from common.tasks import TASKS
from common.tasks.countdown import CountdownTask

class Slow(CountdownTask):
    def compute_reward(self, completion, item):
        if completion.startswith("sleep "):
            time.sleep(float(completion.split()[1]))
        if completion == "raise":
            raise RuntimeError("boom in the child")
        if completion == "die":
            import os
            os._exit(3)
        return super().compute_reward(completion, item)

TASKS["countdown"] = Slow
'''

ITEM = Item(id="x", question="3,5,2", answer="13", numbers=(3, 5, 2))


class Guarded(CountdownTask):
    heavy_imports = ("unmask_slow_reward_patch",)


@pytest.fixture()
def guarded(tmp_path, monkeypatch):
    (tmp_path / "unmask_slow_reward_patch.py").write_text(PATCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield Guarded(TaskConfig(name="countdown", prompt_style="chat", reward_timeout_s=1.0))
    GUARD.close()  # the next test's child must not carry the patch


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    th.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_timeout_holds_in_a_worker_thread(guarded):
    good = in_thread(lambda: guarded.reward("<answer>3+5*2</answer>", ITEM))
    assert good.correct and good.components["timed_out"] == 0.0
    t0 = time.perf_counter()
    late = in_thread(lambda: guarded.reward("sleep 60", ITEM))
    took = time.perf_counter() - t0
    assert 1.0 <= took < 10.0, took  # killed at the timeout, not after the 60 s sleep
    assert not late.correct and late.total == 0.0 and late.components["timed_out"] == 1.0
    assert set(late.components) == set(good.components)  # the same keys: batches of rewards stay tabular
    again = in_thread(lambda: guarded.reward("<answer>3+5*2</answer>", ITEM))  # a fresh child answers
    assert again.correct


def test_a_child_that_dies_on_a_completion_scores_it_as_timed_out(guarded):
    dead = guarded.reward("die", ITEM)
    assert not dead.correct and dead.components["timed_out"] == 1.0
    assert guarded.reward("<answer>3+5*2</answer>", ITEM).correct  # the replacement child answers


def test_reward_errors_are_raised_not_scored(guarded):
    with pytest.raises(RewardProcessError, match="boom in the child"):
        guarded.reward("raise", ITEM)
    assert guarded.reward("<answer>3+5*2</answer>", ITEM).correct


def test_timeout_defaults_per_task():
    assert get_task(TaskConfig(name="math", prompt_style="chat")).reward_timeout_s == 5.0
    for name in ("countdown", "sudoku", "gsm8k"):
        task = get_task(TaskConfig(name=name))
        assert task.reward_timeout_s == 0.0  # inline: their work is linear in the bounded completion
        assert "timed_out" not in task.reward("1", task.eval_items(1)[0]).components
    assert get_task(TaskConfig(name="gsm8k", reward_timeout_s=2.0)).reward_timeout_s == 2.0


def test_guarded_and_inline_rewards_agree():
    inline = get_task(TaskConfig(name="countdown", prompt_style="chat"))
    guarded = get_task(TaskConfig(name="countdown", prompt_style="chat", reward_timeout_s=5.0))
    items = inline.eval_items(20)
    for it in items:
        for text in (inline.reference_completion(it), "<answer>\\boxed{1+2}</answer>", "junk"):
            a, b = inline.reward(text, it), guarded.reward(text, it)
            assert (a.total, a.correct) == (b.total, b.correct)
            assert {**a.components, "timed_out": 0.0} == b.components
