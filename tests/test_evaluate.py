"""Held-out evaluation decodes in batches of at most ``rollout.eval_batch_tokens`` tokens, through one function
(``Generator.evaluate``) that rollout workers and ``unmask eval`` share."""
import pytest

from common.config import load_config
from rollout.actor import Generator, RolloutWorker, token_batches

# Greedy, deterministic commit order: the completions do not depend on how the items are batched.
GREEDY = ["sampler.remasking=low_confidence", "run.eval_temperature=0.0"]


def test_token_batches_cover_the_rows_in_order_within_the_budget():
    lengths, G = [3, 5, 2, 9, 4, 4, 1, 30, 2], 6
    for budget in (1, 20, 33, 60, 10**6):
        batches = token_batches(lengths, G, budget)
        assert [i for b in batches for i in range(b.start, b.stop)] == list(range(len(lengths)))
        for b in batches:
            size = (b.stop - b.start) * (max(lengths[b]) + G)
            assert size <= budget or b.stop - b.start == 1  # only a row that alone exceeds it goes over
            if b.stop < len(lengths):  # greedy: the next row would not have fitted
                assert (b.stop - b.start + 1) * (max(lengths[b.start:b.stop + 1]) + G) > budget
    assert len(token_batches(lengths, G, 10**6)) == 1 and len(token_batches(lengths, G, 1)) == len(lengths)
    assert token_batches([], G, 100) == []


@pytest.fixture(scope="module")
def gen():
    cfg = load_config("tiny_countdown", GREEDY)
    return cfg, Generator(cfg.model, cfg.sampler, cfg.task, device="cpu")


def test_budgeted_batches_decode_what_one_batch_decodes(gen, monkeypatch):
    cfg, g = gen
    items = g.task.eval_items(10)
    sampler = cfg.sampler.model_copy(update={"temperature": 0.0})
    sizes = []
    generate = g.generate
    monkeypatch.setattr(g, "generate", lambda rows, **kw: sizes.append(len(rows)) or generate(rows, **kw))
    width = max(len(p) for p in g.encode_prompts(items)) + sampler.gen_length
    texts, rewards = g.evaluate(items, sampler, token_budget=3 * width)
    assert len(sizes) >= 4 and max(sizes) <= 3 and sum(sizes) == 10
    sizes.clear()
    whole, whole_rewards = g.evaluate(items, sampler, token_budget=10**6)
    assert sizes == [10]
    assert texts == whole and [r.total for r in rewards] == [r.total for r in whole_rewards]


def test_unmask_eval_and_rollout_workers_evaluate_through_generator_evaluate(gen, monkeypatch):
    from common.tasks import Reward
    from driver.evaluate import evaluate_checkpoint

    cfg, g = gen
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"eval_batch_tokens": 123})})
    seen = []

    def fake(self, items, sampler_cfg, token_budget, seed=0):
        seen.append((len(items), sampler_cfg.steps, token_budget))
        return ["x"] * len(items), [Reward(total=1.0, correct=True, components={}) for _ in items]

    monkeypatch.setattr(Generator, "evaluate", fake)
    res = evaluate_checkpoint(cfg, [4, 8], limit=5)
    assert seen == [(5, 4, 123), (5, 8, 123)] and res[4]["accuracy"] == 1.0

    worker = RolloutWorker.__new__(RolloutWorker)  # the actor's evaluate, without its queue and Ray
    worker.gen, worker.eval_batch_tokens = g, 77
    worker._apply_staged = lambda: None
    records = worker.evaluate(g.task.eval_items(3), {"steps": 8})
    assert seen[-1] == (3, 8, 77) and [r["correct"] for r in records] == [True] * 3


@pytest.mark.ray
def test_evaluation_during_a_run_counts_its_items_and_fails_loudly_with_none(ray_local, caplog):
    """A failed worker's items are decoded again on the workers that answered; items that fail there too are
    left out: n and missing say so (console too); with none back it stops."""
    import logging

    import ray

    from driver.pool import RolloutPool
    from driver.runtime import RunError

    @ray.remote(num_cpus=0)
    class Evaluator:
        def __init__(self, fails_on):
            self.fails_on = fails_on

        def evaluate(self, items, overrides):
            if set(items) & self.fails_on:
                raise RuntimeError("out of memory")
            return [{"id": i, "completion": "", "reward": 0.0, "correct": i < 3} for i in items]

    from driver.evaluate import evaluate_on_pool

    pool = RolloutPool(make_worker=None)
    everything = set(range(10))
    pool.workers.update(good=Evaluator.remote(set()), bad=Evaluator.remote(everything))
    with caplog.at_level(logging.INFO, logger="unmask"):
        res = evaluate_on_pool(pool, list(range(10)), {}, label="held-out", timeout=120)
    assert (res["n"], res["missing"], res["accuracy"]) == (10, 0, 0.3)  # bad's 5 items, decoded again on good
    assert any("5 items of failed workers decoded again on 1 worker(s)" in r.getMessage() for r in caplog.records)
    pool.workers["good"] = Evaluator.remote({7})  # answers its own share, fails on bad's (item 7 among them)
    with caplog.at_level(logging.INFO, logger="unmask"):
        res = evaluate_on_pool(pool, list(range(10)), {}, label="held-out", timeout=120)
    assert (res["n"], res["missing"], res["accuracy"]) == (5, 5, 0.4)  # a real 0.4 over 5 items, not over 10
    assert any("over 5 of 10 items (5 missing)" in r.getMessage() for r in caplog.records)
    del pool.workers["good"]
    with pytest.raises(RunError, match="none of the 10 held-out items came back"):
        evaluate_on_pool(pool, list(range(10)), {}, label="held-out", timeout=120)


def test_the_run_records_how_many_items_its_held_out_numbers_are_over(monkeypatch, tmp_path):
    import types

    import driver.evaluate
    from common.config import load_config
    from driver.evaluate import HeldOut

    logged = []
    metrics = types.SimpleNamespace(log=logged.append, path=tmp_path / "metrics.jsonl")
    held_out = HeldOut(load_config("tiny_countdown", []).run, list(range(10)), None, types.SimpleNamespace(awaiting=set()),
                       metrics, types.SimpleNamespace(record=lambda *a: None), catch_up=lambda: None, sampler_steps=16)
    monkeypatch.setattr(driver.evaluate, "evaluate_on_pool", lambda *a, **k: {
        "accuracy": 0.5, "reward": 0.1, "n": 6, "missing": 4, "records": []})
    held_out.evaluate(0, "held-out before training")
    held_out.evaluate(0, "base at 8 sampling steps", {"steps": 8})
    assert [(r["eval_n"], r["eval_missing"]) for r in logged] == [(6, 4), (6, 4)]


def test_the_sampling_step_count_the_run_decodes_with_is_not_decoded_twice(monkeypatch, tmp_path):
    import types

    import driver.evaluate
    from common.config import load_config
    from driver.evaluate import HeldOut

    logged, decoded = [], []
    metrics = types.SimpleNamespace(log=logged.append, path=tmp_path / "metrics.jsonl")
    metrics.path.touch()  # the trend line after training reads it
    run = load_config("tiny_countdown", ["run.eval_sampling_steps=[4,16]"]).run
    held_out = HeldOut(run, list(range(10)), None, types.SimpleNamespace(awaiting=set()), metrics,
                       types.SimpleNamespace(record=lambda *a: None), catch_up=lambda: None, sampler_steps=16)

    def evaluate_on_pool(pool, items, overrides, **kwargs):
        decoded.append(overrides.get("steps"))
        return {"accuracy": 0.25 if overrides.get("steps") == 4 else 0.5, "reward": 0.1, "n": 10, "missing": 0,
                "records": []}

    monkeypatch.setattr(driver.evaluate, "evaluate_on_pool", evaluate_on_pool)
    held_out.before_training(0)
    held_out.after_training(3, tmp_path)
    assert decoded == [None, 4, None, 4]  # the held-out decoding (16 steps) once per point, not again at 16
    at_steps = [(r["step"], r["eval_sampling_steps"], r["eval_accuracy_at_steps"]) for r in logged
                if "eval_sampling_steps" in r]
    assert at_steps == [(0, 4, 0.25), (0, 16, 0.5), (3, 4, 0.25), (3, 16, 0.5)]
