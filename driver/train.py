"""`unmask train`: for now builds the policy and runs one forward pass."""
from __future__ import annotations

from common.config import UnmaskConfig


def train(cfg: UnmaskConfig, resume: str | None = None) -> int:
    import torch

    from common.policy import load_policy

    model, tokenizer = load_policy(cfg.model)
    ids = torch.tensor([tokenizer.encode("1,2,3 -> 6")])
    logits = model(ids).logits
    print(f"policy forward ok: logits {tuple(logits.shape)}; the RL loop is not wired in yet")
    return 0
