"""LLaDA's config, with the same ``config.json`` keys as LLaDA-8B-Instruct's checkpoint."""
from __future__ import annotations

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """Architecture hyper-parameters. Key names follow LLaDA's (OLMo-derived) config.json."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        weight_tying: bool = False,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        bos_token_id: int | None = 126080,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        # LLaDA's checkpoint keys we read but whose non-default values we do not implement. The public
        # configuration's default bias_for_layer_norm is None, meaning "the same as include_bias".
        if kwargs.get("bias_for_layer_norm", False) is None:
            kwargs["bias_for_layer_norm"] = kwargs.get("include_bias", False)
        for key, supported in (("rope", True), ("alibi", False), ("include_bias", False),
                               ("layer_norm_type", "rms"), ("block_type", "llama"),
                               ("activation_type", "silu"), ("scale_logits", False),
                               ("input_emb_norm", False), ("attention_layer_norm", False),
                               ("include_qkv_bias", False), ("bias_for_layer_norm", False),
                               ("layer_norm_with_affine", True), ("block_group_size", 1)):
            value = kwargs.pop(key, supported)
            if value != supported:
                raise ValueError(f"config.json: {key}={value!r} is not supported (LLaDA uses {supported!r})")
            setattr(self, key, value)
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_parameters_expected(self) -> int:
        """Parameter count implied by the shape (for checking presets against the reference)."""
        d, h, v, kv = self.d_model, self.mlp_hidden_size, self.embedding_size, self.n_kv_heads * self.head_dim
        block = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return v * d * (1 if self.weight_tying else 2) + self.n_layers * block + d
