"""benchmarks.rl_compare keeps every run when invocations of one setup write into the same --out at once."""
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from benchmarks.compare_plots import mean_ci95
from benchmarks.rl_compare import METHODS, load_design, record_run
from common.config import load_config


def _header(seeds):
    return {"config": "tiny_countdown", "overrides": [], "steps": 2, "seeds": seeds, "runs": []}


def _write_runs(out, method, n):
    results = _header(list(range(n)))
    for seed in range(n):
        results = record_run(out, results, {"method": method, "seed": seed})


def test_concurrent_invocations_lose_no_run(tmp_path):
    procs = [mp.get_context("fork").Process(target=_write_runs, args=(tmp_path, m, 20)) for m in ("agrpo", "atpo")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in ("agrpo", "atpo") for s in range(20))


def test_a_redone_run_replaces_the_old_one_and_another_setup_is_refused(tmp_path):
    record_run(tmp_path, _header([0]), {"method": "agrpo", "seed": 0, "v": 1})
    results = record_run(tmp_path, _header([0]), {"method": "agrpo", "seed": 0, "v": 2})
    assert [r["v"] for r in results["runs"]] == [2]
    other = dict(_header([0]), steps=5)
    with pytest.raises(ValueError, match="another setup"):
        record_run(tmp_path, other, {"method": "atpo", "seed": 0})
    assert [r["v"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == [2]


def _no_evaluation(monkeypatch):
    import ray

    import driver.evaluate

    def evaluate(cfg, steps_list, *a, **k):
        raise AssertionError("the base was evaluated: the setup should have been refused first")

    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint", evaluate)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)


def test_report_only_or_another_setup_into_the_same_out_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from benchmarks.rl_compare import main

    _no_evaluation(monkeypatch)
    written = json.dumps(dict(_header([0]), steps=30, runs=[{"method": "agrpo", "seed": 0}]))
    (tmp_path / "results.json").write_text(written)
    for argv in (["--report-only"], ["--steps", "30", "--set", "learner.lr=3e-5"], ["--steps", "30", "--config", "tiny_sudoku"]):
        assert main(argv + ["--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "another setup" in err and "--steps 30" in err and len(err.splitlines()) == 1
    assert (tmp_path / "results.json").read_text() == written


def test_a_failed_training_run_stops_the_comparison_under_python_O_too(tmp_path, monkeypatch, capsys):
    import driver.evaluate
    import driver.train
    from benchmarks.rl_compare import main

    _no_evaluation(monkeypatch)
    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint",
                        lambda cfg, steps_list, *a, **k: {s: {"accuracy": 0.5} for s in steps_list})
    calls = []
    monkeypatch.setattr(driver.train, "train", lambda cfg: calls.append(cfg.run.name) or 1)
    assert main(["--steps", "2", "--methods", "agrpo", "atpo", "--seeds", "0", "--out", str(tmp_path)]) == 1
    assert calls == ["agrpo-s0"] and "agrpo run of seed 0 failed" in capsys.readouterr().err


def test_a_run_redone_by_another_invocation_is_not_overwritten_with_a_stale_copy(tmp_path):
    mine = record_run(tmp_path, _header([0]), {"method": "agrpo", "seed": 0, "v": 1})
    record_run(tmp_path, _header([0]), {"method": "agrpo", "seed": 0, "v": 2})  # another invocation redoes it
    mine = record_run(tmp_path, mine, {"method": "atpo", "seed": 0})
    on_disk = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {(r["method"], r.get("v")) for r in on_disk} == {("agrpo", 2), ("atpo", None)} == {
        (r["method"], r.get("v")) for r in mine["runs"]}


def test_mean_ci95_is_the_student_t_interval():
    mean, half = mean_ci95([0.1, 0.2, 0.3])
    assert abs(mean - 0.2) < 1e-12 and abs(half - 4.3027 * 0.1 / 3 ** 0.5) < 1e-5


def test_comparison_plots_are_written_from_a_results_file(tmp_path):
    from benchmarks.compare_plots import plot_all

    runs = [{"method": m, "seed": s, "curve": [(0, 0.1), (10, 0.15 + 0.01 * s)],
             "at_steps": {"4": 0.1, "8": 0.12, "16": 0.15 + 0.01 * s}} for m in ("agrpo", "diffu_grpo") for s in range(3)]
    results = {"task": "countdown", "budget_trajectories": 2560, "eval_items": 256, "sampling_steps": [4, 8, 16],
               "base": {"4": 0.07, "8": 0.1, "16": 0.11}, "runs": runs}
    for path in plot_all(results, tmp_path):
        assert path.stat().st_size > 10_000


def test_separation_tells_apart_distinct_and_overlapping_seeds():
    from benchmarks.compare_plots import separation

    far = separation([0.30, 0.31, 0.29, 0.30, 0.32], [0.20, 0.21, 0.19, 0.22, 0.20])
    assert not far["overlap"] and far["p"] < 1e-4 and far["diff_low"] > 0.05 and far["seeds_needed"] <= 5
    near = separation([0.197, 0.211, 0.172, 0.207, 0.191], [0.184, 0.156, 0.188, 0.203, 0.188])
    assert near["overlap"] and near["diff_low"] < 0 < near["diff_high"] and near["seeds_needed"] > 5


def _fake_train(calls, accuracy_of_lr):
    """A stand-in for driver.train.train: writes the run directory a real run would, its held-out accuracy a
    function of the run's lr (and nothing else)."""
    from pathlib import Path

    from common.metrics import MetricsLog

    def train(cfg):
        calls.append((cfg.run.name, cfg.learner.lr, cfg.run.seed))
        run_dir = Path(cfg.run.root) / f"{cfg.run.name}-20261206-000000"
        acc = accuracy_of_lr(cfg.learner.lr)
        m = MetricsLog(run_dir / "metrics.jsonl")
        m.log({"step": 1, "loss": 0.0, "step_time_s": 0.5, "prompts": []})
        m.log({"step": cfg.run.total_steps, "eval_accuracy": acc})
        for s in cfg.run.eval_sampling_steps:
            m.log({"step": cfg.run.total_steps, "eval_sampling_steps": s, "eval_accuracy_at_steps": acc})
        return 0
    return train


def test_a_design_tunes_on_its_own_seeds_then_runs_the_chosen_lr_on_the_registered_ones(tmp_path, monkeypatch,
                                                                                         capsys):
    import driver.evaluate
    import driver.train
    from benchmarks.rl_compare import main

    _no_evaluation(monkeypatch)
    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint",
                        lambda cfg, steps_list, *a, **k: {s: {"accuracy": 0.1} for s in steps_list})
    calls = []
    monkeypatch.setattr(driver.train, "train", _fake_train(calls, lambda lr: {1e-5: 0.2, 1e-4: 0.3, 1e-3: 0.1}[lr]))
    design = tmp_path / "design.json"
    design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": ["agrpo", "diffu_grpo"],
                                  "lrs": [1e-5, 1e-4, 1e-3], "tuning_seeds": [100, 101], "seeds": [0, 1, 2]}))
    out = tmp_path / "out"
    assert main(["--design", str(design), "--out", str(out)]) == 0
    tuned = [(lr, seed) for name, lr, seed in calls if seed >= 100]
    assert sorted(tuned) == sorted([(lr, s) for lr in (1e-5, 1e-4, 1e-3) for s in (100, 101)] * 2)
    evaluated = [(lr, seed) for name, lr, seed in calls if seed < 100]
    assert evaluated == [(1e-4, s) for s in (0, 1, 2)] * 2  # the best tuning lr, on the registered seeds only
    # Each run says where the comparison stands: 2 methods x (3 lrs x 2 tuning seeds + 3 seeds) = 18 runs.
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rl_compare: ")]
    assert progress[0] == "rl_compare: agrpo-lr1e-05-s100 (tune) next; 0 of 18 runs recorded"
    assert progress[-1].startswith("rl_compare: diffu_grpo-lr0.0001-s2 (eval) next; 17 of 18 runs recorded, ")
    assert len(progress) == 18 and progress[-1].endswith("h of runs left")
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text().split("Tuning")[0]
    assert "agrpo (3 seeds, lr 0.0001)" in table and "30.0" in table and "20.0" not in table
    # Running it again adds nothing (every run is recorded); a changed design is refused in one line.
    calls.clear()
    assert main(["--design", str(design), "--out", str(out)]) == 0 and calls == []
    assert main(["--design", str(design), "--out", str(out), "--report-only"]) == 0 and calls == []
    assert json.loads((out / "results.json").read_text())["chosen_lr"] == {"agrpo": 1e-4, "diffu_grpo": 1e-4}
    design.write_text(json.dumps({**json.loads(design.read_text()), "seeds": [0, 1, 2, 3]}))
    assert main(["--design", str(design), "--out", str(out)]) == 2
    assert json.loads((out / "results.json").read_text()) == results


def test_status_says_how_far_a_design_is_without_its_outcomes(tmp_path, capsys):
    import subprocess
    import sys

    from benchmarks.rl_compare import main

    design = tmp_path / "design.json"
    design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": ["agrpo", "wd1"],
                                  "lrs": [1e-5, 1e-4], "tuning_seeds": [100], "seeds": [0, 1, 2]}))
    out = tmp_path / "out"
    status = ["--design", str(design), "--out", str(out), "--status"]
    assert main(status) == 0  # nothing recorded yet: a design about to start
    assert capsys.readouterr().out.splitlines()[:3] == ["0 of 10 runs recorded", "  agrpo: tuning 0 of 2, evaluation 0 of 3",
                                                        "  wd1: tuning 0 of 2, evaluation 0 of 3"]
    runs = [{"method": "agrpo", "seed": s, "lr": lr, "phase": phase, "minutes": 6.0, "curve": [[2, 0.4321]]}
            for s, lr, phase in ((100, 1e-5, "tune"), (100, 1e-4, "tune"), (0, 1e-4, "eval"))]
    (out / "claims").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"runs": runs}))
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    (out / "claims" / "agrpo-lr0.0001-s1-eval").write_text(str(other.pid))  # a live invocation trains it
    (out / "claims" / "wd1-lr1e-05-s100-tune").write_text("")  # its holder crashed while writing it
    try:
        assert main(status) == 0
    finally:
        other.communicate(b"")
    printed = capsys.readouterr().out
    # 2 methods x (2 lrs x 1 tuning seed + 3 seeds) = 10 planned; 7 left at 6 minutes a run
    assert printed.splitlines() == ["3 of 10 runs recorded, 6.0 min a run: about 0.7 h of runs left",
                                    "  agrpo: tuning 2 of 2, evaluation 1 of 3", "  wd1: tuning 0 of 2, evaluation 0 of 3",
                                    "  running now: 1 run(s) held by live invocations"]
    assert "43.2" not in printed and "0.0001" not in printed and "1e-" not in printed  # no accuracy, no lr


def test_a_design_refuses_overlapping_seeds_and_options_it_fixes(tmp_path):
    from benchmarks.rl_compare import parse

    design = tmp_path / "design.json"
    base = {"config": "tiny_countdown", "steps": 2, "methods": ["agrpo"], "lrs": [1e-4], "tuning_seeds": [1], "seeds": [0, 1]}
    design.write_text(json.dumps(base))
    with pytest.raises(SystemExit):
        parse(["--design", str(design), "--out", "x"])  # seed 1 both tuning and evaluation
    design.write_text(json.dumps({**base, "seeds": [0]}))
    assert parse(["--design", str(design), "--out", "x"]).lrs == [1e-4]
    for extra in (["--seeds", "0", "5"], ["--steps", "3"], ["--set", "learner.lr=1"]):
        with pytest.raises(SystemExit):
            parse(["--design", str(design), "--out", "x", *extra])


@pytest.mark.parametrize("path", sorted(Path("benchmarks/designs").glob("*.json")), ids=lambda p: p.stem)
def test_every_registered_design_can_run_as_registered(path):
    """A committed design loads (no variant shadows a method, seeds apart) and each of its methods, with the
    design's overrides and every lr it tries, is a valid config of its preset: a registered comparison cannot
    fail at its first run."""
    design = load_design(path)
    for method in design["methods"]:
        for lr in design["lrs"]:
            load_config(design["config"], {**METHODS, **design["variants"]}[method] + design["overrides"]
                        + [f"learner.lr={lr}"])


def test_a_claim_is_held_by_a_live_process_and_taken_over_from_a_dead_one(tmp_path):
    import subprocess
    import sys

    from benchmarks.rl_compare import take_claim

    claim = tmp_path / "claims" / "agrpo-lr0.0001-s100-tune"
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    claim.parent.mkdir()
    claim.write_text(str(other.pid))
    assert not take_claim(claim)  # another invocation is training it
    other.communicate(b"")  # ... and dies without recording it
    assert take_claim(claim) and claim.read_text() == str(os.getpid())
    assert take_claim(claim)  # this invocation's own claim
    claim.write_text("")  # a holder that crashed while writing its claim
    assert take_claim(claim) and claim.read_text() == str(os.getpid())


def test_invocations_sharing_a_design_make_each_run_once(tmp_path, monkeypatch):
    """A run another live invocation holds is not trained here; the evaluation runs wait for its tuning run to be
    recorded and then take the lr it helped choose."""
    import subprocess
    import sys
    import time

    import driver.evaluate
    import driver.train
    from benchmarks.rl_compare import main

    _no_evaluation(monkeypatch)
    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint",
                        lambda cfg, steps_list, *a, **k: {s: {"accuracy": 0.1} for s in steps_list})
    calls = []
    monkeypatch.setattr(driver.train, "train", _fake_train(calls, lambda lr: {1e-5: 0.2, 1e-4: 0.3}[lr]))
    design = tmp_path / "design.json"
    design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": ["agrpo"], "lrs": [1e-5, 1e-4],
                                  "tuning_seeds": [100], "seeds": [0, 1]}))
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    (out / "claims").mkdir(parents=True)
    (out / "claims" / "agrpo-lr0.0001-s100-tune").write_text(str(other.pid))
    waits = []

    def other_finishes(seconds):  # while this invocation waits, the other records its run and exits
        waits.append(seconds)
        results = json.loads((out / "results.json").read_text())
        record_run(out, results, {"method": "agrpo", "seed": 100, "lr": 1e-4, "phase": "tune", "curve": [(2, 0.3)]})
        other.communicate(b"")
        (out / "claims" / "agrpo-lr0.0001-s100-tune").unlink()

    monkeypatch.setattr(time, "sleep", other_finishes)
    assert main(["--design", str(design), "--out", str(out)]) == 0
    assert len(waits) == 1
    assert [(lr, seed) for _, lr, seed in calls] == [(1e-5, 100), (1e-4, 0), (1e-4, 1)]
    assert not list((out / "claims").glob("agrpo*"))


def _evaluated(methods, seeds, base16=0.11, tune=()):
    runs = [{"method": m, "seed": s, "lr": 1e-4, "phase": "eval", "minutes": 1.0, "learner_s_per_step": 0.5,
             "curve": [(0, base16), (20, 0.1 + 0.01 * s)], "at_steps": {"4": 0.1, "8": 0.1, "16": 0.1 + 0.01 * s}}
            for m in methods for s in seeds]
    runs += [{"method": m, "seed": 100, "lr": 1e-4, "phase": "tune", "curve": [(20, 0.5)], "at_steps": {}} for m in tune]
    return {"task": "countdown", "config": "tiny_countdown", "overrides": [], "steps": 20, "budget_trajectories": 2560,
            "eval_items": 256, "sampling_steps": [4, 8, 16], "seeds": list(seeds),
            "base": {"4": 0.07, "8": 0.1, "16": base16}, "runs": runs}


def test_join_puts_the_evaluation_runs_of_comparisons_of_one_setup_into_one_table(tmp_path, capsys):
    from benchmarks.rl_compare import main

    for name, part in (("a", _evaluated(["agrpo", "atpo"], range(3), tune=["agrpo"])), ("b", _evaluated(["bgpo"], range(3))),
                       ("c", _evaluated(["bgpo2"], range(3), base16=0.2)), ("d", _evaluated(["atpo"], range(3)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    assert main(["--join", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    joined = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert sorted({r["method"] for r in joined["runs"]}) == ["agrpo", "atpo", "bgpo"]
    assert all(r["phase"] == "eval" for r in joined["runs"]) and len(joined["runs"]) == 9
    report = (tmp_path / "ab" / "results.md").read_text()
    assert "| bgpo (3 seeds, lr 0.0001) |" in report and str(tmp_path / "b") in report
    assert (tmp_path / "ab" / "final_accuracy.png").is_file()
    capsys.readouterr()
    assert main(["--join", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has base" in err
    # A part whose base row came from another decoding than its runs joins when the runs start at the table's base.
    other = _evaluated(["bgpo3"], range(3), base16=0.16)
    for run in other["runs"]:
        run["curve"][0] = (0, 0.11)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps(other))
    assert main(["--join", str(tmp_path / "a"), str(tmp_path / "e"), "--out", str(tmp_path / "ae")]) == 0
    assert "its base row (7.0, 10.0, 16.0) was decoded otherwise" in (tmp_path / "ae" / "results.md").read_text()
    assert main(["--join", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "ad")]) == 2
    assert "method atpo is in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--join", str(tmp_path / "a"), "--methods", "agrpo", "--out", str(tmp_path / "x")])


def test_a_design_whose_methods_all_decode_one_way_evaluates_its_base_that_way(tmp_path, monkeypatch):
    """BGPO's Countdown design rolls out and evaluates in random order through its one variant: its base row must
    be decoded so too, not by the preset's decoding (its first report had a top_prob base above random runs)."""
    import driver.evaluate
    import driver.train
    from benchmarks.rl_compare import main

    _no_evaluation(monkeypatch)
    decoded = []
    monkeypatch.setattr(driver.evaluate, "evaluate_checkpoint", lambda cfg, steps_list, *a, **k: decoded.append(
        cfg.sampler.remasking) or {s: {"accuracy": 0.1} for s in steps_list})
    monkeypatch.setattr(driver.train, "train", _fake_train([], lambda lr: 0.2))
    for name, variants, expected in (("one", {"bgpo_random": ["algorithm={name: bgpo}", "sampler.remasking=random"]}, "random"),
                                     ("two", {"a": ["sampler.remasking=random"], "b": []}, "top_prob")):
        design = tmp_path / f"{name}.json"
        design.write_text(json.dumps({"config": "tiny_countdown", "steps": 2, "methods": sorted(variants), "lrs": [1e-4],
                                      "tuning_seeds": [], "seeds": [0], "variants": variants}))
        decoded.clear()
        # a subset of the design's methods evaluates the base of the whole design
        assert main(["--design", str(design), "--methods", sorted(variants)[0], "--out", str(tmp_path / name)]) == 0
        assert decoded == [expected], name
