"""Evaluation protocols and the papers' graders (common/tasks/protocols.py, common/tasks/paper_graders.py)."""
from __future__ import annotations

import hashlib
import json
import itertools
import random
import time

import pytest

from common.config.sampler import SamplerConfig
from common.config.task import TaskConfig
from common.tasks import Item, get_task
from common.tasks import protocols as P
from common.tasks.sudoku import generate_puzzle
from common.tasks.paper_graders import AGRPO_GRADERS, D1_GRADERS, Grade, accuracy, d1_is_equiv, hendrycks_normalize
from common.tokenizers import CharTokenizer
from tests.test_tasks_security import ADVERSARIAL

CD = Item(id="cd", question="49,55,53", answer="51", numbers=(49, 55, 53))
GSM = Item(id="g", question="q", answer="1234")
MATH = Item(id="m", question="q", answer="\\frac{1}{2}")
SUDOKU = Item(id="s", question="3102200002100320", answer="3142243142131324")


class RecordingTokenizer(CharTokenizer):
    def format_prompt(self, user, system=None):
        self.last = (user, system)
        return f"<sys>{system}</sys><user>{user}</user>"


# Checked character for character against d1 (837888f), SPG (a1c7120) and the AGRPO release (98f1182):
# any edit to a prompt text must be deliberate.
PROMPT_SHA256 = {
    "d1/gsm8k": "f11d75a706090b95", "d1/math": "3e82f3bac66b3bc1", "d1/countdown": "a303f737bca286cb",
    "d1/sudoku": "758dc4e1b10cba4d", "agrpo/math": "b5bfce86f90b1220", "agrpo/gsm8k": "b5bfce86f90b1220",
    "agrpo/countdown": "dbb490008b112323", "agrpo/sudoku": "45b564f29a7ae650", "spg/few_shot": "50ca87be9b7f6eb4",
}


def test_prompt_texts_are_the_papers():
    texts = {**{f"d1/{k}": v for k, v in P.D1_SYSTEM.items()}, **{f"agrpo/{k}": v for k, v in P.AGRPO_SYSTEM.items()},
             "spg/few_shot": P.spg_few_shot()}
    assert {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in texts.items()} == PROMPT_SHA256


def test_d1_prompt_layout():
    tok = RecordingTokenizer()
    task = get_task(P.PROTOCOLS["d1"].task_config(TaskConfig(name="countdown")))
    text = P.PROTOCOLS["d1"].prompt(task, CD, tok)
    user, system = tok.last
    assert system is None and text.endswith("</user><reasoning>")  # one user message, assistant pre-filled
    assert user == P.D1_SYSTEM["countdown"] + "\n\nNumbers: [49, 55, 53]\nTarget: 51"
    spg = get_task(P.PROTOCOLS["d1"].task_config(TaskConfig(name="sudoku", sudoku_split="spg")))
    P.PROTOCOLS["d1"].prompt(spg, SUDOKU, tok)
    assert tok.last[0].endswith("Answer:\n<reasoning>\nInterpret puzzle as 4 rows of 4:\nR1: 2 0 0 1\nR2: 4 0 3 0\n"
                                "R3: 0 2 0 0\nR4: 1 4 2 0\n" + tok.last[0].split("R4: 1 4 2 0\n", 1)[1])
    assert tok.last[0].endswith("\n\nQuestion: Solve the following Sudoku puzzle: 3102200002100320\n\nAnswer:\n")


def spg_file(tmp_path, n=12):
    """A stand-in for SPG's split (not shipped): ``n`` generated puzzles in its CSV format."""
    rng = random.Random(5)
    rows = [generate_puzzle(rng, 8) for _ in range(n)]
    path = tmp_path / "spg.csv"
    path.write_text("Puzzle,Solution\n" + "".join(f"{p},{s}\n" for p, s in rows))
    return path


def test_spg_split_is_named_when_missing_and_its_grids_stay_out_of_training(tmp_path):
    with pytest.raises(ValueError, match="SPG's Sudoku split is not shipped"):
        get_task(TaskConfig(name="sudoku", sudoku_split="spg", data_dir=str(tmp_path))).eval_items()
    task = get_task(TaskConfig(name="sudoku", prompt_style="chat", sudoku_split="spg", eval_file=str(spg_file(tmp_path))))
    grids = {it.answer for it in task.eval_items()}
    assert not grids & {it.answer for it in itertools.islice(task.train_items(0), 300)}
    tok = RecordingTokenizer()
    task.prompt(task.eval_items(1)[0], tok)
    assert tok.last[0].startswith("Three solved examples:") and tok.last[0].count("</answer>") == 4  # 3 shots + the instruction
    with pytest.raises(ValueError, match="sudoku only"):
        TaskConfig(name="gsm8k", sudoku_split="spg")


def test_agrpo_prompt_layout_and_split(tmp_path):
    tok = RecordingTokenizer()
    proto = P.PROTOCOLS["agrpo"]
    cfg = proto.task_config(TaskConfig(name="sudoku", eval_file=str(spg_file(tmp_path))))
    assert cfg.sudoku_split == "spg" and cfg.prompt_style == "chat"
    task = get_task(cfg)
    assert len(proto.eval_items(task)) == 12 and proto.record(task)["sudoku_split"] == "spg"
    proto.prompt(task, SUDOKU, tok)
    assert tok.last == ("Puzzle: 3102200002100320", P.AGRPO_SYSTEM["sudoku"])
    gsm = get_task(proto.task_config(TaskConfig(name="gsm8k")))
    assert "GSM8K-Platinum" in proto.record(gsm)["dataset_note"]


def test_d1_sudoku_subset_is_d1s():
    task = get_task(TaskConfig(name="sudoku", prompt_style="chat"))
    items = P.PROTOCOLS["d1"].eval_items(task)
    assert len(items) == 256 and len({it.question for it in items}) == 256
    # The first puzzles of d1's rank-0 generation file (7 ranks: items 0, 7, 14 of its order).
    assert [items[i].question for i in (0, 7, 14)] == ["4320004330100004", "0204032001400402", "0104000214003041"]
    assert len(P.PROTOCOLS["ours"].eval_items(task)) == task.cfg.eval_size


@pytest.mark.parametrize("name", sorted(P.PROTOCOLS))
def test_sampler_settings_make_valid_samplers(name):
    proto = P.PROTOCOLS[name]
    base = SamplerConfig(gen_length=64, block_length=32, steps=32)
    for length in proto.gen_lengths(base):
        s = SamplerConfig.model_validate({**base.model_dump(), **proto.sampler_settings(length)})
        if name != "ours":
            assert (s.block_length, s.steps, s.remasking, s.temperature) == (32, length // 2, "low_confidence", 0.0)
    assert P.PROTOCOLS["d1"].gen_lengths(base) == (128, 256, 512)
    assert P.PROTOCOLS["agrpo"].sampler_settings(256)["stop_on_eos_block"]


# --- d1's grader, quirks included

@pytest.mark.parametrize("text,correct", [
    ("<answer>\\boxed{1234}</answer>", True),
    ("<answer>\\boxed{1,234}</answer>", False),  # d1 reads the first number in the box: 1
    ("\\boxed{...} \\boxed{1234} \\boxed{5}", True),  # the first usable box wins, the placeholder is skipped
    ("<answer>The total is 1234 dollars</answer>", True),  # no box: the tag's last number
    ("so \\boxed{\n1234}", False),  # d1's box regex does not cross a newline
])
def test_d1_gsm8k(text, correct):
    assert D1_GRADERS["gsm8k"](text, GSM).correct is correct


@pytest.mark.parametrize("text,correct", [
    ("\\boxed{\\frac{1}{2}}", True), ("\\boxed{\\dfrac12}", True), ("\\boxed{0.5}", True),  # d1's special case
    ("\\boxed{\\frac{2}{4}}", False), ("\\boxed{x=\\frac{1}{2}}", True), ("<answer>1/2</answer>", False),
    ("\\boxed{\\frac{1}{2}", False),
])
def test_d1_math(text, correct):
    assert D1_GRADERS["math"](text, MATH).correct is correct


def test_d1_hendrycks_quirks():
    assert hendrycks_normalize("\\left( 3, \\frac12 \\right)") == "(3,\\frac{1}{2})"
    assert d1_is_equiv("x/2", "x/2") and not d1_is_equiv("x/2", "\\frac{x}{2}")  # int('x') raises: raw equality
    assert not d1_is_equiv(None, "1")


@pytest.mark.parametrize("text,correct", [
    ("<answer>\n\\boxed{49 + 55 - 53}\n</answer>", True),
    ("\\boxed{(49 + 55) - 53 = 51}", True),
    ("<answer>49 + 55 - 53</answer>", False),  # no box: d1 takes the whole text, which has letters
    ("\\boxed{49 \\times 55 \\div 53}", False),
    ("\\boxed{53 - 55 + 49 + 4}", False),  # an extra number
    ("\\boxed{-53 + 55 + 49}", False),  # unary minus: d1's eval takes it, the safe parser does not (named)
])
def test_d1_countdown(text, correct):
    assert D1_GRADERS["countdown"](text, CD).correct is correct


def test_d1_sudoku_pools_cells():
    full = D1_GRADERS["sudoku"]("<answer>\n3142 2431\n4213 1324\n</answer>", SUDOKU)
    assert full.correct and full.credit == 1.0 and full.weight == 8
    half = D1_GRADERS["sudoku"]("<answer>31422431</answer>", SUDOKU)  # padded with zeros: first-half blanks only
    assert half.credit == 0.5
    other = Item(id="t", question="1234341221434321".replace("1", "0", 2), answer="1234341221434321")
    pooled = accuracy([half, D1_GRADERS["sudoku"]("<answer>1234341221434321</answer>", other)])
    assert pooled == pytest.approx((4 + 2) / (8 + 2))  # d1 pools cells; the mean of fractions would be 0.75


# --- the AGRPO release's grader

@pytest.mark.parametrize("text,correct", [
    ("<think>r</think>\n<answer>\n49 + 55 - 53 = 51\n</answer>", True),
    ("<answer>\\boxed{49 + 55 - 53}</answer>", False),  # no '= target' line
    ("<answer>\n49 + 55 = 104\n104 - 53 = 51\n</answer>", False),  # the last line's left side is not all numbers
    ("<ANSWER>\\boxed{49+55-53=51}</ANSWER>", True),  # tags case-insensitive, the first box's content
])
def test_agrpo_countdown(text, correct):
    assert AGRPO_GRADERS["countdown"](text, CD).correct is correct


def test_agrpo_gsm8k_and_sudoku():
    g = AGRPO_GRADERS["gsm8k"]
    assert g("<answer>\\boxed{1234}</answer>", GSM).correct and not g("<answer>\\boxed{1,234}</answer>", GSM).correct
    assert g("<answer>-1234</answer>", GSM).correct  # the first digit run, sign dropped, as AGRPO reads it
    s = AGRPO_GRADERS["sudoku"]
    assert s("<answer>3142243142131324</answer>", SUDOKU).credit == 1.0
    assert s("<answer>314224314213132</answer>", SUDOKU).answer == "0314224314213132"  # zero-padded on the left
    assert accuracy([Grade(True, 1.0), Grade(False, 0.5)]) == 0.75


def test_agrpo_math_uses_latex_verifier():
    g = AGRPO_GRADERS["math"]
    assert g("<answer>\\boxed{\\frac{2}{4}}</answer>", MATH).correct and g("<answer>0.5</answer>", MATH).correct
    assert not g("<answer>\\boxed{\\frac{1}{3}}</answer>", MATH).correct


def test_paper_graders_on_hostile_text():
    items = {"gsm8k": GSM, "countdown": CD, "sudoku": SUDOKU}
    for graders in (D1_GRADERS, AGRPO_GRADERS):
        for name, item in items.items():
            for text in ADVERSARIAL:
                t0 = time.perf_counter()
                g = graders[name](text, item)
                assert not g.correct and 0.0 <= g.credit <= 1.0
                assert time.perf_counter() - t0 < 1.0, (name, text[:30])


def test_ours_grades_with_the_task_reward_and_records_it():
    task = get_task(TaskConfig(name="countdown", prompt_style="chat"))
    proto = P.get_protocol("ours")
    text = "</reasoning> \\boxed{49+55-53}"
    assert proto.grades(task, [text], [CD], [task.reward(text, CD)])[0].correct
    rec = proto.record(task)
    assert rec["protocol"] == "ours" and rec["grader"] == task.grader and rec["eval_file"].endswith("cd3_test.jsonl")
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        P.get_protocol("d2")


def test_grade_published_on_d1_format_files(tmp_path):
    from benchmarks.grade_published import main as grade_published

    rows = [{"question": "Numbers: [49, 55, 53]\nTarget: 51", "ground_truth": [[49, 55, 53], 51],
             "generations": "r</reasoning>\n<answer>\n\\boxed{49 + 55 - 53}\n</answer><|eot_id|><|endoftext|>"},
            {"question": "Numbers: [49, 55, 53]\nTarget: 51", "ground_truth": [[49, 55, 53], 51],
             "generations": "r</reasoning>\n\\boxed{49 + 55 - 53}<|eot_id|>"}]  # no tags: d1 still finds the box
    (tmp_path / "countdown_instruct_128_64_0_generations.json").write_text(json.dumps({"generations": rows}))
    out = tmp_path / "graders.md"
    grade_published([str(tmp_path), "--out", str(out)])
    line = next(x for x in out.read_text().splitlines() if x.startswith("| countdown"))
    assert line.split(" | ")[1:] == ["128 / 64", "2", "100.00", "0.00", "100.00", "–", "0", "50.0", "50.0 |"]
