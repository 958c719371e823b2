"""PNG plots of a run directory: what a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def honest_ylim(ax, values) -> None:
    """Accuracy axes start at 0 (a 1-point gap never fills the plot) and end at the next 0.1 above the data."""
    top = max([v for v in values if v == v] or [0.0])
    ax.set_ylim(0.0, min(1.0, np.ceil((top + 0.05) * 10) / 10))


def _finish(plt, fig, ax, out: Path, title: str = "") -> Path:
    """Title, grid, legend, save as PNG, free the figure."""
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (the first points average what exists so far)."""
    csum = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (csum[idx] - csum[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def plot_curves(records: list[dict], out: Path, title: str = "") -> Path | None:
    """Training reward/accuracy per step (faint) with their moving average, held-out accuracy at each
    evaluation, and below them the share of groups whose samples all got one reward (no gradient signal)."""
    train = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    if not train and not evals:
        return None
    plt = _plt()
    fig, (ax, low) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    window = max(1, len(train) // 20)
    if train:
        steps = [r["step"] for r in train]
        for key, label in (("reward", "train reward"), ("accuracy", "train accuracy")):
            values = [r[key] for r in train]
            line, = ax.plot(steps, values, alpha=0.25, lw=0.8)
            ax.plot(steps, moving_average(values, window), color=line.get_color(),
                    label=f"{label}" + (f" ({window}-step mean)" if window > 1 else ""))
        if any("no_signal_groups" in r for r in train):
            share = [r.get("no_signal_groups", float("nan")) for r in train]
            low.plot(steps, share, color="gray", alpha=0.3, lw=0.8)
            low.plot(steps, moving_average(share, window), color="black")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color="C2",
                label="held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    low.set_ylim(-0.02, 1.02)
    low.set_ylabel("no-signal\ngroups", fontsize=8)
    low.set_xlabel("learner step")
    low.grid(alpha=0.3)
    return _finish(plt, fig, ax, out, title)


def plot_expert_load(records: list[dict], out: Path, title: str = "") -> Path | None:
    """Share of routed slots per expert at each learner step (mixtures of experts; mean over MoE layers),
    stacked, with the uniform share for reference."""
    train = [r for r in records if "expert_load_max" in r and "step" in r]
    if not train:
        return None
    experts = sorted({k for r in train for k in r if k.startswith("expert_share/")}, key=lambda k: int(k.split("/")[1]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    steps = [r["step"] for r in train]
    ax.stackplot(steps, np.array([[r.get(k, 0.0) for r in train] for k in experts]),
                 labels=[f"expert {k.split('/')[1]}" for k in experts] if len(experts) <= 16 else None)
    for i in range(1, len(experts)):
        ax.axhline(i / len(experts), color="white", lw=0.4, alpha=0.6)  # the balanced boundaries
    ax.set_ylim(0, 1)
    ax.set_xlabel("learner step")
    ax.set_ylabel("share of routed tokens")
    return _finish(plt, fig, ax, out, title)


def load_step_profiles(spill_dir: Path, limit: int = 256) -> dict[str, np.ndarray] | None:
    """Per-step entropy/margin of up to ``limit`` spilled trajectories, with their correctness."""
    from common.spill import recover

    rows = {"step_entropy": [], "step_margin": [], "correct": [], "policy_version": []}
    if not spill_dir.is_dir():
        return None
    for directory in [spill_dir, *sorted(spill_dir.glob("driver-*"))]:  # a resumed run's earlier drivers too
        for rb in recover(directory, "skip", keep_consumed=True).groups:
            for name in rows:
                rows[name].extend(rb.column(name).to_pylist())
    if not rows["correct"]:
        return None
    idx = np.linspace(0, len(rows["correct"]) - 1, min(limit, len(rows["correct"]))).astype(int)
    width = max(len(rows["step_entropy"][i]) for i in idx)
    out = {}
    for name in ("step_entropy", "step_margin"):
        mat = np.full((len(idx), width), np.nan)
        for j, i in enumerate(idx):
            mat[j, : len(rows[name][i])] = rows[name][i]
        out[name] = mat
    out["correct"] = np.array([rows["correct"][i] for i in idx], dtype=bool)
    out["policy_version"] = np.array([rows["policy_version"][i] for i in idx])
    return out


def informative_steps(profiles: dict[str, np.ndarray], min_entropy: float = 0.01, min_share: float = 0.05) -> np.ndarray:
    """Indices of the denoising steps where at least ``min_share`` of the trajectories were still uncertain
    (mean entropy above ``min_entropy`` nats). The rest carry no information: steps no trajectory reached,
    blocks with nothing left to decode, and steps every trajectory decoded with certainty (EOS padding)."""
    uncertain_NT = np.nan_to_num(profiles["step_entropy"]) > min_entropy
    return np.flatnonzero(uncertain_NT.mean(axis=0) >= min_share)


def plot_confusion_zones(profiles: dict[str, np.ndarray], out: Path, title: str = "") -> Path:
    """Heatmaps of per-step entropy and margin across trajectories, failures on top, successes below."""
    plt = _plt()
    order = np.argsort(profiles["correct"], kind="stable")
    n_fail = int((~profiles["correct"]).sum())
    steps = informative_steps(profiles)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, name, cmap, label in ((axes[0], "step_entropy", "magma", "mean entropy of masked positions"),
                                  (axes[1], "step_margin", "viridis", "mean top1-top2 margin")):
        im = ax.imshow(profiles[name][order][:, steps], aspect="auto", interpolation="nearest", cmap=cmap)
        ax.axhline(n_fail - 0.5, color="white", lw=1.5)
        ticks = np.arange(len(steps)) if len(steps) <= 20 else np.linspace(0, len(steps) - 1, 9).astype(int)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel(f"denoising step (the {len(steps)} of {profiles[name].shape[1]} where >= 5% were uncertain)")
        ax.set_title(label)
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0].set_ylabel(f"trajectories (top {n_fail}: failed, below: succeeded)")
    fig.suptitle(title or "zones of confusion")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_accuracy_vs_steps(points: dict[str, list[tuple[int, float]]], out: Path, title: str = "") -> Path:
    """Held-out accuracy against the number of sampling steps, one line per model/method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("held-out accuracy")
    ax.set_xscale("log", base=2)
    honest_ylim(ax, [p[1] for pts in points.values() for p in pts])
    return _finish(plt, fig, ax, out, title)


def plot_staleness(records: list[dict], out: Path, title: str = "") -> Path | None:
    """Policy lag of the groups each learner step trained (mean, max, share stale) and, below, the stale draws'
    importance weights pi_prox/pi_behav (mean +- std) with the share above algorithm.is_weight_cap."""
    train = [r for r in records if "policy_lag_mean" in r and "step" in r]
    if not train:
        return None
    plt = _plt()
    fig, (ax, low) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    steps = np.array([r["step"] for r in train])
    ax.plot(steps, [r["policy_lag_mean"] for r in train], label="mean lag (versions)")
    ax.plot(steps, [r["policy_lag_max"] for r in train], alpha=0.6, label="max lag")
    ax.plot(steps, [r["stale_group_share"] for r in train], color="gray", alpha=0.6, label="share of groups stale")
    ax.set_ylabel("policy lag")
    nan = float("nan")
    mean = np.array([r.get("is_weight_mean", nan) for r in train])
    std = np.array([r.get("is_weight_std", nan) for r in train])
    low.plot(steps, mean, color="C0", label="importance weight, mean")
    low.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2, label="+- std")
    low.plot(steps, [r.get("is_truncated_share", nan) for r in train], color="C3", label="share truncated")
    low.set_xlabel("learner step")
    low.grid(alpha=0.3)
    low.legend(fontsize=8)
    return _finish(plt, fig, ax, out, title)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every plot a run directory supports, written to ``<run_dir>/plots``."""
    from common.metrics import read_metrics

    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    if (run_dir / "metrics.jsonl").is_file():
        records = read_metrics(run_dir / "metrics.jsonl")
        if (p := plot_curves(records, plots / "reward_accuracy.png", f"{run_dir.name}\nreward and accuracy")):
            made.append(p)
        if (p := plot_staleness(records, plots / "staleness.png", f"{run_dir.name}\nstaleness")):
            made.append(p)
        if (p := plot_expert_load(records, plots / "expert_load.png", f"{run_dir.name}\nexpert load per step")):
            made.append(p)
        at_steps = [r for r in records if "eval_sampling_steps" in r]
        if at_steps:  # the base (step 0) beside the trained policy (the last step evaluated)
            last = max(r["step"] for r in at_steps)
            points = {"base": [(r["eval_sampling_steps"], r["eval_accuracy_at_steps"]) for r in at_steps if r["step"] == 0]}
            if last > 0:
                points[f"trained (step {last})"] = [(r["eval_sampling_steps"], r["eval_accuracy_at_steps"])
                                                    for r in at_steps if r["step"] == last]
            made.append(plot_accuracy_vs_steps({k: v for k, v in points.items() if v}, plots / "accuracy_vs_steps.png",
                                               f"{run_dir.name}\nheld-out accuracy vs sampling steps"))
    profiles = load_step_profiles(run_dir / "trajectories")
    if profiles is not None:
        made.append(plot_confusion_zones(profiles, plots / "confusion_zones.png", f"{run_dir.name}: zones of confusion"))
    return made
