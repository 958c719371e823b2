"""Tasks: held-out sets, generators, prompts, rewards and scoring (common/tasks)."""
from __future__ import annotations

import csv
import itertools
import json
import pickle
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config.task import TaskConfig
from common.tasks import Item, get_task, score_completions
from common.tasks.arith import MAX_DEPTH, ArithError, evaluate
from common.tasks.countdown import generate_item, reachable, solve
from common.tasks.gsm8k import extract_number, parse_number
from common.tasks.sudoku import all_grids, generate_puzzle, is_valid_solution, solutions
from common.tokenizers import CharTokenizer

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RecordingTokenizer(CharTokenizer):
    """Char tokenizer that remembers what the chat template was asked to format."""

    def format_prompt(self, user, system=None):
        self.last = (user, system)
        return f"<sys>{system}</sys><user>{user}</user>"


def task(name, style="compact", **kw):
    return get_task(TaskConfig(name=name, prompt_style=style, **kw))


# --- arithmetic parser

def test_arith_exact_rationals_and_precedence():
    assert evaluate("1/3*3") == (Fraction(1), [1, 3, 3])
    assert evaluate("2+3*4")[0] == 14
    assert evaluate("(2+3)*4")[0] == 20
    assert evaluate("100-93-30")[0] == -23
    assert evaluate("7 ÷ 2 × 4")[0] == 14


@pytest.mark.parametrize("text", ["1/0", "5/(3-3)", "2**3", "2^3", "-3+4", "3+", "(3", "3)", "3 4", "1.5+2", "abc", "", "1234567+1"])
def test_arith_rejects(text):
    with pytest.raises(ArithError):
        evaluate(text)


def test_arith_depth_bound():
    assert evaluate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH)[0] == 1
    with pytest.raises(ArithError):
        evaluate("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))


# --- countdown

def test_countdown_eval_set_and_compact_references():
    t = task("countdown")
    items = t.eval_items()
    assert len(items) == 256 and items[0].numbers == (30, 100, 93) and items[0].answer == "23"
    assert t.eval_items(5) == items[:5]
    assert t.prompt(items[0], CharTokenizer()) == "30,100,93=23\n"
    for it in items:
        ref = t.reference_completion(it)
        assert ref is not None and len(ref) <= 24
        r = t.reward(ref, it)
        assert r.correct and r.total == 1.0


@PROPS
@given(seed=st.integers(0, 2**32), n=st.sampled_from([3, 4]))
def test_countdown_solver_full_marks_mutations_fail(seed, n):
    t = task("countdown", num_numbers=n)
    item = generate_item(random.Random(seed), n, "x")
    ref = t.reference_completion(item)
    assert t.reward(ref, item).total == 1.0
    assert t.reward(ref + "\nleftover junk", item).correct  # only the first line counts
    assert t.reward(f"{ref}={item.answer}", item).correct
    wrong_value = t.reward(f"{ref}+1", item)  # an extra number and off by one
    assert not wrong_value.correct and wrong_value.total == pytest.approx(t.cfg.format_weight)
    first = str(item.numbers[0])
    i = ref.index(first) if first in ref else None
    if i is not None:
        swapped = ref[:i] + str(int(first) + 1) + ref[i + len(first):]
        r = t.reward(swapped, item)
        assert not r.correct and r.components["numbers"] == 0.0


def test_countdown_chat_format_and_numbers_rule():
    t = task("countdown", "chat")
    item = Item(id="x", question="3,5,2", answer="13", numbers=(3, 5, 2))
    tok = RecordingTokenizer()
    p = t.prompt(item, tok)
    assert "[3, 5, 2]" in tok.last[0] and "<answer>" in tok.last[1] and p.startswith("<sys>")
    assert t.reward("<reasoning>x</reasoning><answer>3+5*2</answer>", item).total == 1.0
    assert t.reward("3+5*2", item).total == 0.0  # no tags
    r = t.reward("<answer>3*2-5</answer>", item)
    assert not r.correct and r.components["format"] == 1.0 and r.components["numbers"] == 1.0
    r = t.reward("<answer>5*2+3+0</answer>", item)  # right value, extra number
    assert not r.correct and r.components["numbers"] == 0.0
    r = t.reward("<answer>5*2+3", item)  # cut before the closing tag
    assert r.correct


def test_countdown_generator_excludes_heldout(tmp_path):
    # A held-out file made of the stream's own first items: the stream must now skip exactly those.
    base = task("countdown")
    first = list(itertools.islice(base.train_items(7), 40))
    path = tmp_path / "cd.jsonl"
    path.write_text("".join(json.dumps({"input": it.question, "output": it.answer}) + "\n" for it in first[::2]))
    t = task("countdown", eval_file=str(path))
    held = {(tuple(sorted(it.numbers)), it.answer) for it in t.eval_items()}
    stream = list(itertools.islice(t.train_items(7), 60))
    assert not held & {(tuple(sorted(it.numbers)), it.answer) for it in stream}
    assert [it.question for it in stream[:20]] == [it.question for it in first[1::2]][:20]
    real = {(tuple(sorted(it.numbers)), it.answer) for it in base.eval_items()}
    assert not real & {(tuple(sorted(it.numbers)), it.answer) for it in itertools.islice(base.train_items(0), 2000)}


def test_train_streams_are_deterministic_and_seeded():
    for name in ("countdown", "sudoku", "gsm8k"):
        t = task(name)
        a = [it.id + it.question for it in itertools.islice(t.train_items(3), 30)]
        b = [it.id + it.question for it in itertools.islice(t.train_items(3), 30)]
        c = [it.question for it in itertools.islice(t.train_items(4), 30)]
        assert a == b and [x.split(":", 2)[-1] for x in a] != c


def test_countdown4_heldout_is_generated_and_excluded():
    t = task("countdown", num_numbers=4)
    ev = t.eval_items()
    assert len(ev) == 256 and all(len(it.numbers) == 4 and solve(it.numbers, int(it.answer)) for it in ev)
    assert ev == task("countdown", num_numbers=4).eval_items()
    keys = {(tuple(sorted(it.numbers)), it.answer) for it in ev}
    assert not keys & {(tuple(sorted(it.numbers)), it.answer) for it in itertools.islice(t.train_items(0), 50)}


def test_reachable_matches_brute_force_on_small_numbers():
    values = reachable((2, 3, 4))
    assert Fraction(5) in values and evaluate(values[Fraction(5)])[0] == 5
    assert Fraction(24) in values and Fraction(2, 3) in values  # 2*3*4, (4-2)/3
    assert solve((1, 1, 1), 100) is None


# --- sudoku

def test_sudoku_eval_set_and_references():
    t = task("sudoku")
    items = t.eval_items()
    assert len(items) == 500 and items[0].question == "3102200002100320"
    assert t.prompt(items[0], CharTokenizer()) == "3102200002100320\n"
    multi = 0
    for it in items:
        assert t.reward(t.reference_completion(it), it).total == 1.0
        found = solutions(it.question, limit=10)
        assert it.answer in found
        multi += len(found) > 1
        for other in found:  # a different valid solution is right too
            assert t.reward(other, it).correct
    assert multi == 124


@PROPS
@given(seed=st.integers(0, 2**32), blanks=st.integers(4, 10))
def test_sudoku_generated_unique_and_mutations_lose_credit(seed, blanks):
    puzzle, solution = generate_puzzle(random.Random(seed), blanks)
    assert puzzle.count("0") == blanks and is_valid_solution(solution)
    assert all(p in ("0", s) for p, s in zip(puzzle, solution))
    assert solutions(puzzle, limit=2) == [solution]
    t = task("sudoku")
    item = Item(id="x", question=puzzle, answer=solution)
    assert t.reward(solution, item).total == 1.0
    pos = [i for i, c in enumerate(puzzle) if c == "0"][seed % blanks]
    wrong = solution[:pos] + str(int(solution[pos]) % 4 + 1) + solution[pos + 1:]
    r = t.reward(wrong, item)
    assert not r.correct and r.components["score"] == pytest.approx((blanks - 1) / blanks)


def test_sudoku_reward_partial_and_format():
    t = task("sudoku", format_weight=0.2)
    item = Item(id="x", question="3102200002100320", answer="3142243142131324")
    assert t.reward("3142 2431 4213 1324", item).total == 1.0
    assert t.reward("3102200002100320", item).components == {"score": 0.0, "format": 0.0, "correct": 0.0}
    r = t.reward("31422431", item)  # first half only: blanks in the first 8 cells count
    assert r.components["score"] == pytest.approx(4 / 8) and r.components["format"] == 0.0
    chat = task("sudoku", "chat")
    assert chat.reward("<answer>\n3142\n2431\n4213\n1324\n</answer>", item).total == 1.0
    assert chat.reward("3142243142131324", item).components["format"] == 0.0
    # All-or-nothing: one wrong blank scores like an empty answer; a solved grid still scores 1.
    solved_only = task("sudoku", format_weight=0.2, partial_credit=False)
    assert solved_only.reward("3142243142131324", item).total == 1.0
    one_wrong = solved_only.reward("3142243142131323", item)
    assert one_wrong.components["score"] == 0.0 and one_wrong.total == pytest.approx(0.2)
    with pytest.raises(ValueError, match="sudoku only"):
        TaskConfig(name="countdown", partial_credit=False)


def test_sudoku_generator_excludes_heldout(tmp_path):
    base = task("sudoku")
    first = list(itertools.islice(base.train_items(1), 30))
    path = tmp_path / "s.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Puzzle", "Solution"])
        w.writerows((it.question, it.answer) for it in first[:15])
    t = task("sudoku", eval_file=str(path))
    held = {it.question for it in t.eval_items()}
    assert not held & {it.question for it in itertools.islice(t.train_items(1), 200)}
    real = {it.question for it in base.eval_items()}
    assert not real & {it.question for it in itertools.islice(base.train_items(0), 500)}
    assert len(all_grids()) == 288


# --- gsm8k

@pytest.mark.parametrize("text,value", [
    ("The answer is 18.", 18), ("<answer>$1,234.00</answer>", 1234), ("so \\boxed{-7} and then 9", -7),
    ("first 3 then 4.50", Fraction(9, 2)), ("<answer>\n70,000\n</answer> 12", 70000), ("none", None),
])
def test_gsm8k_extraction(text, value):
    assert extract_number(text) == value


def test_gsm8k_files_references_and_heldout():
    t = task("gsm8k", "chat")
    ev = t.eval_items()
    assert len(ev) == 1319 and ev[0].answer == "18"
    refs = [t.reference_completion(it) for it in ev[:200]]
    assert "<<" not in refs[0] and refs[0].endswith("<answer>\n18\n</answer>")
    assert score_completions(t, refs, ev[:200])["accuracy"] == 1.0
    assert parse_number("$1,000") == 1000 and parse_number("12%") == 12 and parse_number("1e9") is None
    held = {" ".join(it.question.split()).lower() for it in ev}
    train = list(itertools.islice(t.train_items(0), 8000))
    assert not held & {" ".join(it.question.split()).lower() for it in train}
    compact = task("gsm8k")
    assert compact.reward("18", ev[0]).total == 1.0
    assert compact.reward("18\n19 junk", ev[0]).correct
    r = compact.reward("19", ev[0])
    assert not r.correct and r.total == pytest.approx(0.1)
    assert not compact.reward("the answer is 18", ev[0]).components["format"]


# --- scoring and records

def test_score_completions_and_pickle():
    t = task("countdown")
    items = t.eval_items(4)
    comps = [t.reference_completion(items[0]), "1+1", "", "9**9"]
    out = score_completions(t, comps, items)
    assert out["accuracy"] == 0.25 and out["n"] == 4
    assert out["mean_reward"] == pytest.approx((1.0 + 0.1) / 4) and out["mean_format"] == 0.5
    with pytest.raises(ValueError):
        score_completions(t, comps[:2], items)
    assert pickle.loads(pickle.dumps(items[0])) == items[0]
    assert pickle.loads(pickle.dumps(t.reward(comps[0], items[0]))).total == 1.0


def test_data_dir_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        task("gsm8k", data_dir=str(tmp_path)).eval_items()
    with pytest.raises(ValueError, match="set task.train_file"):
        next(task("math", "chat", eval_file=None).train_items(0))
