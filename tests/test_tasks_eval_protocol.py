"""`unmask eval --protocol`: the driver records protocol, grader, split and sampler, and grades both ways."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

import rollout.actor
from common.config import load_config
from common.tasks import get_task
from common.tasks.countdown import solve
from common.tasks.protocols import PROTOCOLS
from common.tokenizers import CharTokenizer
from driver.cli import main
from driver.eval_protocol import evaluate_protocol


class FakeGenerator:
    """Stands in for the policy: row i of a batch 'generates' TEXTS[i] (set by the test)."""

    texts: list[str] = []
    samplers: list = []

    def __init__(self, model_cfg, sampler_cfg, task_cfg):
        self.task = get_task(task_cfg)
        self.tokenizer = CharTokenizer()

    decode = rollout.actor.Generator.decode  # the real token-budget batching over the fake generate

    def generate(self, prompt_rows, seed, sampler_cfg):
        FakeGenerator.samplers.append(sampler_cfg)
        return SimpleNamespace(completion_ids_BG=torch.arange(seed, seed + len(prompt_rows)).unsqueeze(1))


def test_d1_protocol_records_and_grades_both_ways(monkeypatch, tmp_path):
    cfg = load_config("tiny_countdown", [])
    task = get_task(PROTOCOLS["d1"].task_config(cfg.task))
    items = task.eval_items(6)
    sols = [solve(it.numbers, int(it.answer)) for it in items]
    # Even items boxed in the tags (both graders right); odd items bare in the tags: d1 reads the whole text.
    FakeGenerator.texts = [f"<answer>\n\\boxed{{{s}}}\n</answer>" if i % 2 == 0 else f"<answer>{s}</answer>"
                           for i, s in enumerate(sols)]
    FakeGenerator.samplers = []
    monkeypatch.setattr(rollout.actor, "Generator", FakeGenerator)
    monkeypatch.setattr(rollout.actor, "completion_text", lambda tok, ids: FakeGenerator.texts[ids[0]])
    record = evaluate_protocol(cfg, "d1", out_dir=tmp_path, limit=6)
    assert record["protocol"] == "d1" and record["grader"].startswith("d1:") and record["items"] == 6
    assert [r["gen_length"] for r in record["results"]] == [128, 256, 512]
    for r in record["results"]:
        assert (r["sampler"]["block_length"], r["sampler"]["steps"]) == (32, r["gen_length"] // 2)
        assert r["sampler"]["remasking"] == "low_confidence" and r["sampler"]["temperature"] == 0.0
        assert r["accuracy"] == 0.5 and r["ours"]["accuracy"] == 1.0 and r["items_graders_disagree"] == 3
        assert r["ours"]["grader"] == task.grader
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["results"][0]["accuracy"] == 0.5
    lines = [json.loads(x) for x in (tmp_path / "completions_256.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in lines] == [True, False] * 3 and all(x["correct_ours"] for x in lines)


def test_cli_protocol_steps_conflict(capsys):
    assert main(["eval", "--protocol", "d1", "--steps", "8"]) == 2
    assert "fixes the steps" in capsys.readouterr().err


def test_a_protocol_is_one_entry_and_ours_decodes_as_the_runs_held_out_evaluations(monkeypatch):
    """A protocol added as one PROTOCOLS entry (its prompt and items; the task's reward grades it) evaluates
    end to end with no other change; ``ours`` decodes with the run's held-out overrides, not the rollout sampler's."""
    from common.tasks.protocols import Protocol

    cfg = load_config("tiny_countdown", ["run.eval_temperature=0.5", "sampler.top_k=7", "sampler.temperature=1.3"])
    prompts = []
    mine = Protocol(name="mine", source="a test", prompt=lambda task, item, tok: prompts.append(item.id) or "Q",
                    items=lambda task: task.eval_items(3), chat=False)
    monkeypatch.setitem(PROTOCOLS, "mine", mine)
    monkeypatch.setattr(rollout.actor, "Generator", FakeGenerator)
    task = get_task(cfg.task)
    sols = [solve(it.numbers, int(it.answer)) for it in task.eval_items(3)]
    FakeGenerator.texts = sols[:2] + ["1"]  # the compact prompt style's answer: the bare expression
    monkeypatch.setattr(rollout.actor, "completion_text", lambda tok, ids: FakeGenerator.texts[ids[0] % 3])
    for name in ("mine", "ours"):
        FakeGenerator.samplers = []
        record = evaluate_protocol(cfg, name, limit=3)
        (row,) = record["results"]
        assert record["grader"] == task.grader and row["accuracy"] == row["ours"]["accuracy"] == 2 / 3
        used = FakeGenerator.samplers[0]
        assert (used.temperature, used.top_k, used.top_p) == (0.5, None, None), name
    assert prompts == [it.id for it in task.eval_items(3)]
    # ... and the command line offers it, with --steps (it fixes no decoding of its own)
    assert main(["eval", "--protocol", "mine", "--steps", "8", "--limit", "3"]) == 0
