"""Plots a person looks at: honest axes, only informative steps, the base beside the trained policy."""
import json

import numpy as np

from driver.plots import honest_ylim, informative_steps, plot_run


def test_steps_without_uncertainty_are_left_out():
    # step 1: nothing left to decode; 2: no trajectory reached it; 4: decoded with certainty by all (EOS)
    entropy = np.array([[0.5, 0.0, np.nan, 0.2, 1e-4]] * 30 + [[0.4, 0.0, np.nan, np.nan, 0.3]])
    assert informative_steps({"step_entropy": entropy}).tolist() == [0, 3]


def test_an_accuracy_axis_starts_at_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    honest_ylim(ax, [0.160, 0.170])  # a 1-point gap
    assert ax.get_ylim() == (0.0, 0.3)
    honest_ylim(ax, [0.9, 0.97, float("nan")])
    assert ax.get_ylim() == (0.0, 1.0)
    plt.close(fig)


def test_accuracy_vs_steps_shows_the_base_beside_the_trained_policy(tmp_path, monkeypatch):
    import driver.plots as plots

    records = [{"step": 0, "eval_accuracy": 0.1}]
    records += [{"step": s, "eval_sampling_steps": n, "eval_accuracy_at_steps": a}
                for s, n, a in [(0, 4, 0.05), (0, 8, 0.1), (6, 4, 0.2), (6, 8, 0.3)]]
    records += [{"step": 6, "loss": 0.0, "reward": 0.2, "accuracy": 0.2}]
    run = tmp_path / "tiny-x-20260101"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    seen = {}
    real = plots.plot_accuracy_vs_steps
    monkeypatch.setattr(plots, "plot_accuracy_vs_steps",
                        lambda points, out, title="": seen.update(points=points, title=title) or real(points, out, title))
    made = plot_run(run)
    assert seen["points"] == {"base": [(4, 0.05), (8, 0.1)], "trained (step 6)": [(4, 0.2), (8, 0.3)]}
    assert run.name in seen["title"]
    assert {p.name for p in made} == {"reward_accuracy.png", "accuracy_vs_steps.png"}


def test_a_mixture_of_experts_run_plots_its_expert_load(tmp_path):
    records = [{"step": s, "loss": 0.0, "reward": 0.1, "accuracy": 0.1, "expert_load_max": 1.5,
                **{f"expert_share/{e}": v for e, v in enumerate([0.375, 0.125, 0.25, 0.25])}} for s in (1, 2, 3)]
    run = tmp_path / "tiny-moe-20260101"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "expert_load.png" in {p.name for p in plot_run(run)}
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "expert" not in k}) + "\n"
                                               for r in records))
    assert "expert_load.png" not in {p.name for p in plot_run(run)}
