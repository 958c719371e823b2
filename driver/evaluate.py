"""Held-out evaluation: `unmask eval` of a checkpoint, and the evaluations during a run (`HeldOut`)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.config import RunConfig, UnmaskConfig

log = logging.getLogger("unmask")


def evaluate_checkpoint(cfg: UnmaskConfig, steps_list: list[int], out_dir: str | Path | None = None,
                        limit: int | None = None) -> dict[int, dict]:
    """Accuracy and mean reward on the task's held-out items for each sampling-step count, decoded in
    ``rollout.eval_batch_tokens`` batches by ``Generator.evaluate`` (what rollout workers evaluate with)."""
    from common.tasks import summarize_rewards
    from common.tasks.protocols import get_protocol
    from common.threads import set_cpu_threads
    from rollout.actor import Generator

    set_cpu_threads(cfg.run.cpu_threads)
    gen = Generator(cfg.model, cfg.sampler, cfg.task)
    items = gen.task.eval_items(limit or cfg.task.eval_size)
    results: dict[int, dict] = {}
    for steps in steps_list:
        # Held-out evaluation decodes as the run's evaluations do (greedy by default), not as rollouts sample.
        sampler = type(cfg.sampler).model_validate({**cfg.sampler.model_dump(), **cfg.run.held_out_decoding(),
                                                    "steps": steps})
        t0 = time.perf_counter()
        _, rewards = gen.evaluate(items, sampler, cfg.rollout.eval_batch_tokens)
        scores = summarize_rewards(rewards)
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


def _evaluate_round(workers: list, items: list, overrides: dict, label: str, timeout: float):
    """One spread of ``items`` over ``workers``: (records that came back, workers that answered, items of the
    workers that failed)."""
    import ray

    chunks = {w.evaluate.remote(chunk, overrides): (w, chunk)
              for w, chunk in zip(workers, [items[i::len(workers)] for i in range(len(workers))]) if chunk}
    done, late = ray.wait(list(chunks), num_returns=len(chunks), timeout=timeout)
    records, answered, failed = [], [], []
    for ref in done:
        try:
            records += ray.get(ref)
            answered.append(chunks[ref][0])
        except ray.exceptions.RayError as e:
            log.warning("%s: a worker failed (%s)", label, type(e).__name__)
            failed += chunks[ref][1]
    if late:
        log.warning("%s: %d worker(s) did not answer in %.0f s; their items are left out", label, len(late), timeout)
    return records, answered, failed


def evaluate_on_pool(pool, items: list, overrides: dict, label: str = "eval", skip: set[str] = frozenset(),
                     timeout: float = 1800.0) -> dict:
    """Held-out accuracy during a run, the items spread over the pool's active workers (but ``skip``: those
    not on the current weights). The items of a worker that failed are decoded once more, spread over the
    workers that answered; a worker that has not answered within ``timeout`` s is left out. The accuracy is
    over the ``n`` items that came back, ``missing`` counts the rest (a warning says so), and an evaluation
    where no item came back raises ``RunError`` (not an accuracy of 0)."""
    from driver.runtime import RunError

    workers = [pool.workers[wid] for wid in pool.active() if wid not in skip]
    if not workers:
        raise RunError("no rollout worker is placed and on the current weights to evaluate with")
    records, answered, failed = _evaluate_round(workers, items, overrides, label, timeout)
    if failed and answered:  # a worker died during it (a fault, a lost node): its items on the others
        log.warning("%s: %d items of failed workers decoded again on %d worker(s)", label, len(failed), len(answered))
        more, _, _ = _evaluate_round(answered, failed, overrides, label, timeout)
        records += more
    missing = len(items) - len(records)
    if not records:
        raise RunError(f"{label}: none of the {len(items)} held-out items came back (every evaluating worker failed "
                       "or timed out, see the warnings above); raise run.eval_timeout_s or check the rollout workers")
    acc = sum(r["correct"] for r in records) / len(records)
    reward = sum(r["reward"] for r in records) / len(records)
    if missing:
        log.warning("%s: accuracy %.3f over %d of %d items (%d missing), mean reward %.3f", label, acc, len(records),
                    len(items), missing, reward)
    else:
        log.info("%s: accuracy %.3f (%d items), mean reward %.3f", label, acc, len(records), reward)
    return {"accuracy": acc, "reward": reward, "n": len(records), "missing": missing, "records": records}


class HeldOut:
    """A run's held-out evaluations (before training, every ``run.eval_every`` steps, after), spread over the
    rollout pool's workers on the current weights, each logged with the items behind its number."""

    def __init__(self, run: RunConfig, items: list, pool, weights, metrics, ray_metrics, catch_up, sampler_steps: int):
        self.run, self.items, self.pool, self.weights = run, items, pool, weights
        self.metrics, self.ray_metrics = metrics, ray_metrics
        self.catch_up = catch_up  # sends the current weights to workers waiting for them, if the learner is idle
        self.overrides = run.held_out_decoding()
        self.steps = self.overrides.get("steps", sampler_steps)  # the sampling steps every held-out number decodes with

    def before_training(self, step: int) -> None:
        base = self.evaluate(step, "held-out before training")
        self._at_sampling_steps(step, base, "base")  # the base, for accuracy_vs_steps.png

    def at(self, step: int) -> None:
        """The periodic evaluation, if ``step`` is due one (the last step's is ``after_training``)."""
        if self.run.eval_every and step % self.run.eval_every == 0 and step < self.run.total_steps:
            self.evaluate(step, f"held-out at step {step}")

    def after_training(self, step: int, run_dir: Path) -> None:
        after = self.evaluate(step, "held-out after training")
        (run_dir / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after["records"]))
        self._at_sampling_steps(step, after, "held-out")

    def _at_sampling_steps(self, step: int, res: dict, who: str) -> None:
        """Accuracy at each of ``run.eval_sampling_steps``; at the count every held-out evaluation decodes with,
        it is ``res`` (the same decoding, seed included), not decoded a second time."""
        for steps in self.run.eval_sampling_steps:
            if steps == self.steps:
                log.info("%s at %d sampling steps: the held-out evaluation's %.3f", who, steps, res["accuracy"])
                self._log(step, res, {"steps": steps})
            else:
                self.evaluate(step, f"{who} at {steps} sampling steps", {"steps": steps})

    def evaluate(self, step: int, label: str, overrides: dict | None = None) -> dict:
        self.catch_up()
        res = evaluate_on_pool(self.pool, self.items, {**self.overrides, **(overrides or {})}, label=label,
                               skip=self.weights.awaiting, timeout=self.run.eval_timeout_s)
        self._log(step, res, overrides)
        return res

    def _log(self, step: int, res: dict, overrides: dict | None) -> None:
        counts = {"eval_n": res["n"], "eval_missing": res["missing"]}  # the items behind the number
        record = {"step": step, "eval_accuracy": res["accuracy"], "eval_reward": res["reward"], **counts}
        if overrides:
            record = {"step": step, "eval_sampling_steps": overrides["steps"], "eval_accuracy_at_steps": res["accuracy"],
                      **counts}
        self.metrics.log(record)
        self.ray_metrics.record("eval_accuracy", res["accuracy"])
        if step > 0 and not overrides:
            log.info("held-out trend: %s", " -> ".join(f"{r['eval_accuracy']:.3f}" for r in self._evals()))

    def _evals(self) -> list[dict]:
        from common.metrics import read_metrics

        return [r for r in read_metrics(self.metrics.path) if "eval_accuracy" in r]
