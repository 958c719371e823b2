"""Dream: Qwen2.5's body (q/k/v biases, GQA, untied head) with bidirectional attention; its logits are
shifted by one, as its public ``modeling_dream.py`` is used: the distribution of the token at position i is
read from the logits at column i - 1 (``DreamModel.logit_shift``)."""
from __future__ import annotations

from common.model.qwen import QwenStyleConfig, QwenStyleLM


class DreamConfig(QwenStyleConfig):
    """Dream's config.json (model_type "Dream")."""

    model_type = "Dream"

    def __init__(self, mask_token_id: int = 151666, use_mrope: bool = False, **kwargs):
        super().__init__(mask_token_id=mask_token_id, **kwargs)
        self.use_mrope = use_mrope
        self._refuse(use_mrope=(use_mrope, False))


class DreamModel(QwenStyleLM):
    """Dream's LM under its public class name (``architectures: ["DreamModel"]``)."""

    config_class = DreamConfig
    family = "dream"
    logit_shift = 1
    qkv_bias = True
