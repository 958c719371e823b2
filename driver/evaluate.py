"""`unmask eval`: held-out accuracy of a checkpoint at several sampling-step counts, plus the plot."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.config import UnmaskConfig

log = logging.getLogger("unmask")


def evaluate_checkpoint(cfg: UnmaskConfig, steps_list: list[int], batch_size: int = 64,
                        out_dir: str | Path | None = None, limit: int | None = None) -> dict[int, dict]:
    """Accuracy and mean reward on the task's held-out items for each sampling-step count."""
    from tqdm import tqdm

    from common.tasks import score_completions
    from common.tasks.protocols import get_protocol
    from common.threads import set_cpu_threads
    from rollout.actor import Generator

    set_cpu_threads(cfg.run.cpu_threads)
    gen = Generator(cfg.model, cfg.sampler, cfg.task)
    items = gen.task.eval_items(limit or cfg.task.eval_size)
    prompts = gen.encode_prompts(items)
    results: dict[int, dict] = {}
    for steps in steps_list:
        # Held-out evaluation decodes as the run's evaluations do (greedy by default), not as rollouts sample.
        sampler = type(cfg.sampler).model_validate({**cfg.sampler.model_dump(), "steps": steps, "top_k": None,
                                                    "top_p": None, "temperature": cfg.run.eval_temperature})
        texts = []
        t0 = time.perf_counter()
        for start in tqdm(range(0, len(items), batch_size), desc=f"eval steps={steps}", leave=False):
            traj = gen.generate(prompts[start:start + batch_size], seed=start, sampler_cfg=sampler)
            texts += gen.score(traj, items[start:start + batch_size])[0]
        scores = score_completions(gen.task, texts, items)
        scores["seconds"] = time.perf_counter() - t0
        # What produced the number (`unmask eval --protocol d1|agrpo` for the papers' protocols).
        scores.update(get_protocol("ours").record(gen.task), sampler=sampler.model_dump(mode="json"))
        results[steps] = scores
        print(f"steps {steps:4d}: accuracy {scores['accuracy']:.3f}  mean reward {scores['mean_reward']:.3f}  "
              f"({len(items)} items, {scores['seconds']:.1f}s)")
    if out_dir is not None:
        from driver.plots import plot_accuracy_vs_steps

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
        label = Path(cfg.model.path).name if cfg.model.path else cfg.model.preset
        plot_accuracy_vs_steps({label: [(s, r["accuracy"]) for s, r in results.items()]},
                               out / "accuracy_vs_steps.png", f"{label} on {cfg.task.name}\nheld-out accuracy vs sampling steps")
        print(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_steps.png'}")
    return results
