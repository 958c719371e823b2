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
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

PRESETS = ("tiny_countdown", "tiny_sudoku")


def per_sample_moments(model, loss, traj, seed: int) -> dict:
    """Sum of per-sample gradients, of their squared norms, and of their squared norms' count."""
    import torch

    from learner.losses import select_rows

    batch = loss.prepare(traj, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    sq, n = 0.0, len(batch)
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss.backward(model, select_rows(batch, torch.tensor([i])), total_samples=1)
        g = [p.grad.double() if p.grad is not None else torch.zeros_like(t) for p, t in zip(params, total)]
        sq += float(sum((x * x).sum() for x in g))
        for t, x in zip(total, g):
            t += x
    model.zero_grad(set_to_none=True)
    return {"sum": total, "sq": sq, "n": n}


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


def run_preset(name: str, prompts: int, seed: int) -> list[dict]:
    import itertools

    import torch

    from common.config import AgrpoConfig
    from common.config.loader import load_config
    from learner.losses import build_loss
    from rollout.actor import Generator

    # The setting the committed table was measured in (the presets have since moved to random/margin
    # remasking and G=16, where committed-only is already exact).
    cfg = load_config(name, ["sampler.remasking=low_confidence", "rollout.group_size=8"])
    gen = Generator(cfg.model, cfg.sampler, cfg.task, device="cpu")
    G = cfg.rollout.group_size
    items = list(itertools.islice(gen.task.train_items(seed), prompts))
    rows = [item for item in items for _ in range(G)]
    traj = gen.generate(gen.encode_prompts(rows), seed=seed)
    _, rewards = gen.score(traj, rows)
    traj.rewards_B = torch.tensor([r.total for r in rewards], dtype=torch.float32)
    traj.group_B = torch.arange(len(rows)) // G
    model = gen.model.float().requires_grad_(True).train()
    tok = gen.tokenizer
    T = cfg.sampler.steps
    out = []
    for k_label, k in (("all steps", T), (f"k={cfg.algorithm.k_steps}", cfg.algorithm.k_steps)):
        moments = {}
        for draws in ("all", "committed"):
            algo = AgrpoConfig(**{**cfg.algorithm.model_dump(), "name": "agrpo", "k_steps": k, "draws": draws})
            loss = build_loss(algo, mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id)
            moments[draws] = per_sample_moments(model, loss, traj, seed)
        s_all, s_com = summarise(moments["all"]), summarise(moments["committed"])
        out.append({
            "preset": name, "steps": k_label, "samples": len(rows), "mean_reward": float(traj.rewards_B.mean()),
            "var_all": s_all["var"], "var_committed": s_com["var"], "mean_sq_all": s_all["mean_sq"],
            "mean_sq_committed": s_com["mean_sq"], "cos": cosine(moments["all"], moments["committed"]),
            "discards_per_sample": float((traj.discard_ids_BGS >= 0).sum()) / len(rows),
        })
    return out


def enumeration_rows() -> list[dict]:
    """Relative error of each estimator's expectation vs exact grad E[R] (tests/test_loss_unbiased.py)."""
    from tests.test_loss_unbiased import CASES, _rel, _tiny, exact_and_estimated

    model = _tiny()
    rows = []
    for rule, G, steps, temperature, threshold, top_k in CASES:
        remasking = "low_confidence" if rule == "threshold" else rule
        label = (rule if threshold is None else f"threshold {threshold}") + ("" if top_k is None else f", top-k {top_k}")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--prompts", type=int, default=16, help="training prompts per preset (x group size samples)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from common.threads import set_cpu_threads

    set_cpu_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lines = ["# Exact vs committed-only draw scoring: bias and per-sample gradient variance", "",
             f"`python -m benchmarks.bench_estimator_variance --prompts {args.prompts} --seed {args.seed}` "
             f"on {platform.machine()} CPU, torch {torch.__version__}.", "",
             "## Bias, by exact enumeration (tiny 6-token LLaDA; ||E[estimate] - grad E[R]|| / ||grad E[R]||)", "",
             "| commit rule | G | steps | temperature | trajectories | draws=all | draws=committed |",
             "|---|---|---|---|---|---|---|"]
    for r in enumeration_rows():
        lines.append(f"| {r['rule']} | {r['G']} | {r['steps']} | {r['T']} | {r['trajectories']} | {r['all']:.1e} | {r['committed']:.3f} |")
    lines += ["", "## Rao-Blackwellised discarded draws, by enumeration only (low-confidence; not in the learner)", "",
              "err = relative error of E[R * score] vs grad E[R]; tr Cov of R * score (no baseline).", "",
              "| G | steps | temperature | head | trajectories | err all | err RB | tr Cov all | tr Cov RB | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rao_blackwell_rows():
        lines.append(f"| {r['G']} | {r['steps']} | {r['T']} | {r['head']} | {r['trajectories']} | {r['err_all']:.1e} | "
                     f"{r['err_rb']:.1e} | {r['var_all']:.4g} | {r['var_rb']:.4g} | {r['var_rb'] / r['var_all']:.2f} |")
    lines += ["", "## Per-sample gradient variance on the tiny presets (low-confidence remasking, T = 1)", "",
              "tr Cov = the per-sample gradient's variance summed over parameters; |mean|^2 = squared norm of the "
              "batch-mean gradient; cos = cosine between the two estimators' mean gradients.", "",
              "| preset | steps scored | samples | mean reward | discarded draws / sample | tr Cov all | tr Cov committed "
              "| ratio | \\|mean\\|^2 all | \\|mean\\|^2 committed | cos |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        for r in run_preset(name, args.prompts, args.seed):
            lines.append(f"| {r['preset']} | {r['steps']} | {r['samples']} | {r['mean_reward']:.3f} | "
                         f"{r['discards_per_sample']:.1f} | {r['var_all']:.4g} | {r['var_committed']:.4g} | "
                         f"{r['var_all'] / r['var_committed'] if r['var_committed'] else float('nan'):.2f} | {r['mean_sq_all']:.4g} | "
                         f"{r['mean_sq_committed']:.4g} | {r['cos']:.3f} |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
