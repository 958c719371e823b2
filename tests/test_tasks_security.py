"""Rewards on hostile completions, and the MATH task on a small file written here (common/tasks)."""
from __future__ import annotations

import json
import threading
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config.task import TaskConfig
from common.tasks import Item, get_task, score_completions
from common.tasks.math import is_hostile

ADVERSARIAL = [
    "__import__('os').system('touch /tmp/pwned')",
    "<answer>__import__('os').system('touch /tmp/pwned')</answer>",
    "9**9**9**9",
    "<answer>9**9**9**9</answer>",
    "<answer>\\boxed{9^{9^{9^{9}}}}</answer>",
    "<answer>((((9^999)^999)^999)^999)</answer>",
    "<answer>\\boxed{(10^{99})!}</answer>",
    "<answer>99999999!</answer>",
    "<answer>\\binom{10^{99}}{10^{98}}</answer>",
    "(" * 10_000,
    "<answer>" + "(" * 10_000 + "</answer>",
    "\\boxed{" * 5_000,
    "<answer>" * 5_000,
    "1+" * 5_000 + "1",
    "\x00" * 100,
    "<answer>\x00</answer>",
    b"\xff\xfe\xfa3+4\x80".decode("utf-8", errors="replace"),
    "",
    "   \n\n  ",
    "9" * 10_000,
    "<answer>" + "9" * 10_000 + "</answer>",
    "1/0",
    "<answer>5/(3-3)</answer>",
    "<answer>" + "1," * 5_000 + "</answer>",
    "x" * 100_000,
]

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "Add: $\\frac{2}{4}+\\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
    {"problem": "Simplify $\\sqrt{18}$.", "solution": "$\\sqrt{18} = \\boxed{3\\sqrt{2}}$"},
    {"problem": "Solve $x^2 = 4$ for $x > 0$.", "answer": "2"},
    {"problem": "Expand $(x+1)^2$.", "solution": "It is $\\boxed{x^2+2x+1}$."},
]


@pytest.fixture(scope="module")
def math_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS[:2] + [{"problem": "1+1?", "answer": "2"}]))
    return get_task(TaskConfig(name="math", prompt_style="chat", data_dir=str(d), train_file="train.jsonl", eval_file="test.jsonl"))


def all_tasks(math_task):
    out = [math_task]
    for name in ("countdown", "sudoku", "gsm8k"):
        for style in ("compact", "chat"):
            out.append(get_task(TaskConfig(name=name, prompt_style=style)))
    return out


def test_adversarial_completions_score_wrong_on_every_task(math_task):
    for task in all_tasks(math_task):
        item = task.eval_items(1)[0]
        for text in ADVERSARIAL:
            r = task.reward(text, item)
            assert not r.correct, (task.name, text[:40])
            assert 0.0 <= r.total <= 1.0
            assert all(0.0 <= v <= 1.0 for v in r.components.values())


@lru_cache(maxsize=None)
def cached_task(name, style):
    task = get_task(TaskConfig(name=name, prompt_style=style))
    return task, task.eval_items(1)[0]


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_rewards_total_on_arbitrary_text(text):
    for name in ("countdown", "sudoku", "gsm8k"):
        for style in ("compact", "chat"):
            task, item = cached_task(name, style)
            r = task.reward(text, item)
            assert 0.0 <= r.total <= 1.0
            r = task.reward(f"<answer>{text}</answer>", item)
            assert 0.0 <= r.total <= 1.0


def test_math_items_and_references(math_task):
    items = math_task.eval_items()
    assert [it.answer for it in items] == ["\\frac{3}{4}", "3\\sqrt{2}", "2", "x^2+2x+1"]
    refs = [math_task.reference_completion(it) for it in items]
    assert score_completions(math_task, refs, items)["accuracy"] == 1.0
    train = [it.question for it, _ in zip(math_task.train_items(0), range(6))]
    assert train and set(train) == {"1+1?"}  # the two held-out problems are dropped


@pytest.mark.parametrize("completion,correct", [
    ("<reasoning>add</reasoning><answer>0.75</answer>", True),
    ("<answer>\\dfrac{3}{4}</answer>", True),
    ("<answer>$\\frac{6}{8}$</answer>", True),
    ("no tags but \\boxed{3/4}", True),
    ("<answer>\\frac{2}{3}</answer>", False),
    ("<answer></answer>", False),
])
def test_math_equivalence(math_task, completion, correct):
    item = math_task.eval_items(1)[0]
    r = math_task.reward(completion, item)
    assert r.correct is correct
    if correct and "<answer>" in completion:
        assert r.total == 1.0


def test_math_format_credit(math_task):
    item = math_task.eval_items(1)[0]
    r = math_task.reward("<answer>\\frac{2}{3}</answer>", item)
    assert r.components["format"] == 1.0 and r.total == pytest.approx(0.1)
    r = math_task.reward("The answer is $\\frac{3}{4}$.", item)  # right but not marked: no format credit
    assert r.correct and r.components["format"] == 0.0 and r.total == pytest.approx(0.9)
    r = math_task.reward("</reasoning> \\boxed{3/4}", item)  # a box marks the answer as well as tags do
    assert r.correct and r.total == 1.0


def test_math_reward_in_worker_thread(math_task):
    # math-verify's signal timeout only works in the main thread; rollout actors may call from others.
    item = math_task.eval_items(2)[1]
    out = {}

    def run():
        out["good"] = math_task.reward("<answer>\\sqrt{18}</answer>", item).correct
        out["bad"] = [math_task.reward(t, item).correct for t in ADVERSARIAL]

    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert out["good"] is True and not any(out["bad"])


@pytest.mark.parametrize("text,hostile", [
    ("x^2+2x+1", False), ("\\frac{3}{4}", False), ("10^{100}", False), ("2^{10}+3^{5}", False),
    ("9^{9^{9}}", True), ("(9^9)^9", True), ("2^{12345}", True), ("(10^{9})!", True), ("123456!", True),
    ("2**3**4", True), ("9^9^9", True), ("x^2 ^3", True), ("x" * 1000, True),
])
def test_math_hostility_guard(text, hostile):
    assert is_hostile(text) is hostile


def test_item_fields_are_plain():
    it = Item(id="a", question="q", answer="1")
    with pytest.raises(AttributeError):
        it.answer = "2"  # frozen: items are shared between actors by value
