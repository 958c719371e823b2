"""Rollout side of adapter-only weight syncs: merge the learner's LoRA adapters into the rollout model.

A LoRA run over a checkpoint base changes only ``W = W0 + scale * B @ A`` of the adapted layers, so the
learner sends ``A`` and ``B`` in fp32 (r x (in + out) numbers per layer instead of in x out: 0.67 GB
instead of 16 GB for LLaDA-8B at r = 64) and every rollout actor merges them into its own copy of ``W0``, which it
read from the same checkpoint as the learner. The merge is the learner's own formula (fp32, then the
model's dtype), so merged weights are what the learner's HF export holds.

Memory: one extra copy of the adapted base weights per rollout actor (kept on its device), in place of
the nccl staging copy of the full model.
"""
from __future__ import annotations

import torch

from common.weights import TensorMeta, dtype_of


class AdapterMerge:
    """Holds ``W0`` of every adapted layer and receive buffers for the adapters; ``apply`` merges."""

    def __init__(self, model: torch.nn.Module, layout: tuple[TensorMeta, ...], scales: dict[str, float]):
        params = dict(model.named_parameters(remove_duplicate=False))  # tied layers: every name (one tensor)
        missing = [p for p in scales if f"{p}.weight" not in params]
        if missing:
            raise ValueError(f"adapter sync: the rollout model has no layer {missing[0]!r} "
                             f"({len(missing)} missing); learner and rollout models differ")
        self.layout, self.scales = layout, dict(scales)
        self.base = {p: params[f"{p}.weight"].detach().clone() for p in scales}
        device = next(iter(self.base.values())).device if self.base else torch.device("cpu")
        self.buffers = {m.name: torch.empty(m.shape, dtype=dtype_of(m.dtype), device=device) for m in layout}
        for prefix in scales:
            for part in ("lora_A", "lora_B"):
                if f"{prefix}.{part}" not in self.buffers:
                    raise ValueError(f"adapter sync: the layout lacks {prefix}.{part}")

    def matches(self, layout: tuple[TensorMeta, ...], scales: dict[str, float]) -> bool:
        return layout == self.layout and scales == self.scales

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Write ``W0 + scale * B @ A`` (the adapters now in ``buffers``) into every adapted layer."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for prefix, scale in self.scales.items():
            weight = params[f"{prefix}.weight"]
            delta = self.buffers[f"{prefix}.lora_B"].float() @ self.buffers[f"{prefix}.lora_A"].float()
            weight.copy_((self.base[prefix].float() + scale * delta).to(weight.dtype))
