"""`unmask sft`: masked-diffusion supervised training of a base model on solver-made completions.

Same learner group as RL, with the masked-diffusion SFT loss (learner/sft.py; DiffusionGemma's uniform-noise
objective for that family, learner/uniform_sft.py). The completion is padded with EOS to
``sampler.gen_length`` (as LLaDA's SFT does), so the model learns to end its answer.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from common.config import UnmaskConfig
from common.trajectory import Trajectory

log = logging.getLogger("unmask")


def sft_batch(items: list, task, tokenizer, gen_length: int) -> tuple[Trajectory, int]:
    """Prompt + EOS-padded reference completion of each item as a ``Trajectory`` (ids only), and how many
    items were left out because their reference plus its EOS does not fit in ``gen_length`` tokens (a
    truncated reference would teach a wrong answer with no end: a 16-digit Sudoku grid cut to 15)."""
    from rollout.sampler import pad_rows

    prompts, completions = [], []
    for item in items:
        text = task.reference_completion(item)
        if text is None:
            raise ValueError(f"task {task.name} has no reference completions; SFT needs a solver or a dataset")
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) > gen_length:
            continue
        completions.append(ids + [tokenizer.eos_id] * (gen_length - len(ids)))
        prompts.append(tokenizer.encode(task.prompt(item, tokenizer)))
    if not completions:
        need = len(tokenizer.encode(task.reference_completion(items[0]))) + 1
        raise ValueError(f"no reference completion in the batch fits sampler.gen_length={gen_length} (the first "
                         f"needs {need} tokens with its EOS); raise sampler.gen_length")
    prompt_ids, prompt_mask = pad_rows(prompts, tokenizer.pad_id)
    B, G = len(completions), gen_length
    zeros = torch.zeros(B, G)
    return Trajectory(
        prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask.bool(), completion_ids_BG=torch.tensor(completions),
        unmask_step_BG=torch.zeros(B, G, dtype=torch.long), logp_BG=zeros, entropy_BG=zeros, margin_BG=zeros,
        cutoff_BG=torch.full((B, G), float("-inf")), step_entropy_BT=torch.zeros(B, 1),
        step_margin_BT=torch.zeros(B, 1), step_committed_BT=torch.zeros(B, 1, dtype=torch.long),
        rewards_B=torch.zeros(B), group_B=torch.arange(B), policy_version_B=torch.zeros(B, dtype=torch.long)
    ), len(items) - B


def sft(cfg: UnmaskConfig) -> int:
    """Train, evaluate greedily on the held-out set every ``sft.eval_every`` steps, export the checkpoint."""
    import functools

    from common.metrics import MetricsLog
    from common.tasks import get_task
    from common.tokenizers import CharTokenizer, load_tokenizer
    from common.model import family_of
    from common.policy import policy_config, resolve_path
    from driver.evaluate import evaluate_checkpoint
    from driver.runtime import RunError, connect_ray, new_run_dir, setup_logging
    from learner.group import LearnerGroup
    from learner.sft import build_sft_loss

    setup_logging()
    tokenizer = load_tokenizer(resolve_path(cfg.model.path)) if cfg.model.path else CharTokenizer()
    task = get_task(cfg.task)
    stream = task.train_items(cfg.task.seed)
    batches = (sft_batch(list(itertools.islice(stream, cfg.sft.batch_size)), task, tokenizer, cfg.sampler.gen_length)
               for _ in range(cfg.sft.steps))
    try:
        first = next(batches)  # a gen_length too short for the references fails here, before Ray starts
    except ValueError as e:
        log.error("unmask: %s", e)
        return 2
    try:
        run_dir = new_run_dir(cfg)
    except RunError as e:
        log.error("unmask: %s", e)
        return 1
    from driver.trackers import build_trackers

    trackers = build_trackers(cfg.run, run_dir, cfg.model_dump(mode="json"))
    metrics = MetricsLog(run_dir / "metrics.jsonl", sinks=[trackers])
    connect_ray(cfg.run.ray_address)
    canvases = family_of(policy_config(cfg.model)).canvases
    learner = LearnerGroup(cfg.learner, cfg.model, seed=cfg.run.seed, ref_model=False,
                           loss_factory=functools.partial(build_sft_loss, mask_id=tokenizer.mask_id, eps=cfg.sft.eps,
                                                          position_ids=cfg.sampler.position_ids,
                                                          block_grid=cfg.sampler.block_grid,
                                                          block_length=cfg.sampler.block_length, canvases=canvases))
    out = Path(cfg.sft.output).resolve() if cfg.sft.output else run_dir / "model"
    log.info("SFT: %d steps x %d examples, lr %g, run dir %s", cfg.sft.steps, cfg.sft.batch_size, cfg.learner.lr, run_dir)
    t0, skipped = time.time(), 0
    try:
        for step, (batch, left_out) in enumerate(itertools.chain([first], batches), start=1):
            if left_out and not skipped:
                log.warning("SFT: %d of %d reference completions in the first such batch need more than "
                            "sampler.gen_length=%d tokens with their EOS and are left out; raise sampler.gen_length "
                            "to train on them", left_out, cfg.sft.batch_size, cfg.sampler.gen_length)
            skipped += left_out
            stats = learner.step(batch, step_seed=cfg.run.seed * 100_003 + step)
            metrics.log({"step": step, "sft_left_out": left_out, **stats})
            if step % 50 == 0 or step == cfg.sft.steps:
                eta = (time.time() - t0) / step * (cfg.sft.steps - step)
                log.info("sft step %d/%d | loss %.4f | ETA %dm%02ds", step, cfg.sft.steps, stats.get("loss", float("nan")),
                         eta // 60, eta % 60)
            if (cfg.sft.eval_every and step % cfg.sft.eval_every == 0) or step == cfg.sft.steps:
                learner.export_hf(str(out))
                tokenizer.save(out)
                eval_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(out)})})
                res = evaluate_checkpoint(eval_cfg, [cfg.sampler.steps], limit=cfg.sft.eval_size)[cfg.sampler.steps]
                metrics.log({"step": step, "eval_accuracy": res["accuracy"], "eval_reward": res["mean_reward"]})
        log.info("SFT done in %.0fs; checkpoint at %s%s", time.time() - t0, out,
                 f" ({skipped} too-long references left out)" if skipped else "")
        return 0
    finally:
        trackers.close()
        learner.shutdown()
