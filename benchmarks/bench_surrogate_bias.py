"""Bias of the sequence-likelihood surrogates (d1 one-pass = diffu-GRPO's and wd1's likelihood, coupled-GRPO,
SPG, ESPO, BGPO) and of TraceRL's merged steps against the exact policy gradient, by the exact enumeration of
tests/test_loss_unbiased.py.

Every trajectory of the tiny 6-token LLaDA (one block, 2 tokens in 2 steps, random and low-confidence
remasking at temperature 1) is enumerated with
its probability P; the exact gradient is grad sum_tau P R. Each surrogate's expected direction is
sum_tau P (R - E[R]) grad s(x_tau), with s its likelihood estimate averaged over its own masks (Monte Carlo
over ``--draws`` seeds of its real ``prepare``; the real ``backward`` at ratio 1, advantages N P (R - E[R])).
SPG runs with block length 1 (its default block masking needs num_t = 2 blocks; the
completion here is 2-3 tokens) and with random masking. Surrogates rescale the gradient in their own ways, so the table gives the cosine to the exact gradient and
the relative error after the best rescaling (sin of the angle); AGRPO scoring every draw is the control (1, 0).
TraceRL draws nothing (one pass of its rows); its committed-only scoring is exact under random remasking and
biased under low-confidence, and shrink 2 merges the two steps into one row at the first step's state.

    python -m benchmarks.bench_surrogate_bias --draws 200 --out benchmarks/results/surrogate_bias.md
    python -m benchmarks.bench_surrogate_bias --draws 200 --only TraceRL --out benchmarks/results/surrogate_bias_tracerl.md
    python -m benchmarks.bench_surrogate_bias --draws 25 --only BGPO --out benchmarks/results/surrogate_bias_bgpo.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=200, help="mask draws (prepare seeds) per surrogate")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--only", default=None, help="run only the estimators whose name contains this (and the control)")
    return p.parse_args(argv)


def surrogate_configs():
    from common.config import (AgrpoConfig, BgpoConfig, CoupledGrpoConfig, DiffuGrpoConfig, EspoConfig, SpgConfig,
                               TraceRLConfig)

    return {
        "AGRPO, every draw (control)": AgrpoConfig(k_steps=8, normalize="sum", eligible_steps="all", draws="all"),
        "d1 one-pass (diffu-GRPO; wd1's likelihood)": DiffuGrpoConfig(beta_kl=0.0),
        "coupled-GRPO": CoupledGrpoConfig(beta_kl=0.0, inner_epochs=1),
        "SPG, ELBO both signs, block 1": SpgConfig(negative_bound="elbo", block_length=1, inner_epochs=1),
        "SPG, mix (default), block 1": SpgConfig(block_length=1, inner_epochs=1),
        "SPG, EUBO, block 1": SpgConfig(negative_bound="eubo", block_length=1, inner_epochs=1),
        "SPG, mix, random masking": SpgConfig(masking="random", inner_epochs=1),
        "ESPO": EspoConfig(beta_kl=0.0, inner_epochs=1),
        "BGPO (16 masks a draw)": BgpoConfig(),
        "TraceRL, rl_sdar defaults (shrink 1)": TraceRLConfig(beta_kl=0.0, std_normalize=False),
        "TraceRL, shrink 2": TraceRLConfig(shrink=2, beta_kl=0.0, std_normalize=False),
    }


def directions(model, leaves, G, steps, temperature, reads_draws, draws, only=None):
    """(exact gradient, {name: expected surrogate direction}) as float64 vectors."""
    import torch

    from learner.losses import build_loss
    from tests.test_loss_unbiased import MASK, PAD, _reward, flat_grad, leaves_batch

    logprob_N = torch.stack([leaf["logprob"] for leaf in leaves])
    p_N = logprob_N.detach().double().exp()
    reward_N = torch.tensor([_reward(leaf["completion"], G) for leaf in leaves], dtype=torch.float64)
    model.zero_grad()
    (logprob_N.double().exp() * reward_N).sum().backward()
    exact = flat_grad(model).double().clone()
    model.zero_grad()
    N = len(leaves)
    adv_N = (N * p_N * (reward_N - (p_N * reward_N).sum())).float()
    out = {}
    for name, cfg in surrogate_configs().items():
        if only is not None and only not in name and cfg.name != "agrpo":
            continue
        batch = leaves_batch(leaves, G, steps, temperature, reads_draws)
        loss = build_loss(cfg, mask_id=MASK, pad_id=PAD, eos_id=None)
        total = torch.zeros_like(exact)
        seeds = 1 if cfg.name in ("agrpo", "tracerl") else draws  # they draw no masks
        for seed in range(seeds):
            prepared = loss.prepare(batch, seed=seed)
            prepared.extras["advantages_B"] = adv_N
            loss.backward(model, prepared, total_samples=N)
            total += -flat_grad(model).double()
            model.zero_grad()
        out[name] = total / seeds
    return exact, out


def rows(draws: int, only=None) -> list[dict]:
    from tests.test_loss_unbiased import _rule_reads_draws, _tiny, enumerate_trajectories

    model = _tiny()
    cases = [("random", 2, 2, 1.0, None), ("low_confidence", 2, 2, 1.0, None)]
    result = []
    for rule, G, steps, temperature, threshold in cases:
        leaves = enumerate_trajectories(model, G, steps, rule, temperature, threshold)
        exact, est = directions(model, leaves, G, steps, temperature, _rule_reads_draws(rule, threshold), draws, only)
        for name, d in est.items():
            cos = float(d @ exact / (d.norm() * exact.norm()))
            result.append(dict(case=f"{rule}, G={G}, T={temperature}", estimator=name, cos=cos,
                               sin=max(0.0, 1 - cos**2) ** 0.5))
            print(result[-1], flush=True)
    return result


def main(argv=None):
    args = parse(argv)
    start = time.perf_counter()
    table = rows(args.draws, args.only)
    lines = ["# Surrogate bias by exact enumeration", "",
             f"`python -m benchmarks.bench_surrogate_bias --draws {args.draws}"
             + (f" --only {args.only}" if args.only else "") + "` "
             f"({time.perf_counter() - start:.0f} s). "
             "Cosine of each estimator's expected gradient (its masks averaged over the draws) with the exact "
             "gradient of E[R], and the relative error left after the best rescaling.", "",
             "| decoding | estimator | cosine | relative error after rescaling |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['estimator']} | {r['cos']:.3f} | {r['sin']:.3f} |" for r in table]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
