"""What exactness costs: per-sample gradient variance of AGRPO scoring every draw of a step (``draws=all``,
exact under low-confidence remasking) vs the committed tokens only (``draws=committed``, biased there),
on the tiny presets' own base checkpoints, rollouts and rewards. Also prints the bias of committed-only
scoring, by exact enumeration (tests/test_loss_unbiased.py's tiny 6-token model).

    python -m benchmarks.bench_estimator_variance --out benchmarks/results/estimator_variance.md [--prompts 16]

Per preset: ``--prompts`` training prompts x the preset's group size, sampled with the preset's sampler;
rewards and group advantages as in training. For each estimator, the gradient of each sample's share of
the loss (the real ``loss.backward`` on a one-row micro-batch, ``total_samples=1``) is taken at every
eligible step (k = T: the draws' variance alone) and with the preset's k_steps (stratified: what a
training step sees). Reported: tr Cov over samples of the per-sample gradient (its variance, summed over
parameters), the squared norm of the mean, and the cosine between the two estimators' mean gradients.

    python -m benchmarks.bench_estimator_variance --estimators --prompts 16 --out benchmarks/results/estimator_variance_methods.md

``--estimators``: the same moments for every method of issue 26's pre-registered designs
(benchmarks/designs/estimators_*.json), each on its preset as shipped, with their ratio tr Cov / |mean|^2, the
cosine with AGRPO's mean gradient on the same rollouts and the seconds of backward per sample.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

PRESETS = ("tiny_countdown", "tiny_sudoku")


def per_sample_moments(model, loss, traj, seed: int, ref_model=None) -> dict:
    """Sum of per-sample gradients, of their squared norms, their count, and the seconds ``loss.backward`` took."""
    import torch

    from learner.losses import select_rows

    batch = loss.prepare(traj, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    sq, n, seconds = 0.0, len(batch), 0.0
    for i in range(n):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss.backward(model, select_rows(batch, torch.tensor([i])), total_samples=1, ref_model=ref_model)
        seconds += time.perf_counter() - t0
        g = [p.grad.double() if p.grad is not None else torch.zeros_like(t) for p, t in zip(params, total)]
        sq += float(sum((x * x).sum() for x in g))
        for t, x in zip(total, g):
            t += x
    model.zero_grad(set_to_none=True)
    return {"sum": total, "sq": sq, "n": n, "seconds": seconds}


def summarise(m: dict) -> dict:
    n = m["n"]
    mean_sq = float(sum(((t / n) ** 2).sum() for t in m["sum"]))
    var = (m["sq"] / n - mean_sq) * n / (n - 1)  # unbiased tr Cov of the per-sample gradient
    return {"var": var, "mean_sq": mean_sq}


def cosine(a: dict, b: dict) -> float:
    dot = float(sum((x * y).sum() for x, y in zip(a["sum"], b["sum"])))
    na = float(sum((x * x).sum() for x in a["sum"])) ** 0.5
    nb = float(sum((y * y).sum() for y in b["sum"])) ** 0.5
    return dot / max(na * nb, 1e-300)


def scored_rollouts(gen, items: list, group_size: int, sampler_cfg, seed: int):
    """``group_size`` samples of each item decoded with ``sampler_cfg``, their rewards and groups filled as the
    rollout actor fills them."""
    import torch

    rows = [item for item in items for _ in range(group_size)]
    traj = gen.generate(gen.encode_prompts(rows), seed=seed, sampler_cfg=sampler_cfg)
    _, rewards = gen.score(traj, rows)
    traj.rewards_B = torch.tensor([r.total for r in rewards], dtype=torch.float32)
    traj.group_B = torch.arange(len(rows)) // group_size
    return traj


def run_preset(name: str, prompts: int, seed: int) -> list[dict]:
    import itertools

    from common.config import AgrpoConfig
    from common.config.loader import load_config
    from learner.losses import build_loss
    from rollout.actor import Generator

    # The setting the committed table was measured in (the presets have since moved to random/margin
    # remasking and G=16, where committed-only is already exact).
    cfg = load_config(name, ["sampler.remasking=low_confidence", "rollout.group_size=8"])
    gen = Generator(cfg.model, cfg.sampler, cfg.task, device="cpu")
    items = list(itertools.islice(gen.task.train_items(seed), prompts))
    traj = scored_rollouts(gen, items, cfg.rollout.group_size, cfg.sampler, seed)
    model = gen.model.float().requires_grad_(True).train()
    tok = gen.tokenizer
    T = cfg.sampler.steps
    out = []
    for k_label, k in (("all steps", T), (f"k={cfg.algorithm.k_steps}", cfg.algorithm.k_steps)):
        moments = {}
        for draws in ("all", "committed", "rao_blackwell"):
            algo = AgrpoConfig(**{**cfg.algorithm.model_dump(), "name": "agrpo", "k_steps": k, "draws": draws})
            loss = build_loss(algo, mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id)
            moments[draws] = per_sample_moments(model, loss, traj, seed)
        s_all, s_com = summarise(moments["all"]), summarise(moments["committed"])
        s_rb = summarise(moments["rao_blackwell"])
        out.append({
            "preset": name, "steps": k_label, "samples": len(traj), "mean_reward": float(traj.rewards_B.mean()),
            "var_all": s_all["var"], "var_committed": s_com["var"], "var_rb": s_rb["var"],
            "cos_rb": cosine(moments["all"], moments["rao_blackwell"]), "mean_sq_all": s_all["mean_sq"],
            "mean_sq_committed": s_com["mean_sq"], "cos": cosine(moments["all"], moments["committed"]),
            "discards_per_sample": float((traj.discard_ids_BGS >= 0).sum()) / len(traj),
        })
    return out


DESIGNS = tuple(Path(__file__).parent / "designs" / f"estimators_{task}.json" for task in ("countdown", "sudoku"))


def estimator_rows(design: dict, prompts: int, seed: int) -> list[dict]:
    """Per-sample gradient moments of every method of a pre-registered design (``rl_compare.load_design``) on its
    preset as shipped: each method's config and loss as ``rl_compare`` runs it, on rollouts decoded the method's
    way (one batch per distinct sampler: justgrpo's sequential decoding gets its own), the first inner epoch,
    the frozen initial model as the reference policy."""
    import copy
    import itertools

    from benchmarks.rl_compare import METHODS
    from common.config import load_config
    from learner.losses import build_loss
    from rollout.actor import Generator

    cfgs = {m: load_config(design["config"], design["overrides"] + METHODS[m]) for m in design["methods"]}
    base = load_config(design["config"], design["overrides"])
    gen = Generator(base.model, base.sampler, base.task, device="cpu")
    items = list(itertools.islice(gen.task.train_items(seed), prompts))
    batches = {}  # sampler config -> its scored rollouts
    for cfg in cfgs.values():
        assert cfg.rollout == base.rollout and cfg.model == base.model, "a method changed more than its sampler"
        key = cfg.sampler.model_dump_json()
        if key not in batches:
            batches[key] = scored_rollouts(gen, items, base.rollout.group_size, cfg.sampler, seed)
    model = gen.model.float().requires_grad_(True).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    tok = gen.tokenizer
    moments, out = {}, []
    for m, cfg in cfgs.items():
        key = cfg.sampler.model_dump_json()
        loss = build_loss(cfg.algorithm, mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id)
        moments[m] = per_sample_moments(model, loss, batches[key], seed, ref_model=ref)
        s = summarise(moments[m])
        shared = key == base.sampler.model_dump_json()
        out.append({
            "preset": design["config"], "method": m, "remasking": cfg.sampler.remasking,
            "rollouts": "shared" if shared else "own", "samples": moments[m]["n"],
            "mean_reward": float(batches[key].rewards_B.mean()), **s,
            "cos": cosine(moments[m], moments["agrpo"]) if shared and "agrpo" in moments else None,
            "seconds": moments[m]["seconds"] / moments[m]["n"],
        })
    return out


def estimator_table(prompts: int, seed: int) -> list[str]:
    """The markdown of ``--estimators``: one row per preset and method of the pre-registered designs."""
    from benchmarks.rl_compare import load_design

    lines = ["| preset | method | decoding (rollouts) | samples | mean reward | tr Cov | \\|mean\\|^2 | tr Cov / \\|mean\\|^2 "
             "| \\|mean\\|^2 - tr Cov / n | cos vs agrpo | backward s / sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in DESIGNS:
        for r in estimator_rows(load_design(path), prompts, seed):
            cos = "n/a (own rollouts)" if r["cos"] is None else f"{r['cos']:.3f}"
            ratio = r["var"] / r["mean_sq"] if r["mean_sq"] else float("nan")
            lines.append(f"| {r['preset']} | {r['method']} | {r['remasking']} ({r['rollouts']}) | {r['samples']} | "
                         f"{r['mean_reward']:.3f} | {r['var']:.4g} | {r['mean_sq']:.4g} | {ratio:.4g} | "
                         f"{r['mean_sq'] - r['var'] / r['samples']:.3g} | {cos} | {r['seconds']:.4f} |")
    return lines


def enumeration_rows() -> list[dict]:
    """Relative error of each estimator's expectation vs exact grad E[R] (tests/test_loss_unbiased.py)."""
    from tests.test_loss_unbiased import CASES, _rel, _remasking, _tiny, exact_and_estimated

    model = _tiny()
    rows = []
    for rule, G, steps, temperature, threshold, top_k in CASES:
        remasking = _remasking(rule)
        label = {"threshold": f"threshold {threshold}", "top_prob_threshold": f"top_prob, threshold {threshold}"}.get(
            rule, rule) + ("" if top_k is None else f", top-k {top_k}")
        row = {"rule": label, "G": G, "steps": steps, "T": temperature}
        for draws in ("all", "committed"):
            exact, est, leaves = exact_and_estimated(model, G, steps, remasking, temperature, threshold, draws, top_k)
            row[draws], row["trajectories"] = _rel(est, exact), len(leaves)
        rows.append(row)
    # The same model without the x4 head: flatter distributions, so the commit rule matters less.
    flat = _tiny(scale=1.0)
    row = {"rule": "low_confidence, head x1", "G": 2, "steps": 2, "T": 1.0}
    for draws in ("all", "committed"):
        exact, est, leaves = exact_and_estimated(flat, 2, 2, "low_confidence", 1.0, None, draws)
        row[draws], row["trajectories"] = _rel(est, exact), len(leaves)
    rows.append(row)
    return rows


def rao_blackwell_rows() -> list[dict]:
    """A variance reduction for the discarded draws, checked by enumeration only (the learner does not have it).

    Under low-confidence remasking the future depends on a step's draws only through what it committed, so
    each discarded position k may contribute grad log p~_k(B_k) instead of grad log p~_k(x_k), with B_k the
    tokens that would have left k uncommitted given the committed draws (confidence below the n-th committed
    one; ties by position). That is the score of a coarser action, so still exact, and a conditional
    expectation of the all-draws score term, so no noisier. Reported: relative error of E[R * score] against
    grad E[R], and tr Cov of R * score, for all draws and for this variant.
    """
    import itertools

    import torch

    from rollout.sampler import transfer_schedule
    from tests.test_loss_unbiased import DRAWABLE, MASK, PROMPT, _reward, _tiny, flat_grad

    rows = []
    for G, steps, temperature, scale in ((2, 2, 1.0, 4.0), (3, 2, 0.7, 4.0), (2, 2, 1.0, 1.0)):
        model = _tiny(scale=scale)
        schedule, cache, leaves = transfer_schedule(G, steps), {}, []

        def dists(comp):
            key = tuple(comp)
            if key not in cache:
                logits = model(torch.tensor([PROMPT + list(comp)])).logits[0, len(PROMPT):].float()
                logits = logits.index_fill(1, torch.tensor([MASK]), float("-inf"))
                cache[key] = (torch.log_softmax(logits / temperature, -1), torch.softmax(logits, -1).detach())
            return cache[key]

        def walk(t, comp, logprob, terms_all, terms_rb):
            masked = [j for j in range(G) if comp[j] == MASK]
            if not masked:
                leaves.append((logprob, terms_all, terms_rb, _reward(comp, G)))
                return
            logp, conf = dists(comp)
            for draw in itertools.product(DRAWABLE, repeat=len(masked)):
                y = dict(zip(masked, draw))
                chosen = sorted(masked, key=lambda j: -float(conf[j, y[j]]))[:schedule[t]]
                last = chosen[-1]
                s_n = float(conf[last, y[last]])
                t_all = [logp[j, y[j]] for j in masked]
                t_rb = [logp[j, y[j]] for j in chosen]
                for k in (k for k in masked if k not in chosen):
                    keep = [v for v in DRAWABLE if float(conf[k, v]) < s_n or (float(conf[k, v]) == s_n and k > last)]
                    t_rb.append(torch.logsumexp(logp[k, keep], 0))
                new = [y[j] if j in chosen else c for j, c in enumerate(comp)]
                walk(t + 1, new, logprob + sum(t_all), terms_all + t_all, terms_rb + t_rb)

        walk(0, [MASK] * G, torch.zeros(()), [], [])
        p_N = torch.stack([leaf[0] for leaf in leaves]).double().exp()
        r_N = torch.tensor([leaf[3] for leaf in leaves], dtype=torch.float64)
        model.zero_grad()
        (p_N * r_N).sum().backward(retain_graph=True)
        exact = flat_grad(model).double().clone()
        row = {"G": G, "steps": steps, "T": temperature, "head": f"x{scale:g}", "trajectories": len(leaves)}
        for name, idx in (("all", 1), ("rb", 2)):
            mean, second = torch.zeros_like(exact), 0.0
            for leaf, p, r in zip(leaves, p_N.tolist(), r_N.tolist()):
                model.zero_grad()
                torch.stack(leaf[idx]).sum().backward(retain_graph=True)
                g = flat_grad(model).double() * r
                mean += p * g
                second += p * float(g @ g)
            row[f"err_{name}"] = float((mean - exact).norm() / exact.norm())
            row[f"var_{name}"] = second - float(mean @ mean)
        rows.append(row)
    return rows


READING = (
    "tr Cov = the per-sample gradient's variance summed over parameters (samples treated as independent, as the "
    "learner's batch mean treats them); |mean|^2 = squared norm of the batch-mean gradient. Their ratio is a "
    "noise-to-signal ratio that does not depend on the estimator's scale (a loss multiplied by c has both "
    "multiplied by c^2), so it compares estimators whose scales differ: the batch-mean gradient of n samples "
    "has relative error sqrt(ratio / n), so a lower ratio needs proportionally fewer samples for the same "
    "gradient precision. |mean|^2 is itself measured with noise: it overstates the true squared norm by tr Cov / "
    "n on average, so the next column (|mean|^2 - tr Cov / n, an unbiased estimate of it) near or below 0 means "
    "this batch does not resolve the mean direction (the ratio is then about n: a lower bound). A low ratio is "
    "not a good estimator by itself: a biased surrogate can have low variance and still point elsewhere than the "
    "policy gradient, hence the cosine of each method's mean gradient with AGRPO's (the exact estimator under "
    "these presets' decoding) on the same rollouts; the cosine of two noisy means is pulled towards 0 by the "
    "noise of both, so read it with the previous column. justgrpo decodes its own rollouts left to right "
    "(`sampler.remasking=sequential`, one token a step), so it has no AGRPO mean to compare with. Seconds: "
    "wall time of `loss.backward` per one-row micro-batch (forwards and backwards, first-visit old-value and "
    "reference passes included), one thread, on a shared busy machine: compare within a preset only."
)


def command() -> str:
    """This process's command line, with its niceness when it runs below normal priority."""
    nice = os.nice(0)
    return (f"nice -n {nice} " if nice else "") + " ".join(["python -m benchmarks.bench_estimator_variance", *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name where Linux tells it (``/proc/cpuinfo``), else the architecture's."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    return names[0] if names else f"{platform.machine()} CPU"


def estimators_report(prompts: int, seed: int) -> list[str]:
    import torch

    return ["# Per-sample gradient variance of every estimator of issue 26 (the pre-registered variance column)", "",
            f"`{command()}` on {cpu_model()} ({platform.machine()}, one thread), torch {torch.__version__}.", "",
            f"Per preset as shipped (its own sampler, G, k_steps; no overrides but a method's own), {prompts} training "
            "prompts x the preset's group size, sampled from the shipped base with seed "
            f"{seed}; rewards and group advantages as in training; methods and their configs as "
            "`benchmarks/designs/estimators_*.json` and `rl_compare.METHODS` run them; each loss's real `prepare` "
            "and `backward` on one-row micro-batches (`total_samples=1`), first inner epoch, the frozen initial "
            "model as reference policy (beta_kl at each method's default; in the first epoch the policy is the reference, "
            "so the KL terms cost passes but add no gradient).", "",
            READING, "", *estimator_table(prompts, seed)]


def draws_report(prompts: int, seed: int) -> list[str]:
    import torch

    lines = ["# Exact vs committed-only draw scoring: bias and per-sample gradient variance", "",
             f"`python -m benchmarks.bench_estimator_variance --prompts {prompts} --seed {seed}` "
             f"on {platform.machine()} CPU, torch {torch.__version__}.", "",
             "## Bias, by exact enumeration (tiny 6-token LLaDA; ||E[estimate] - grad E[R]|| / ||grad E[R]||)", "",
             "| commit rule | G | steps | temperature | trajectories | draws=all | draws=committed |",
             "|---|---|---|---|---|---|---|"]
    for r in enumeration_rows():
        lines.append(f"| {r['rule']} | {r['G']} | {r['steps']} | {r['T']} | {r['trajectories']} | {r['all']:.1e} | {r['committed']:.3f} |")
    lines += ["", "## Rao-Blackwellised discarded draws, by enumeration (low-confidence; the learner's "
              "`algorithm.draws=rao_blackwell`, exact by tests/test_loss_unbiased.py)", "",
              "err = relative error of E[R * score] vs grad E[R]; tr Cov of R * score (no baseline).", "",
              "| G | steps | temperature | head | trajectories | err all | err RB | tr Cov all | tr Cov RB | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rao_blackwell_rows():
        lines.append(f"| {r['G']} | {r['steps']} | {r['T']} | {r['head']} | {r['trajectories']} | {r['err_all']:.1e} | "
                     f"{r['err_rb']:.1e} | {r['var_all']:.4g} | {r['var_rb']:.4g} | {r['var_rb'] / r['var_all']:.2f} |")
    lines += ["", "## Per-sample gradient variance on the tiny presets (low-confidence remasking, T = 1)", "",
              "tr Cov = the per-sample gradient's variance summed over parameters; |mean|^2 = squared norm of the "
              "batch-mean gradient; cos = cosine between two estimators' mean gradients (committed and RB against all). "
              "RB = draws=rao_blackwell in the learner: exact like all.", "",
              "| preset | steps scored | samples | mean reward | discarded draws / sample | tr Cov all | tr Cov committed "
              "| all / committed | tr Cov RB | RB / all | \\|mean\\|^2 all | \\|mean\\|^2 committed | cos committed | cos RB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        for r in run_preset(name, prompts, seed):
            lines.append(f"| {r['preset']} | {r['steps']} | {r['samples']} | {r['mean_reward']:.3f} | "
                         f"{r['discards_per_sample']:.1f} | {r['var_all']:.4g} | {r['var_committed']:.4g} | "
                         f"{r['var_all'] / r['var_committed'] if r['var_committed'] else float('nan'):.2f} | "
                         f"{r['var_rb']:.4g} | {r['var_rb'] / r['var_all']:.2f} | {r['mean_sq_all']:.4g} | "
                         f"{r['mean_sq_committed']:.4g} | {r['cos']:.3f} | {r['cos_rb']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts per preset (x group size samples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimators", action="store_true",
                    help="every method of issue 26's designs on the presets as shipped, instead of draws=all vs committed")
    args = ap.parse_args()

    import torch

    from common.threads import set_cpu_threads

    set_cpu_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lines = (estimators_report if args.estimators else draws_report)(args.prompts, args.seed)
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
