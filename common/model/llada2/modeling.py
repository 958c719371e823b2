"""LLaDA2 MoE (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini): a block-diffusion mixture of experts.

The body: fused ``query_key_value`` with per-head q/k RMSNorm, RoPE on the first ``partial_rotary_factor``
of each head, GQA; the first ``first_k_dense_replace`` layers have a dense SwiGLU MLP, the others a sparse
MoE block: a sigmoid router whose expert bias only *selects* experts (group-limited: the ``topk_group`` groups
with the largest top-2 biased scores, then the top ``num_experts_per_tok`` of them), the chosen experts'
unbiased scores renormalised and scaled by ``routed_scaling_factor``, plus one always-on shared expert.
Attention is block-causal on blocks of ``block_size`` positions (the public ``generate``'s mask) and logits
are unshifted. Parameter names are the public checkpoint's (``model.word_embeddings``,
``model.layers.{i}.attention.{query_key_value,query_layernorm,key_layernorm,dense}``,
``model.layers.{i}.mlp.{gate.weight,gate.expert_bias,experts.{e}.*,shared_experts.*}``, ``model.norm``,
``lm_head``).

Routing is part of the policy (``RoutingTape``): a forward can record each token's chosen experts per MoE layer
or replay recorded ones (the gate weights are then recomputed from the current router at the replayed experts).

Shapes: B batch, L sequence, N tokens (B * L), D model width, E experts, K experts per token, H heads,
Hkv key/value heads, Dh head width.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from common.model.base import DiffusionLM
from common.model.layers import RMSNorm, apply_rope, attend, block_output, swiglu
from common.model.sdar.modeling import block_causal_bias


class LLaDA2MoeConfig(PretrainedConfig):
    """LLaDA2's config.json (model_type "llada2_moe") under its public names; ``block_size`` is ours (the public
    code takes it as ``generate(block_length=32)``): the block-causal attention's block."""

    model_type = "llada2_moe"

    def __init__(self, vocab_size: int = 157184, hidden_size: int = 2048, intermediate_size: int = 5120,
                 num_hidden_layers: int = 20, num_attention_heads: int = 16, num_key_value_heads: int = 4,
                 head_dim: int | None = None, hidden_act: str = "silu", use_qkv_bias: bool = False,
                 use_qk_norm: bool = True, use_bias: bool = False, rms_norm_eps: float = 1e-6,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02,
                 max_position_embeddings: int = 32768, rope_theta: float = 600000.0, rope_scaling: dict | None = None,
                 partial_rotary_factor: float = 0.5, num_experts: int = 256, num_shared_experts: int = 1,
                 num_experts_per_tok: int = 8, n_group: int = 8, topk_group: int = 4,
                 routed_scaling_factor: float = 2.5, moe_intermediate_size: int = 512, first_k_dense_replace: int = 1,
                 score_function: str = "sigmoid", moe_router_enable_expert_bias: bool = True,
                 norm_topk_prob: bool = True, use_sliding_window: bool = False, norm_head: bool = False,
                 block_size: int = 32, mask_token_id: int = 156895, pad_token_id: int = 156892,
                 eos_token_id: int = 156892, **kwargs):
        kwargs.pop("attn_implementation", None)
        for key, value in dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                               num_key_value_heads=num_key_value_heads, hidden_act=hidden_act,
                               use_qkv_bias=use_qkv_bias, use_qk_norm=use_qk_norm, use_bias=use_bias,
                               rms_norm_eps=rms_norm_eps, initializer_range=initializer_range,
                               max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
                               partial_rotary_factor=partial_rotary_factor, num_experts=num_experts,
                               num_shared_experts=num_shared_experts, num_experts_per_tok=num_experts_per_tok,
                               n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                               moe_intermediate_size=moe_intermediate_size,
                               first_k_dense_replace=first_k_dense_replace, score_function=score_function,
                               moe_router_enable_expert_bias=moe_router_enable_expert_bias,
                               norm_topk_prob=norm_topk_prob, use_sliding_window=use_sliding_window,
                               norm_head=norm_head, block_size=block_size, mask_token_id=mask_token_id).items():
            setattr(self, key, value)
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        for key, (value, supported) in dict(hidden_act=(hidden_act, "silu"), rope_scaling=(rope_scaling, None),
                                            score_function=(score_function, "sigmoid"),
                                            norm_topk_prob=(norm_topk_prob, True), use_qk_norm=(use_qk_norm, True),
                                            use_sliding_window=(use_sliding_window, False),
                                            norm_head=(norm_head, False)).items():
            if value != supported:
                raise ValueError(f"config.json: {key}={value!r} is not supported by Unmask's llada2_moe code "
                                 f"(it implements {supported!r})")
        if num_experts % n_group or topk_group > n_group or num_experts_per_tok > num_experts // n_group * topk_group:
            raise ValueError(f"config.json: {num_experts} experts in n_group={n_group} groups, topk_group={topk_group} "
                             f"cannot route num_experts_per_tok={num_experts_per_tok}; make n_group divide "
                             "num_experts and leave enough experts in the kept groups")
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id, **kwargs)

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class RoutingTape:
    """Each MoE layer's chosen experts [N, K] for the forwards run under it, in call order (``recorded``), and
    optionally experts to use instead of the router's choice (``replay``: one [N, K] per MoE layer and forward,
    in the same order; -1 entries keep the router's choice). The learner replays what the sampler recorded, so a
    token runs the experts it ran in the rollout."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        self.recorded: list[torch.Tensor] = []
        self.replay = None if replay is None else list(replay)

    def route(self, chosen_NK: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            if not self.replay:
                raise ValueError("routing replay: more MoE forwards than recorded routings; record and replay the "
                                 "same forwards")
            given_NK = self.replay.pop(0).to(chosen_NK.device).reshape(chosen_NK.shape)
            chosen_NK = torch.where(given_NK >= 0, given_NK.to(chosen_NK.dtype), chosen_NK)
        self.recorded.append(chosen_NK)
        return chosen_NK


class LLaDA2Attention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        d, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dim = H, Hkv, Dh, config.rope_dim
        self.query_key_value = nn.Linear(d, (H + 2 * Hkv) * Dh, bias=config.use_qkv_bias)
        self.query_layernorm = RMSNorm(Dh, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(Dh, config.rms_norm_eps)
        self.dense = nn.Linear(H * Dh, d, bias=config.use_bias)

    def _rope(self, x_BHLD, cos, sin):
        """RoPE on the first ``rope_dim`` features of each head, in x's dtype (the rest pass through)."""
        rot, rest = x_BHLD[..., : self.rope_dim], x_BHLD[..., self.rope_dim:]
        return torch.cat([apply_rope(rot, cos, sin, fp32=False), rest], dim=-1)

    def forward(self, h_BLD, cos, sin, attn_bias, cache_kv, query):
        B, L, _ = h_BLD.shape
        qkv = self.query_key_value(h_BLD).view(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        q = self._rope(self.query_layernorm(q), cos, sin)
        k = self._rope(self.key_layernorm(k), cos, sin)
        att, k, v = attend(q, k, v, attn_bias, cache_kv, query)
        return self.dense(att), k, v


class SwiGLU(nn.Module):
    """``down(silu(gate x) * up x)`` with the public names (the dense MLP, each expert, the shared expert)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, h):
        return swiglu(self.gate_proj, self.up_proj, self.down_proj, h)


class LLaDA2Gate(nn.Module):
    """The router: fp32 sigmoid scores; ``expert_bias`` (a buffer, trained by the public code outside the gradient
    to balance load) shifts only which experts are chosen, never their weights."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def choose(self, biased_NE: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k: keep the ``topk_group`` groups with the largest sum of their top-2 scores."""
        N, E = biased_NE.shape
        group_NG = biased_NE.view(N, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        kept_NG = torch.zeros_like(group_NG).scatter_(1, torch.topk(group_NG, self.topk_group, dim=-1, sorted=False)[1], 1)
        kept_NE = kept_NG[:, :, None].expand(N, self.n_group, E // self.n_group).reshape(N, E).bool()
        return torch.topk(biased_NE.masked_fill(~kept_NE, float("-inf")), self.top_k, dim=-1)[1]

    def forward(self, h_ND: torch.Tensor, tape: RoutingTape | None):
        """(chosen experts [N, K], their weights [N, K] in fp32)."""
        scores_NE = torch.sigmoid(F.linear(h_ND.float(), self.weight.float()))
        with torch.no_grad():
            chosen_NK = self.choose(scores_NE + self.expert_bias)
        if tape is not None:
            chosen_NK = tape.route(chosen_NK)
        w_NK = scores_NE.gather(1, chosen_NK)
        if self.top_k > 1:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen_NK, w_NK * self.scale


class LLaDA2SparseMoe(nn.Module):
    """Routed experts plus the shared expert. Each expert runs once on the tokens routed to it (sorted by
    expert, as the public inference path does), so compute scales with K, not E."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2Gate(config)
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
        self.tape: RoutingTape | None = None  # set by ``LLaDA2MoeModelLM.routing``
        self.routed_E: torch.Tensor | None = None  # tokens routed to each expert since ``take_expert_counts``

    def forward(self, h_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = h_BLD.shape
        x_ND = h_BLD.reshape(-1, D)
        chosen_NK, w_NK = self.gate(x_ND, self.tape)
        N, K = chosen_NK.shape
        flat = chosen_NK.reshape(-1)
        order = flat.argsort()
        counts_E = torch.bincount(flat, minlength=len(self.experts))
        self.routed_E = counts_E.detach() if self.routed_E is None else self.routed_E + counts_E.detach()
        chunks = x_ND[order // K].split(counts_E.tolist())
        # every expert runs, an idle one on zero rows: its weights then get a (zero) gradient on every rank, so
        # FSDP2 reduce-scatters the same tensors everywhere (an expert idle on one rank only would not match up)
        out = torch.cat([self.experts[e](chunk) for e, chunk in enumerate(chunks)])
        y_NKD = out[torch.argsort(order)].view(N, K, D)
        y_ND = (y_NKD.to(w_NK.dtype) * w_NK[..., None]).sum(dim=1).to(h_BLD.dtype)
        return y_ND.view(B, L, D) + self.shared_experts(h_BLD)


class LLaDA2Block(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer < config.first_k_dense_replace
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if dense else LLaDA2SparseMoe(config)

    def forward(self, x_BLD, cos, sin, attn_bias, cache_kv=None, query=None, return_kv: bool = False):
        att, k, v = self.attention(self.input_layernorm(x_BLD), cos, sin, attn_bias, cache_kv, query)
        x_BLD = x_BLD + att
        x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
        return block_output(x_BLD, k, v, return_kv)


class LLaDA2Body(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModelLM(DiffusionLM):
    """LLaDA2's LM under its public class name (``architectures: ["LLaDA2MoeModelLM"]``)."""

    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    family = "llada2"
    _no_split_modules = ["LLaDA2Block"]

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_dim, self.n_kv_heads, self.rope_theta = config.head_dim, config.num_key_value_heads, config.rope_theta
        self.rope_dim = config.rope_dim
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LLaDA2Gate):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.expert_bias)
        else:
            super()._init_weights(module)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def moe_layers(self) -> list[LLaDA2SparseMoe]:
        return [block.mlp for block in self.model.layers if isinstance(block.mlp, LLaDA2SparseMoe)]

    @contextmanager
    def routing(self, tape: RoutingTape | None = None):
        """Run the forwards inside under ``tape`` (a fresh recording one by default): record the chosen experts,
        or replay recorded ones."""
        tape = RoutingTape() if tape is None else tape
        for moe in self.moe_layers:
            moe.tape = tape
        try:
            yield tape
        finally:
            for moe in self.moe_layers:
                moe.tape = None

    def replaying(self, routing_BLR: torch.Tensor):
        """Run a forward of [B, L] tokens on the experts ``routing_BLR`` names (R = MoE layers x experts per token,
        layer-major, as ``RoutingTape.recorded`` stacks them; -1: the router chooses)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            raise ValueError("learner.routing: replay cannot run with model.gradient_checkpointing (backward's "
                             "recomputed forward would route afresh); turn one of them off")
        B, L, _ = routing_BLR.shape
        per_layer = routing_BLR.view(B, L, len(self.moe_layers), -1).unbind(2)
        return self.routing(RoutingTape(replay=[r.reshape(B * L, -1) for r in per_layer]))

    def take_expert_counts(self) -> torch.Tensor:
        """Routed slots per expert [E], summed over MoE layers and the forwards since the last call (then reset):
        the expert load, measured where the forward happens."""
        counts = torch.stack([moe.routed_E for moe in self.moe_layers if moe.routed_E is not None]).sum(0)
        for moe in self.moe_layers:
            moe.routed_E = None
        return counts

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_bias(self, attention_mask_BL, position_ids_BQ, key_position_ids_BL):
        return block_causal_bias(position_ids_BQ, self.config.block_size, attention_mask_BL, key_position_ids_BL)
