"""Rewards on the answer habits of LLaDA-8B-Instruct (common/tasks/answers.py and every chat reward).

The strings are ours, written after the patterns in d1's published LLaDA-8B-Instruct generations: a box
inside the answer tags, a box after </reasoning> with no tags, LaTeX operators, empty tags followed by a
box, a completion cut after an opening tag, empty and placeholder boxes, clock times.
"""
from __future__ import annotations

import json
from fractions import Fraction

import pytest

from common.config.task import TaskConfig
from common.tasks import Item, get_task
from common.tasks.answers import boxed_contents, last_boxed, last_number, latex_to_arith, marked_answer
from common.tasks.arith import evaluate

CD = Item(id="cd", question="49,55,53", answer="51", numbers=(49, 55, 53))
CD_MUL = Item(id="cdm", question="6,4,5", answer="19", numbers=(6, 4, 5))  # 6*4-5
GSM = Item(id="g", question="q", answer="18")
SUDOKU = Item(id="s", question="3102200002100320", answer="3142243142131324")
MATH_ROW = {"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}"}


def chat(name, **kw):
    return get_task(TaskConfig(name=name, prompt_style="chat", **kw))


@pytest.fixture(scope="module")
def math_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    (d / "m.jsonl").write_text(json.dumps(MATH_ROW) + "\n")
    return get_task(TaskConfig(name="math", prompt_style="chat", data_dir=str(d), eval_file="m.jsonl"))


# --- the extraction rules

def test_boxed_contents_balanced_nested_and_unclosed():
    assert boxed_contents(r"a \boxed{1} b \boxed{\frac{1}{2}} c \boxed {x}") == ["1", r"\frac{1}{2}", "x"]
    assert boxed_contents(r"\boxed{\boxed{3}}") == ["3", r"\boxed{3}"]  # inner closes first
    assert boxed_contents(r"\boxed{5} and \boxed{7") == ["5"]  # an unclosed box is no answer
    assert boxed_contents("} } \\boxed{2}") == ["2"]  # stray closing braces do not confuse the pairing
    assert last_boxed(r"\boxed{4} then \boxed{} and \boxed{...}") == "4"  # empty and placeholder boxes skipped


def test_boxed_scan_is_linear_on_hostile_text():
    import time

    t0 = time.perf_counter()
    assert boxed_contents("\\boxed{" * 20_000) == []
    assert last_boxed("{" * 50_000 + "\\boxed{1}" + "}" * 50_000) == "1"
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("text,expected", [
    ("<answer>\n\\boxed{49 + 55 - 53}\n</answer>", ("49 + 55 - 53", "boxed")),
    ("<reasoning>x</reasoning>\n\\boxed{49 + 55 - 53}", ("49 + 55 - 53", "boxed")),  # box, no tags
    ("<answer></answer>\nSo the answer is \\boxed{5}.", ("5", "boxed")),  # empty tags, box after them
    ("<answer>\\boxed{}</answer> \\boxed{7}", ("7", "boxed")),  # tags hold only an empty box
    ("<answer> 3 + 4 </answer>", ("3 + 4", "tags")),
    ("<answer>\\boxed{1} then \\boxed{2}</answer> \\boxed{9}", ("2", "boxed")),  # inside the tags wins
    ("The answer is 18.\n<answer>", (None, "")),  # cut right after an opening tag: nothing marked
    ("plain text 12", (None, "")),
])
def test_marked_answer(text, expected):
    assert marked_answer(text) == expected


@pytest.mark.parametrize("latex,plain,value", [
    ("49 + 55 - 53", "49 + 55 - 53", 51),
    ("6 \\times 4 - 5", "6 * 4 - 5", 19),
    ("6 \\cdot 4 - 5", "6 * 4 - 5", 19),
    ("(88 \\div 22) * 12", "(88 / 22) * 12", 48),
    ("\\left( 85 - 60 \\right) \\div 25", "( 85 - 60 ) / 25", 1),
    ("\\frac{98}{7} + 5", "((98)/(7)) + 5", 19),
    ("\\dfrac{\\frac{12}{2}}{3}", "((((12)/(2)))/(3))", 2),
    ("\\(49 + 55 - 53\\)", "49 + 55 - 53", 51),
    ("{49 + 55} − 53.", "(49 + 55) - 53", 51),
])
def test_latex_to_arith(latex, plain, value):
    assert latex_to_arith(latex) == plain
    assert evaluate(plain)[0] == value


@pytest.mark.parametrize("text", ["\\frac{1}{", "\\sqrt{4} + 1", "2^{3}", "\\frac{1}2", "import os"])
def test_latex_left_for_the_parser_to_reject(text):
    from common.tasks.arith import ArithError

    with pytest.raises(ArithError):
        evaluate(latex_to_arith(text))


@pytest.mark.parametrize("text,value", [
    ("2:00 pm", 2), ("at 10:30", Fraction(21, 2)), ("\\frac{3}{4}", Fraction(3, 4)), ("$1,234.50 then 7", 7),
    ("-5", -5), ("18.00", 18), ("no digits", None), ("9" * 100, None), ("\\frac{1}{0}", None),
])
def test_last_number(text, value):
    assert last_number(text) == value


# --- each task on the habits

@pytest.mark.parametrize("completion", [
    "<reasoning>49 + 55 = 104, 104 - 53 = 51</reasoning>\n<answer>\n\\boxed{49 + 55 - 53}\n</answer>",
    "<reasoning>...</reasoning>\n\\boxed{49 + 55 - 53}",
    "<answer>\\boxed{49 + 55 - 53 = 51}</answer>",
    "<answer>51 = 49 + 55 - 53</answer>",
    "<answer>\\(49 + 55 - 53\\)</answer>",
    "<answer></answer> \\boxed{\\left(49 + 55\\right) - 53}",
])
def test_countdown_llada_answers_score_full(completion):
    r = chat("countdown").reward(completion, CD)
    assert r.correct and r.total == 1.0


def test_countdown_still_strict():
    t = chat("countdown")
    assert not t.reward("<answer>\\boxed{49 + 55 - 52}</answer>", CD).correct  # wrong number
    assert not t.reward("<answer>\\boxed{49 \\times 55 - 53}</answer>", CD).correct  # wrong value
    assert t.reward("no tags, no box: 49 + 55 - 53", CD).total == 0.0  # nothing marked
    assert not t.reward("<answer>\\boxed{\\sqrt{49} + 55 - 53}</answer>", CD).correct


def test_gsm8k_llada_cases():
    t = chat("gsm8k")
    assert t.reward("<answer></answer>\n\\boxed{18}", GSM).total == 1.0  # empty tags, then the box
    assert t.reward("She earns 18 dollars.\n<answer>", GSM).correct  # cut after the opening tag
    assert t.reward("\\boxed{} so she makes 18 per day", GSM).correct  # an empty box does not win
    assert t.reward("<answer>\\boxed{...}</answer> 18", GSM).correct  # nor the prompt's placeholder
    assert t.reward("<answer>\\boxed{\\$18}</answer>", GSM).total == 1.0
    assert not t.reward("<answer>\\boxed{19}</answer> 18", GSM).correct  # the marked answer wins over a later number
    time_item = Item(id="t", question="q", answer="2")
    assert t.reward("<answer>\\boxed{2:00 pm}</answer>", time_item).correct  # a clock time reads as its hour
    assert not t.reward("<answer>\\boxed{2:00 pm}</answer>", Item(id="z", question="q", answer="0")).correct


def test_sudoku_llada_cases():
    t = chat("sudoku")
    assert t.reward("</reasoning>\n\\boxed{3142243142131324}", SUDOKU).total == 1.0
    assert t.reward("<answer>\n\\boxed{3142 2431 4213 1324}\n</answer>", SUDOKU).total == 1.0
    assert t.reward("<answer></answer>", SUDOKU).total == 0.0


def test_math_llada_cases(math_task):
    item = math_task.eval_items()[0]
    assert math_task.reward("<answer></answer> \\boxed{\\frac{3}{4}}", item).total == 1.0
    assert math_task.reward("<answer>\\boxed{}</answer> so \\boxed{0.75}", item).total == 1.0
    assert not math_task.reward("<answer>\\boxed{\\frac{2}{3}}</answer> \\boxed{\\frac{3}{4}}", item).correct


# --- one correct answer, four ways of writing it: boxed, tagged, untagged (a box, no tags), operator symbols

VARIANTS = {
    "countdown": (CD_MUL, ["<answer>\\boxed{6*4-5}</answer>", "<answer>6*4-5</answer>",
                           "<reasoning>r</reasoning>\n\\boxed{6*4-5}", "<answer>6 \\times 4 - 5</answer>"]),
    "gsm8k": (GSM, ["<answer>\\boxed{18}</answer>", "<answer>18</answer>", "<reasoning>r</reasoning>\n\\boxed{18}",
                    "<answer>\\$18.00</answer>"]),
    "sudoku": (SUDOKU, ["<answer>\\boxed{3142243142131324}</answer>", "<answer>3142243142131324</answer>",
                        "<reasoning>r</reasoning>\n\\boxed{3142243142131324}",
                        "<answer>3142 | 2431 | 4213 | 1324</answer>"]),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_of_one_answer_score_the_same(name):
    t = chat(name)
    item, variants = VARIANTS[name]
    rewards = [t.reward(v, item) for v in variants]
    assert all(r == rewards[0] for r in rewards) and rewards[0].total == 1.0
    wrong = variants[0].replace("18", "19").replace("6*4", "6*5").replace("3142", "3112", 1)  # a blank cell
    assert wrong != variants[0] and t.reward(wrong, item).total < 1.0  # and a changed answer does not


def test_math_variants_of_one_answer_score_the_same(math_task):
    item = math_task.eval_items()[0]
    variants = ["<answer>\\boxed{\\frac{3}{4}}</answer>", "<answer>\\frac{3}{4}</answer>",
                "<reasoning>r</reasoning>\n\\boxed{\\frac{3}{4}}", "<answer>3 \\div 4</answer>"]
    rewards = [math_task.reward(v, item) for v in variants]
    assert all(r == rewards[0] for r in rewards) and rewards[0].total == 1.0
    assert math_task.reward("<answer>\\boxed{\\frac{2}{4}}</answer>", item).total < 1.0
