"""Low-rank adapters written for our model and FSDP2 (no peft dependency).

Each targeted ``nn.Linear`` becomes a ``LoraLinear`` that keeps its frozen ``weight`` under the same name
(so base keys stay the family's public ones) and adds ``lora_A`` [r, in] and ``lora_B`` [out, r] (B starts at zero, so the
adapted model equals the base at step 0). The HF export holds merged weights ``W + (alpha / r) * B @ A``
(``load_pretrained`` never sees adapters). Weight syncs send only ``A`` and ``B`` when the base is a
checkpoint both sides load (``lora.sync_adapters``; rollout actors merge with ``rollout.lora_merge``),
and the merged weights otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.config import LoraConfig
from common.model import family_of


class LoraLinear(nn.Linear):
    """``x W^T + scale * dropout(x) A^T B^T`` with ``W`` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias  # frozen too (Dream's q/k/v projections have one)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return base + self.scale * update


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Freeze ``model`` and replace targeted linears inside each block by adapters; returns how many."""
    family = family_of(model)
    targets = cfg.target_modules if cfg.target_modules is not None else family.lora_targets
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    twins = getattr(model, "tied_blocks", None)  # DiffusionGemma: encoder layers holding the decoder's weights
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        found = 0
        for i, block in enumerate(model.blocks):  # a mixture of experts has some linears only in its dense or MoE layers
            try:
                parent = block.get_submodule(parent_name)
            except AttributeError:
                continue
            base = getattr(parent, leaf, None)
            if isinstance(base, nn.Linear):
                adapter = LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout)
                setattr(parent, leaf, adapter)
                if twins is not None:  # the twin shares the adapter's parameters, as it shares the base weight
                    twin, twin_base = twins[i].get_submodule(parent_name), getattr(twins[i].get_submodule(parent_name), leaf)
                    if twin_base.weight is not base.weight:
                        raise ValueError(f"{name} of block {i} is not tied to its encoder twin; LoRA would split them")
                    twin_adapter = LoraLinear(twin_base, cfg.r, cfg.alpha, cfg.dropout)
                    twin_adapter.lora_A, twin_adapter.lora_B, twin_adapter.dropout = adapter.lora_A, adapter.lora_B, adapter.dropout
                    setattr(twin, leaf, twin_adapter)
                found += 1
        if not found:
            raise ValueError(f"learner.lora.target_modules: {name!r} is not a linear layer of a {family.name} "
                             f"block (its defaults: {', '.join(family.lora_targets)})")
        count += found
    return count


def lora_scales(model: nn.Module) -> dict[str, float]:
    """``{module prefix: scale}`` for every adapter in ``model`` (empty without LoRA)."""
    return {name: m.scale for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def is_adapter(name: str) -> bool:
    """Whether a state-dict key is an adapter tensor (``<prefix>.lora_A`` / ``<prefix>.lora_B``)."""
    return name.endswith((".lora_A", ".lora_B"))
