"""`unmask eval --protocol d1|agrpo|ours`: held-out accuracy the way a paper measured it.

For each generation length the protocol fixes: decode with its settings, grade every completion with its
grader and with our task reward, and write both beside the protocol, grader, data split and the full
sampler settings (``eval.json``; completions and per-item grades in ``completions_<length>.jsonl``), so a
number can be set beside the paper's (docs/BASELINES.md) and every item where the graders differ can be read.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from common.config import UnmaskConfig


def evaluate_protocol(cfg: UnmaskConfig, protocol: str, out_dir: str | Path | None = None,
                      limit: int | None = None) -> dict:
    """Protocol accuracy and our reward's accuracy per generation length, with what produced them (decoded in
    ``rollout.eval_batch_tokens`` batches by ``Generator.decode``, as every evaluation is)."""
    from common.tasks import summarize_rewards
    from common.tasks.paper_graders import accuracy
    from common.tasks.protocols import get_protocol
    from common.threads import set_cpu_threads
    from rollout.actor import Generator

    proto = get_protocol(protocol)
    set_cpu_threads(cfg.run.cpu_threads)
    gen = Generator(cfg.model, cfg.sampler, proto.task_config(cfg.task))
    task, tok = gen.task, gen.tokenizer
    items = proto.eval_items(task, limit)
    prompts = [tok.encode(proto.prompt(task, it, tok)) for it in items]
    record = {**proto.record(task), "model": cfg.model.path or cfg.model.preset, "items": len(items), "results": []}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for length in proto.gen_lengths(cfg.sampler):
        # Held-out decoding (as the run's evaluations: greedy by default), then what the protocol fixes.
        settings = {**cfg.run.held_out_decoding(), **proto.sampler_settings(length)}
        sampler = type(cfg.sampler).model_validate({**cfg.sampler.model_dump(), **settings})
        t0 = time.perf_counter()
        texts = gen.decode(prompts, sampler, cfg.rollout.eval_batch_tokens)
        rewards = [task.reward(text, it) for text, it in zip(texts, items)]
        grades = proto.grades(task, texts, items, rewards)
        ours = summarize_rewards(rewards)
        ours_correct = [r.correct for r in rewards]
        row = {"gen_length": length, "sampler": sampler.model_dump(mode="json"), "accuracy": accuracy(grades),
               "grader": record["grader"], "ours": {"grader": task.grader, **ours},
               "items_graders_disagree": sum(g.correct != c for g, c in zip(grades, ours_correct)),
               "seconds": time.perf_counter() - t0}
        record["results"].append(row)
        print(f"{proto.name} {task.name} gen_length {length:4d} steps {sampler.steps:4d}: accuracy "
              f"{100 * row['accuracy']:.2f} ({proto.name} grader), {100 * ours['accuracy']:.2f} (ours); "
              f"{row['items_graders_disagree']} of {len(items)} items graded differently")
        if out is not None:
            with (out / f"completions_{length}.jsonl").open("w") as f:
                for it, text, g, c in zip(items, texts, grades, ours_correct):
                    f.write(json.dumps({"id": it.id, "completion": text, "answer": g.answer, "credit": g.credit,
                                        "correct": g.correct, "correct_ours": c}) + "\n")
    if out is not None:
        (out / "eval.json").write_text(json.dumps(record, indent=2))
        print(f"wrote {out / 'eval.json'}")
    return record
