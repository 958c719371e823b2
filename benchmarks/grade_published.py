"""Grade published LLaDA-8B-Instruct generations with d1's grader, the AGRPO release's and ours.

    git clone https://github.com/dllm-reasoning/d1          # eval/eval_baselines: d1's base-model generations
    python -m benchmarks.grade_published d1/eval/eval_baselines --out benchmarks/results/graders.md

d1 publishes the raw generations behind its LLaDA-8B-Instruct baseline row (files
``{task}_instruct_{gen_length}_{steps}_{rank}_generations.json``). Grading the same text three ways shows
(a) that ``paper_graders.D1_GRADERS`` reproduces d1's numbers, and (b) how far each other grader reads from
them on identical generations, so a number can be set beside a paper's. The AGRPO column applies only
AGRPO's answer extraction and grading: its prompts differ, so it is not AGRPO's baseline. "ours" is the
task's reward (chat style) on the same text: accuracy for GSM8K/MATH/Countdown, and for Sudoku both the
solved-puzzle rate and the blank-cell fraction d1 reports. The last two columns count where the model
put its boxed answer (inside ``<answer>`` tags, or with no answer tags at all).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

_NAME = re.compile(r"(?P<task>gsm8k|math500|countdown|sudoku)_instruct_(?P<length>\d+)_(?P<steps>\d+)_\d+_generations\.json")
_SPECIAL = re.compile(r"<\|eot_id\|>|<\|endoftext\|>")


def load(directory: Path) -> dict[tuple[str, int, int], list[dict]]:
    """Generations grouped by (task, gen_length, steps), ranks concatenated in file-name order."""
    groups: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    for path in sorted(directory.glob("*_generations.json")):
        if (m := _NAME.fullmatch(path.name)) is not None:
            task = "math" if m["task"] == "math500" else m["task"]
            groups[(task, int(m["length"]), int(m["steps"]))] += json.loads(path.read_text())["generations"]
    return dict(sorted(groups.items()))


def to_item(task: str, row: dict):
    """Our Item from a d1 generation row (None when d1 could not read a gold answer)."""
    from common.tasks import Item

    gt = row["ground_truth"]
    if gt is None:
        return None
    if task == "countdown":
        return Item(id="x", question=",".join(map(str, gt[0])), answer=str(gt[1]), numbers=tuple(gt[0]))
    if task == "sudoku":
        return Item(id="x", question=re.search(r"\d{16}", row["question"]).group(), answer=gt)
    if task == "gsm8k":
        return Item(id="x", question=row["question"], answer=str(int(gt)) if float(gt).is_integer() else str(gt))
    return Item(id="x", question=row["question"], answer=str(gt))


def grade_group(task: str, rows: list[dict]) -> dict:
    from common.config.task import TaskConfig
    from common.tasks import get_task
    from common.tasks.paper_graders import AGRPO_GRADERS, D1_GRADERS, Grade, accuracy

    from common.tasks.answers import marked_answer
    from common.tasks.base import extract_tagged_answer

    ours = get_task(TaskConfig(name=task, prompt_style="chat"))
    d1, agrpo, mine, cells = [], [], [], []
    boxed_in_tags = boxed_no_tags = 0
    for row in rows:
        item = to_item(task, row)
        if item is None:  # d1 scores a row without gold as wrong; so do we
            d1.append(Grade(False, 0.0))
            agrpo.append(Grade(False, 0.0))
            mine.append(False)
            cells.append(0.0)
            continue
        text = _SPECIAL.split(row["generations"])[0]  # what our sampler hands the reward: cut at EOS
        if marked_answer(text)[1] == "boxed":  # LLaDA's habit: where the box sits
            region = extract_tagged_answer(text)
            boxed_in_tags += region is not None and "\\boxed" in region
            boxed_no_tags += region is None
        d1.append(D1_GRADERS[task](text, item))
        agrpo.append(AGRPO_GRADERS[task](text, item))
        r = ours.reward(text, item)
        mine.append(r.correct)
        cells.append(r.components["score"])
    n = len(rows)
    out = {"n": n, "d1": accuracy(d1), "agrpo_grader": accuracy(agrpo), "ours": sum(mine) / n,
           "d1_vs_ours_disagree": sum(g.correct != m for g, m in zip(d1, mine)),
           "boxed_in_tags": boxed_in_tags / n, "boxed_no_tags": boxed_no_tags / n}
    if task == "sudoku":
        out["ours_cells"] = sum(cells) / n
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path, help="d1's eval/eval_baselines (or any directory of such files)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table and the command")
    args = ap.parse_args(argv)
    groups = load(args.directory)
    if not groups:
        raise SystemExit(f"{args.directory}: no *_instruct_*_generations.json files")
    header = ("| task | gen length / steps | items | d1 grader | AGRPO grader | ours | ours, Sudoku cells | "
              "items d1 and ours disagree on | answer boxed inside the tags | boxed, no answer tags |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for (task, length, steps), rows in groups.items():
        r = grade_group(task, rows)
        cells = f"{100 * r['ours_cells']:.2f}" if "ours_cells" in r else "–"
        lines.append(f"| {task} | {length} / {steps} | {r['n']} | {100 * r['d1']:.2f} | {100 * r['agrpo_grader']:.2f} | "
                     f"{100 * r['ours']:.2f} | {cells} | {r['d1_vs_ours_disagree']} | {100 * r['boxed_in_tags']:.1f} | "
                     f"{100 * r['boxed_no_tags']:.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join([header, *lines])
    if args.out is not None:
        cmd = "python -m benchmarks.grade_published " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# One set of LLaDA-8B-Instruct generations, three graders\n\n"
            f"Command: `{cmd}` (the directory is `eval/eval_baselines` of github.com/dllm-reasoning/d1 at 837888f).\n\n"
            "Generations: d1's published LLaDA-8B-Instruct baseline (d1 prompts, block 32, steps = length/2, "
            "low-confidence remasking, temperature 0). Percentages. d1 grader = `paper_graders.D1_GRADERS` "
            "(reproduces d1's `parse_and_get_acc.py` item for item; Sudoku = correct cells / blank cells); AGRPO "
            "grader = the AGRPO release's extraction and grading applied to these d1-prompted texts (not an AGRPO "
            "baseline); ours = the task reward's `correct` (MATH: math-verify). d1's GSM8K files cover "
            "1130 of 1319 questions (some ranks' files are missing in the d1 repository).\n\n"
            f"{table}\n")


if __name__ == "__main__":
    main()
