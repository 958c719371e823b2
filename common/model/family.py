"""The model-family contract: what the sampler, the learner's state rebuild, the losses, SFT, LoRA, FSDP2
and checkpoint I/O ask of a model, and the registry that maps a checkpoint's ``model_type`` to it.

A family is a folder (``common/model/<family>/``: configuration, modeling) plus one ``register`` call in
``common/model/__init__.py``. Nothing outside a family's folder names its modules: callers read
``family_of(model)`` (or ``family_for_type``) and the methods every model class has (``common.model.base``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelFamily:
    """One family of diffusion LMs: its classes, its public identity and what differs in using it."""

    name: str  # our name (configs, docs): "llada", "dream", "sdar"
    model_type: str  # config.json's model_type, exactly as the public checkpoints spell it
    config_class: type
    model_class: type
    public_repo: str  # the model repository whose remote code ``auto_map`` points exports at
    auto_map: dict[str, str]  # the public config.json's auto_map (module.Class), re-prefixed on export
    architectures: tuple[str, ...]
    logit_shift: int  # 0: logits at column i score token i; 1: they sit at column i - 1 (Dream)
    attention: Literal["bidirectional", "block_causal", "encoder_decoder"]
    lora_targets: tuple[str, ...]  # linears inside a block (dotted paths) that LoRA adapts by default
    mask_token: str | None  # the mask token's text in the real tokenizer (its id also in config.json); None: no mask
    eot_token: str | None  # end-of-turn token's text (LLaDA <|eot_id|>, Qwen <|im_end|>)
    decoding: dict = field(default_factory=dict)  # sampler settings of the public decoder, for presets/docs
    tokenizer_class: str | None = None  # transformers class for a tokenizer whose public class is remote code
    routed: bool = False  # a mixture of experts: the sampler can record its routing (``model.routing``/``replaying``)
    native: bool = False  # transformers' own model class (DiffusionGemma): its loader reads and writes checkpoints

    @property
    def canvases(self) -> bool:
        """Decodes uniform-noise canvases (DiffusionGemma): its own sampler, losses and SFT objective, and one
        FSDP unit (its encoder and decoder layers share their parameters)."""
        return self.attention == "encoder_decoder"

    def block_size(self, config) -> int | None:
        """Block length of block-causal attention (None for bidirectional families)."""
        return int(config.block_size) if self.attention == "block_causal" else None

    def check_sampler(self, sampler, config) -> None:
        """Refuse, in one line, a decoding this family's attention cannot run as the policy it claims to be."""
        size = self.block_size(config)
        if self.canvases:  # a block is the model's canvas
            if sampler.block_length != config.canvas_length:
                raise ValueError(f"{self.name} decodes canvases of canvas_length {config.canvas_length}: set "
                                 f"sampler.block_length={config.canvas_length} (sampler.steps = steps a canvas x canvases)")
        elif size is not None:
            wanted = {"block_grid": "sequence", "block_length": size, "position_ids": "packed"}
            wrong = {k: v for k, v in wanted.items() if getattr(sampler, k) != v}
            if wrong:
                sets = " ".join(f"sampler.{k}={v}" for k, v in wanted.items())
                raise ValueError(f"{self.name} decodes block by block on its attention's grid (block_size {size}, "
                                 f"counted from each prompt's first token): set {sets}")
        if size is None and sampler.block_grid != "completion":
            raise ValueError(f"sampler.block_grid=sequence is for block-causal models; {self.name} attends "
                             "bidirectionally: set sampler.block_grid=completion")

    def export_auto_map(self) -> dict[str, str]:
        """``auto_map`` pointing at the public repository's code (``owner/repo--module.Class``), so an export
        loads anywhere with ``trust_remote_code=True`` and with our registration without it."""
        return {k: f"{self.public_repo}--{v}" for k, v in self.auto_map.items()}



FAMILIES: dict[str, ModelFamily] = {}  # by model_type


def register(family: ModelFamily) -> None:
    FAMILIES[family.model_type] = family


def family_for_type(model_type: str | None, where: str = "config.json") -> ModelFamily:
    """The family of a ``model_type``; one line naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{t!r} ({f.name})" for t, f in FAMILIES.items())
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")
    return FAMILIES[model_type]


def family_of(model_or_config) -> ModelFamily:
    """The family of a model (FSDP-wrapped or not) or of its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_type(getattr(config, "model_type", None), where=type(model_or_config).__name__)
