"""The pre-registered async comparison (docs/results/async_design.md) can run as registered: its designs load,
every variant is a valid config, and rl_compare measures where a run's time went."""
import json
from pathlib import Path

import pytest

from benchmarks.rl_compare import load_design, parse, time_shares
from common.config import load_config

DESIGNS = sorted(Path("benchmarks/designs").glob("async_*.json"))


@pytest.mark.parametrize("path", DESIGNS, ids=lambda p: p.stem)
def test_the_registered_designs_load_and_every_variant_is_a_valid_config(path):
    design = load_design(path)
    assert len(design["seeds"]) >= 8 and set(design["methods"]) == set(design["variants"])
    for name in design["methods"]:
        cfg = load_config(design["config"], design["variants"][name])
        assert cfg.queue.max_staleness == (0 if name == "sync" else int(name[5]))
        assert cfg.algorithm.correction == ("decoupled" if name.endswith("decoupled") else "none")
    assert parse(["--design", str(path), "--methods", "async1", "--out", "x"]).methods == ["async1"]
    assert design["lrs"] == [cfg.learner.lr] and design["tuning_seeds"] == []  # one lr: nothing to tune


def test_a_design_with_one_lr_and_no_tuning_seeds_runs_only_its_evaluation_seeds(tmp_path, monkeypatch):
    import driver.evaluate
    import driver.train
    from benchmarks.rl_compare import main
    from tests.test_rl_compare import _fake_train, _no_evaluation

    _no_evaluation(monkeypatch)
    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint",
                        lambda cfg, steps_list, *a, **k: {s: {"accuracy": 0.1} for s in steps_list})
    calls = []
    monkeypatch.setattr(driver.train, "train", _fake_train(calls, lambda lr: 0.2))
    design = tmp_path / "design.json"
    design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": ["sync", "async1"], "lrs": [1e-4],
                                  "tuning_seeds": [], "seeds": [0, 1], "variants": {
                                      "sync": ["queue.max_staleness=0"], "async1": ["queue.max_staleness=1"]}}))
    assert main(["--design", str(design), "--out", str(tmp_path / "out")]) == 0
    assert sorted(calls) == sorted((f"{m}-lr0.0001-s{s}", 1e-4, s) for m in ("sync", "async1") for s in (0, 1))
    assert "Tuning" not in (tmp_path / "out" / "results.md").read_text()


def test_a_variant_may_not_shadow_a_method(tmp_path):
    design = tmp_path / "d.json"
    design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": ["agrpo"], "lrs": [1e-4],
                                  "tuning_seeds": [9], "seeds": [0], "variants": {"agrpo": ["queue.max_staleness=1"]}}))
    with pytest.raises(ValueError, match="shadow"):
        load_design(design)
    with pytest.raises(SystemExit):
        parse(["--methods", "async1", "--out", "x"])  # variants exist only inside a design


def test_time_shares_of_a_run():
    # steps end at t = 10, 20, 30 (20 s of wall after the first): learner busy 4 + 6 s, one worker generating 4 + 3 s;
    # the rollout logged before the first step's end left out
    records = [{"time": 9.0, "event": "rollout", "gen_seconds": 5.0},
               {"time": 10.0, "step_time_s": 3.0, "rollout_workers": 1},
               {"time": 15.0, "event": "rollout", "gen_seconds": 4.0},
               {"time": 20.0, "step_time_s": 4.0, "rollout_workers": 1},
               {"time": 25.0, "event": "rollout", "gen_seconds": 3.0},
               {"time": 30.0, "step_time_s": 6.0, "rollout_workers": 1}]
    assert time_shares(records) == pytest.approx({"train_wall_s": 20.0, "learner_idle": 0.5, "rollout_idle": 0.65})
    assert time_shares(records[:2]) == {}


def test_the_async_simulation_on_cases_worked_by_hand():
    from benchmarks.sim_async import Shape, simulate

    shape = Shape()
    call, learn = shape.call_s(shape.prompts_per_call), shape.learn_s()
    # synchronous, one worker: two calls of 4 groups, then the learner; nobody overlaps
    sync = simulate(shape, workers=1, max_staleness=0)
    assert sync["step_s"] == pytest.approx(2 * call + learn) and sync["lag"] == 0
    # synchronous with 8 workers: the budget of 8 groups admits two calls of 4, so 6 workers never run
    assert simulate(shape, workers=8, max_staleness=0)["rollout_idle"] == pytest.approx(1 - 2 * call / (8 * (call + learn)))
    # one group a call and many workers under a large budget: the learner is the bottleneck, never idle
    fast = simulate(Shape(prompts_per_call=1), workers=64, max_staleness=4)
    assert fast["step_s"] == pytest.approx(learn) and fast["learner_idle"] == pytest.approx(0, abs=1e-9)


NOISE = [-0.02, -0.01, 0.0, 0.01, 0.02, -0.015, 0.015, 0.0]  # one spread for every variant's eight seeds


def _task(tmp_path, task: str, variants: dict[str, tuple[float, float]]) -> dict:
    """A comparison's results.json: each variant's (mean accuracy, mean wall seconds) over eight seeds, from the
    registered async design's variants."""
    design = tmp_path / "design.json"
    design.write_bytes(Path("benchmarks/designs/async_countdown.json").read_bytes())
    runs = [{"method": m, "seed": i, "lr": 1e-4, "phase": "eval", "at_steps": {"16": acc + e},
             "train_wall_s": wall * (1 + e)} for m, (acc, wall) in variants.items() for i, e in enumerate(NOISE)]
    return {"task": task, "design": str(design), "design_sha256": load_design(design)["sha256"],
            "sampling_steps": [4, 8, 16], "runs": runs}


def test_the_default_is_the_fastest_variant_as_accurate_as_sync_on_every_task(tmp_path):
    from benchmarks.async_default import choose, qualification

    both = {"sync": (0.20, 300), "async1": (0.20, 200), "async2": (0.195, 150), "async4": (0.15, 100)}
    tasks = {"countdown": _task(tmp_path, "countdown", both), "sudoku": _task(tmp_path, "sudoku", both)}
    table = qualification(tasks["countdown"])
    assert table["async1"]["qualifies"] and table["async2"]["qualifies"]
    assert table["async4"]["faster"] and not table["async4"]["accurate"]  # 5 points worse, separate: out
    assert choose(tasks)[0] == "async2"
    # async1 within 5% of async2's wall time: the smaller staleness is chosen instead
    close = {**both, "async1": (0.20, 155)}
    assert choose({"countdown": _task(tmp_path, "countdown", close), "sudoku": _task(tmp_path, "sudoku", close)})[0] == "async1"
    # qualifying on one task only is not enough: the default stays synchronous
    slow = {**both, "async1": (0.20, 300), "async2": (0.195, 300)}
    pick, why = choose({"countdown": _task(tmp_path, "countdown", both), "sudoku": _task(tmp_path, "sudoku", slow)})
    assert pick == "sync" and "stays synchronous" in why


def test_a_mean_loss_over_one_point_disqualifies_even_inside_the_interval(tmp_path):
    from benchmarks.async_default import qualification

    wide = _task(tmp_path, "countdown", {"sync": (0.20, 300), "async1": (0.188, 200)})
    for r in wide["runs"]:  # four times the spread: the interval of sync - async1 reaches below 0
        r["at_steps"]["16"] = 0.20 + 4 * (r["at_steps"]["16"] - 0.20) if r["method"] == "sync" else r["at_steps"]["16"]
    q = qualification(wide)["async1"]
    assert q["accuracy"]["diff_low"] < 0 and q["accuracy"]["diff"] > 0.01 and not q["qualifies"]


def test_the_decoupled_correction_is_chosen_only_if_more_accurate_on_every_task(tmp_path):
    from benchmarks.async_default import choose

    better = {"sync": (0.20, 300), "async1": (0.20, 200), "async1_decoupled": (0.205, 201)}
    mixed = {"sync": (0.20, 300), "async1": (0.20, 200), "async1_decoupled": (0.199, 199)}
    assert choose({"a": _task(tmp_path, "a", better), "b": _task(tmp_path, "b", better)})[0] == "async1_decoupled"
    pick, why = choose({"a": _task(tmp_path, "a", better), "b": _task(tmp_path, "b", mixed)})
    assert pick == "async1" and "correction none" in why  # decoupled is the faster on b, but not more accurate


def test_the_report_refuses_results_of_a_changed_design(tmp_path, capsys):
    from benchmarks.async_default import main

    results = _task(tmp_path, "countdown", {"sync": (0.20, 300), "async1": (0.20, 200)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path / "out"), "--out", str(tmp_path / "default.md")]) == 0
    assert "**Default: async1**" in (tmp_path / "default.md").read_text()
    Path(results["design"]).write_text(Path(results["design"]).read_text().replace('"steps": 60', '"steps": 61'))
    assert main([str(tmp_path / "out")]) == 2
    assert "changed since these results were made" in capsys.readouterr().err


def test_the_staleness_summary_of_runs_worked_by_hand_is_kept_for_when_the_run_dirs_are_gone(tmp_path):
    from benchmarks.async_default import report, run_staleness

    # two learner steps of 4 groups: lags (1, 1, 2, 2) then (0, 1, 1, 1); the first step's stale draws have weights
    # with std 0.1 and 25% above the cap, the second's std 0.3 and none above it; a rollout line between them
    steps = [{"policy_lag_mean": 1.5, "groups_lag_1": 2.0, "groups_lag_2": 2.0, "is_weight_std": 0.1,
              "is_truncated_share": 0.25},
             {"event": "rollout", "gen_seconds": 1.0},
             {"policy_lag_mean": 0.75, "groups_lag_0": 1.0, "groups_lag_1": 3.0, "is_weight_std": 0.3,
              "is_truncated_share": 0.0}]
    out = tmp_path / "out"
    results = _task(tmp_path, "countdown", {"sync": (0.20, 300), "async1": (0.20, 200)})
    for r in results["runs"]:
        r["run_dir"] = f"elsewhere/runs/{r['method']}-s{r['seed']}"
        (out / "runs" / f"{r['method']}-s{r['seed']}").mkdir(parents=True)
        rows = steps if r["method"] == "async1" else [{"policy_lag_mean": 0.0, "groups_lag_0": 4.0}]
        (out / "runs" / f"{r['method']}-s{r['seed']}" / "metrics.jsonl").write_text(
            "\n".join(json.dumps(x) for x in rows) + "\n")
    one = run_staleness(out / "runs" / "async1-s0" / "metrics.jsonl")
    assert one == pytest.approx({"lag_mean": 1.125, "lag2_share": 0.25, "weight_std": 0.2, "truncated_share": 0.125})
    row = "| async1 | 1.125 | 25.0% | 0.200 | 12.50% |"
    assert row in report({"countdown": results}, {"countdown": out})
    assert (out / "staleness.json").exists()
    import shutil
    shutil.rmtree(out / "runs")  # as on a fresh clone: the summary comes from staleness.json
    assert row in report({"countdown": results}, {"countdown": out})
    (out / "staleness.json").unlink()
    assert "no staleness summary" in report({"countdown": results}, {"countdown": out})


def test_the_measured_presets_carry_what_the_rule_picked_from_the_committed_results():
    """The default is the pre-registered rule's output on the committed runs, not a hand-set value: the presets the
    comparison measured (and the schema) train with the chosen variant's staleness and correction."""
    from benchmarks.async_default import choose
    from common.config.queue import QueueConfig
    tasks, designs = {}, {}
    for task in ("countdown", "sudoku"):
        results = json.loads(Path(f"docs/results/async_{task}/results.json").read_text())
        assert len(results["runs"]) == 7 * 8  # 7 variants x 8 seeds: the comparison is complete
        tasks[task], designs[task] = results, load_design(Path(f"benchmarks/designs/async_{task}.json"))
    pick, _ = choose(tasks)
    for design in designs.values():
        measured = load_config(design["config"], design["variants"][pick])
        cfg = load_config(design["config"])
        assert (cfg.queue.max_staleness, cfg.algorithm.correction) == (measured.queue.max_staleness,
                                                                       measured.algorithm.correction)
    assert QueueConfig().max_staleness == load_config("tiny_countdown").queue.max_staleness
