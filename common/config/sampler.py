"""`sampler:` section: LLaDA-style iterative unmasking."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import Section


class SamplerConfig(Section):
    """Decoding schedule and sampling distribution of the iterative-unmasking sampler."""

    gen_length: int = Field(default=32, ge=1, description="Completion tokens generated per sample (G in LLaDA).")
    block_length: int = Field(default=32, ge=1, description="Semi-autoregressive block length; divides gen_length.")
    steps: int = Field(default=32, ge=1, description="Total denoising steps; a multiple of gen_length/block_length.")
    temperature: float = Field(default=0.0, ge=0.0, description="Gumbel-max temperature; 0 is greedy argmax.")
    top_k: int | None = Field(default=None, ge=1, description="Sample only among the k most likely tokens.")
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling: smallest support with mass >= top_p."
    )
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = Field(
        default="low_confidence",
        description="Which masked positions to commit each step: highest probability, random, "
        "largest top1-top2 margin, or lowest entropy.",
    )
    threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Confidence-threshold parallel decoding: commit every masked token of the block whose "
        "confidence exceeds this (at least one per step) instead of the fixed schedule.",
    )
    cfg_scale: float = Field(default=0.0, ge=0.0, description="Classifier-free guidance scale (0 disables).")
    logits_eos_inf: bool = Field(default=False, description="LLaDA option: never sample EOS.")
    confidence_eos_eot_inf: bool = Field(
        default=False, description="LLaDA option: EOS/EoT never win the confidence ranking."
    )
    stop_on_eos_block: bool = Field(
        default=False, description="Stop a row once a whole block decodes to EOS and fill the rest with EOS."
    )
    ban_mask_token: bool = Field(
        default=True,
        description="Never draw the mask token (its logit is -inf, recorded in banned_ids): a committed MASK "
        "would leave the position undecoded. LLaDA's reference does not ban it, so set False for bit-exact "
        "reference equivalence on models that give the mask token probability mass (trained ones give none).",
    )
    position_ids: Literal["absolute", "packed"] = Field(
        default="absolute",
        description="RoPE positions: 'absolute' numbers every column 0..L-1 as LLaDA's reference does (a "
        "padded prompt then sits at shifted positions); 'packed' numbers only real tokens, so padding does "
        "not change the output. The learner must rebuild states with the same choice.",
    )
    cache: Literal["none", "prefix", "dual"] = Field(
        default="none",
        description="Block KV cache, part of the policy (the learner rebuilds it exactly): at a block's first "
        "step one full forward keeps every column's keys/values; the block's later steps run only the block "
        "and everything after it ('prefix': the prefix's keys/values are reused) or only the block ('dual': "
        "the prefix's and the masked suffix's are reused). 'none' runs the full sequence at every step.",
    )
    cache_refresh: int | None = Field(
        default=None,
        ge=1,
        description="With a cache, run the full forward again (and rebuild the cache) every this many steps "
        "inside a block; None: only at the block's first step. Recorded with the trajectory.",
    )
    compile_forward: Literal["none", "default", "reduce-overhead"] = Field(
        default="none",
        description="torch.compile the model's hidden-state forward ('reduce-overhead' adds CUDA graphs, "
        "which pays off at small batch where launch overhead dominates); the LM head and sampling stay eager.",
    )
    kernel: Literal["auto", "triton", "torch"] = Field(
        default="auto", description="Fused sampling kernel: Triton on CUDA, the pure-torch reference elsewhere."
    )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @model_validator(mode="after")
    def _schedule(self) -> "SamplerConfig":
        if self.gen_length % self.block_length:
            raise ValueError(
                f"block_length {self.block_length} must divide gen_length {self.gen_length}"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps {self.steps} must be a multiple of the number of blocks "
                f"(gen_length/block_length = {self.num_blocks})"
            )
        if self.cache_refresh is not None and self.cache == "none":
            raise ValueError("cache_refresh needs a cache; set cache to 'prefix' or 'dual'")
        if self.cache != "none" and self.compile_forward != "none":
            raise ValueError("compile_forward works without a cache only (the cached forward runs eagerly); "
                             "set cache: none or compile_forward: none")
        if self.top_k is not None and self.temperature == 0.0:
            raise ValueError("top_k has no effect at temperature 0; unset it or raise the temperature")
        return self
