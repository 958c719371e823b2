"""A tiny DiffusionGemma on Countdown-3 in one process, without the driver (the run's way is `unmask sft --config
sft_tiny_countdown_dgemma` then `unmask train --config tiny_countdown_dgemma`):
SFT with the family's uniform-noise objective on the solver's completions, then AGRPO on uniform canvases
(exact self-conditioned score) with the task's reward, held-out accuracy before and after each phase.

    python -m benchmarks.dgemma_countdown --sft-steps 1500 --rl-steps 300 --eval-size 256 \
        --save-base /tmp/dgemma-base --out benchmarks/results/dgemma_countdown.md
    python -m benchmarks.dgemma_countdown --base checkpoints/tiny-countdown-dgemma-base --rl-steps 300   # RL only
"""
from __future__ import annotations

import argparse
import itertools
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--sft-batch", type=int, default=32)
    p.add_argument("--rl-steps", type=int, default=30)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", default=None, help="start RL from this saved base (skips SFT)")
    p.add_argument("--save-base", default=None, help="save the SFT model here")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    import common.model as M
    from common.config.task import TaskConfig
    from common.model.dgemma.modeling import UniformDecoding
    from common.tasks import get_task, score_completions
    from common.tokenizers import CharTokenizer
    from learner.losses.uniform_agrpo import uniform_agrpo_loss
    from learner.uniform_sft import uniform_sft_loss
    from rollout.actor import completion_text
    from rollout.sampler import pad_rows
    from rollout.uniform_sampler import generate_uniform

    torch.set_num_threads(args.threads)
    tok, task = CharTokenizer(), get_task(TaskConfig(name="countdown", prompt_style="compact", seed=1))
    model = M.load_pretrained(args.base) if args.base else M.build_model(M.preset_config("tiny-dgemma"), seed=0)
    G = 16  # 4 canvases of 4
    d = UniformDecoding(max_new_tokens=G, steps=8, entropy_bound=1.0, confidence_threshold=0.05)
    lines = [f"# Tiny DiffusionGemma on Countdown-3 ({sum(p.numel() for p in model.parameters())} parameters, "
             f"canvas 4, {G} tokens, {d.steps} steps a canvas, held-out {args.eval_size} items)", "",
             "| phase | steps | held-out accuracy | mean reward | seconds |", "|---|---:|---:|---:|---:|"]

    def prompts(items):
        return pad_rows([tok.encode(task.prompt(it, tok)) for it in items], tok.pad_id)

    def decode(model, items, seed):
        ids, mask = prompts(items)
        torch.manual_seed(seed)
        model.eval()
        rec = generate_uniform(model, ids, d, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, prompt_mask=mask)
        texts = [completion_text(tok, row.tolist()) for row in rec.sequences[:, ids.shape[1]:]]
        return ids, rec, texts

    held_out = task.eval_items(args.eval_size)

    def evaluate(phase, steps, seconds):
        res = score_completions(task, decode(model, held_out, 0)[2], held_out)
        lines.append(f"| {phase} | {steps} | {100 * res['accuracy']:.1f}% | {res['mean_reward']:.3f} | {seconds:.0f} |")
        print(lines[-1], flush=True)

    # --- SFT with the uniform-noise objective
    stream, gen = task.train_items(1), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.time()
    sft_steps = 0 if args.base else args.sft_steps
    if sft_steps:
        evaluate("random init", 0, 0)
    for step in range(sft_steps):
        items = list(itertools.islice(stream, args.sft_batch))
        comps = [tok.encode(task.reference_completion(it)) + [tok.eos_id] for it in items]
        keep = [i for i, c in enumerate(comps) if len(c) <= G]
        ids, mask = prompts([items[i] for i in keep])
        comp = torch.tensor([comps[i] + [tok.eos_id] * (G - len(comps[i])) for i in keep])
        model.train()
        loss = uniform_sft_loss(model, ids, comp, gen, prompt_mask_BP=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    evaluate(f"base {args.base}" if args.base else "SFT (uniform noise)", sft_steps, time.time() - t0)
    if args.save_base:
        M.save_pretrained(model, args.save_base)
        tok.save(args.save_base)  # `unmask train` reads the tokenizer beside the weights
    # --- AGRPO on uniform canvases
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.time()
    for step in range(args.rl_steps):
        items = [it for it in itertools.islice(stream, args.prompts_per_step) for _ in range(args.group)]
        ids, rec, texts = decode(model, items, 1000 + step)
        reward = torch.tensor([task.reward(t, it).total for t, it in zip(texts, items)])
        adv = (reward.view(-1, args.group) - reward.view(-1, args.group).mean(1, keepdim=True)).flatten()
        model.train()
        loss, _ = uniform_agrpo_loss(model, ids, rec, d, adv, total_samples=len(items))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"rl step {step}: mean reward {float(reward.mean()):.3f}", flush=True)
    evaluate("+ AGRPO (exact score)", args.rl_steps, time.time() - t0)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
