"""`sampler:` section: iterative unmasking as each family's public decoder does it (LLaDA's semi-autoregressive
blocks, Dream's timestep schedule, SDAR's block diffusion), and DiffusionGemma's uniform-noise canvases."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import Section


def block_rounds(gen_length: int, block_length: int, grid: str) -> int:
    """Blocks the sampler decodes one after another. ``completion``: the completion's G / K blocks.
    ``sequence``: blocks of K positions counted from the prompt's first token, so the first one may hold
    the prompt's tail; a completion then meets at most ceil((G + K - 1) / K) of them (rows whose prompt
    length is a multiple of K use one fewer, and leave the last round empty)."""
    if grid == "completion":
        return gen_length // block_length
    return -(-(gen_length + block_length - 1) // block_length)


class UniformConfig(Section):
    """DiffusionGemma's canvas decoding (``DiffusionGemmaGenerationConfig``'s defaults): the canvas is
    ``block_length`` tokens (the model's ``canvas_length``), ``steps_per_block`` the most denoising steps of a
    canvas, ``gen_length`` the new tokens (whole canvases). The rest is here."""

    t_min: float = Field(default=0.4, gt=0.0, description="Temperature at a canvas's last step (linear schedule).")
    t_max: float = Field(default=0.8, gt=0.0, description="Temperature at a canvas's first step.")
    entropy_bound: float = Field(
        default=0.1, ge=0.0,
        description="Accept the lowest-entropy positions while their summed entropy minus the largest stays "
        "within this; the rest are renoised with uniform tokens.")
    stability_threshold: int = Field(
        default=1, ge=0, description="A canvas stops once its argmax repeated this many steps ...")
    confidence_threshold: float = Field(
        default=0.005, ge=0.0, description="... and its mean entropy is below this.")


class SamplerConfig(Section):
    """Decoding schedule and sampling distribution of the iterative-unmasking sampler."""

    gen_length: int = Field(default=32, ge=1, description="Completion tokens generated per sample (G in LLaDA).")
    block_length: int = Field(
        default=32, ge=1,
        description="Block length (semi-autoregressive blocks; for block-causal models the model's block_size); "
        "divides gen_length on the completion grid.")
    steps: int = Field(
        default=32, ge=1,
        description="Denoising steps over the completion: steps per block x ceil(gen_length / block_length).")
    block_grid: Literal["completion", "sequence"] = Field(
        default="completion",
        description="Where blocks start: 'completion' = at the completion's first position (LLaDA, Dream); "
        "'sequence' = every block_length positions from the prompt's first token, so the first block may hold "
        "the prompt's tail (SDAR's block diffusion: the model's attention uses the same grid).")
    transfer: Literal["linear", "timestep"] = Field(
        default="linear",
        description="Tokens committed per step: 'linear' = LLaDA's even split of a block over its steps (SDAR's "
        "too); 'timestep' = Dream's: with timesteps linspace(1, eps, steps + 1), step i commits "
        "int(masked * (1 - t_{i+1} / t_i)) and the last step every masked position left.")
    eps: float = Field(default=1e-3, gt=0.0, lt=1.0, description="Dream's final timestep (transfer: timestep).")
    open_block: Literal["schedule", "first_position"] = Field(
        default="schedule",
        description="What a block's first step commits: its share of the schedule, or only the block's first "
        "position ('first_position': Fast-dLLM's Dream block decoding; a cached step's window then starts at the "
        "block, since the first position's logits are never needed again). Recorded with the trajectory.")
    temperature: float = Field(default=0.0, ge=0.0, description="Gumbel-max temperature; 0 is greedy argmax.")
    top_k: int | None = Field(default=None, ge=1, description="Sample only among the k most likely tokens.")
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling: smallest support with mass >= top_p."
    )
    remasking: Literal["low_confidence", "top_prob", "random", "margin", "entropy", "origin", "sequential"] = Field(
        default="low_confidence",
        description="Which masked positions to commit each step: highest probability of the drawn token (LLaDA's "
        "low_confidence, Dream's maskgit_plus), highest top probability of the position's distribution (top_prob: "
        "the same order at temperature 0, but it reads no draw, so the committed draws are the exact score), random, largest top1-top2 margin (topk_margin), lowest entropy (entropy), or leftmost first "
        "(sequential: SDAR's, and left-to-right decoding with one token a step); 'origin' "
        "(Dream's default) commits each masked position independently with probability 1 - t_{i+1}/t_i "
        "(transfer: timestep), so the count per step is random.",
    )
    remasking_temperature: float = Field(
        default=0.0, ge=0.0,
        description="Dream's alg_temp: > 0 draws the committed positions with probability softmax(score / this) "
        "without replacement (Gumbel-top-k on the remasking score) instead of taking the best ones.")
    threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Confidence-threshold parallel decoding: commit every masked token of the block whose "
        "confidence exceeds this (at least one per step) instead of the fixed schedule. The confidence is the drawn "
        "token's probability, or under remasking: top_prob the distribution's top probability (the same at "
        "temperature 0; it reads no draw, so the committed draws stay the exact score).",
    )
    threshold_floor: Literal["remaining", "schedule"] = Field(
        default="remaining",
        description="With a threshold, the fewest tokens a step commits: 'remaining' = ceil(masked / steps left) "
        "(Fast-dLLM-style; a block always finishes in its steps); 'schedule' = the linear schedule's count for the "
        "step (SDAR's low_confidence_dynamic).")
    edit_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="LLaDA2.1's token editing (token-to-token, beside the threshold's mask-to-token commits): at every "
        "step a committed completion token of the current block is replaced by the step's draw there when the draw "
        "differs and its confidence exceeds this; after the block has no masks left, up to max_post_edit_steps "
        "edit-only steps run, and the block ends at the first that changes nothing. None: no editing. Trains with "
        "algorithm.name agrpo or atpo (exact: every draw the rules read is scored in its recorded state).")
    max_post_edit_steps: int = Field(
        default=16, ge=0,
        description="With edit_threshold, the most edit-only steps a block runs after its last mask is committed "
        "(LLaDA2.1's max_post_steps; its model card recommends 16, and more than 5). Each step is one forward.")
    cfg_scale: float = Field(default=0.0, ge=0.0, description="Classifier-free guidance scale (0 disables).")
    logits_eos_inf: bool = Field(default=False, description="LLaDA option: never sample EOS.")
    confidence_eos_eot_inf: bool = Field(
        default=False, description="LLaDA option: EOS/EoT never win the confidence ranking."
    )
    stop_after_eos: bool = Field(
        default=False,
        description="SDAR's stopping criteria: after each block, a row whose decoded completion holds EOS or the "
        "end-of-turn token stops and the rest is filled with EOS (never sampled); the decode ends when every row "
        "has stopped.",
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
        "the prefix's and the masked suffix's are reused). 'none' runs the full sequence at every step. On the "
        "sequence grid (block-causal models) 'prefix' keeps the finished blocks' keys/values and runs only the "
        "current block: the same function as 'none' there (a block cannot see later ones), as SDAR's decoder does.",
    )
    cache_refresh: int | None = Field(
        default=None,
        ge=1,
        description="With a cache, run the full forward again (and rebuild the cache) every this many steps "
        "inside a block; None: only at the block's first step. Recorded with the trajectory.",
    )
    record_routing: bool = Field(
        default=False,
        description="Mixture-of-experts families (LLaDA2): record every token's chosen experts per MoE layer in "
        "the forwards that scored each step (the step's block, and each finished block's final routing), so the "
        "learner can replay them (learner.routing: replay). Block-causal families only (block_grid: sequence).")
    compile_forward: Literal["none", "default", "reduce-overhead"] = Field(
        default="none",
        description="torch.compile the model's hidden-state forward ('reduce-overhead' adds CUDA graphs, "
        "which pays off at small batch where launch overhead dominates); the LM head and sampling stay eager.",
    )
    kernel: Literal["auto", "triton", "torch"] = Field(
        default="auto", description="Fused sampling kernel: Triton on CUDA, the pure-torch reference elsewhere."
    )
    uniform: UniformConfig = Field(
        default_factory=UniformConfig,
        description="Uniform-noise canvas decoding (DiffusionGemma); the masked families ignore it.")

    @property
    def num_blocks(self) -> int:
        """Blocks the completion spans (the steps budget is split over these)."""
        return -(-self.gen_length // self.block_length)

    @property
    def num_rounds(self) -> int:
        """Blocks the sampler decodes in turn (``block_rounds``); the trajectory has num_rounds x steps_per_block steps."""
        return block_rounds(self.gen_length, self.block_length, self.block_grid)

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def steps_per_round(self) -> int:
        """Step indices a block's round owns: its steps, plus the post-edit steps when editing."""
        return self.steps_per_block + (self.max_post_edit_steps if self.edit_threshold is not None else 0)

    @model_validator(mode="after")
    def _schedule(self) -> "SamplerConfig":
        if self.gen_length % self.block_length and self.block_grid == "completion":
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
        if self.block_grid == "sequence" and (self.cache == "dual" or self.cache_refresh or self.stop_on_eos_block
                                              or self.cfg_scale > 0):
            raise ValueError("block_grid: sequence decodes without a dual cache, cache_refresh, stop_on_eos_block and "
                             "cfg_scale (its cache is 'prefix': the finished blocks' keys/values, exact under "
                             "block-causal attention)")
        if self.open_block == "first_position" and (self.block_grid != "completion" or self.steps_per_block < 2):
            raise ValueError("open_block: first_position needs block_grid completion and at least 2 steps per block "
                             "(the first commits one position, the others the rest)")
        if self.record_routing and self.block_grid != "sequence":
            raise ValueError("record_routing is for block-causal mixtures of experts; set block_grid: sequence")
        if self.stop_after_eos and self.stop_on_eos_block:
            raise ValueError("stop_after_eos and stop_on_eos_block are two stopping rules; set one")
        if self.remasking == "origin" and (self.transfer != "timestep" or self.threshold is not None):
            raise ValueError("remasking: origin is Dream's timestep rule; set transfer: timestep and no threshold")
        if self.edit_threshold is not None and (self.threshold is None or self.block_grid != "sequence"):
            raise ValueError("edit_threshold is LLaDA2.1's joint threshold decoding of block-diffusion models; set "
                             "threshold and block_grid: sequence, or unset edit_threshold")
        if self.top_k is not None and self.temperature == 0.0:
            raise ValueError("top_k has no effect at temperature 0; unset it or raise the temperature")
        return self
