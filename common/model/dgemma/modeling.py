"""DiffusionGemma on transformers' own classes, text only.

transformers ships the model (``DiffusionGemmaForBlockDiffusion``): a causal encoder writes the prompt and
the finished canvases into a KV cache, a bidirectional decoder (the same layer weights) reads it and denoises
a canvas of uniform-noise tokens, self-conditioned on the previous step's logits. We keep its modeling and
only leave the vision tower out (neither built nor loaded). ``decoder_logits`` is the one forward the sampler
and the learner share: the logits a denoising step draws from, at its temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as hf


@dataclass(frozen=True)
class UniformDecoding:
    """The public decoder's settings (``DiffusionGemmaGenerationConfig`` defaults)."""

    max_new_tokens: int = 256  # rounded up to whole canvases
    steps: int = 48  # max_denoising_steps per canvas
    t_min: float = 0.4  # temperature at the last step
    t_max: float = 0.8  # temperature at the first step
    entropy_bound: float = 0.1  # accept the lowest-entropy positions while (their sum - their max) <= this
    stability_threshold: int = 1  # stop a canvas once its argmax repeats this many steps ...
    confidence_threshold: float = 0.005  # ... and its mean entropy is below this


class _TextEncoder(hf.DiffusionGemmaEncoderModel):
    """The encoder without its vision tower and image embedder."""

    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.", r"embed_vision\."]

    def __init__(self, config):
        hf.DiffusionGemmaPreTrainedModel.__init__(self, config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = hf.DiffusionGemmaEncoderTextModel(config=config.text_config)
        self.post_init()


class _TextModel(hf.DiffusionGemmaModel):
    def __init__(self, config):
        hf.DiffusionGemmaPreTrainedModel.__init__(self, config)
        self.encoder = _TextEncoder(config)
        self.decoder = hf.DiffusionGemmaDecoderModel(config)
        self.post_init()


class DiffusionGemmaTextForBlockDiffusion(hf.DiffusionGemmaForBlockDiffusion):
    """``DiffusionGemmaForBlockDiffusion`` (forward and ``generate`` unchanged) with a text-only encoder."""

    family = "dgemma"
    _keys_to_ignore_on_load_unexpected = [r"model\.encoder\.vision_tower\.", r"model\.encoder\.embed_vision\."]

    def __init__(self, config):
        hf.DiffusionGemmaPreTrainedModel.__init__(self, config)
        self.model = _TextModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.final_logit_softcapping = config.text_config.final_logit_softcapping
        self.post_init()

    def encode(self, **kwargs):
        """The encoder's forward (the prompt or a finished canvas into the KV cache), as a method of the model
        itself so that FSDP2 unshards the parameters around it as around ``forward``."""
        return self.model.encoder(**kwargs)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """The families' switch, on transformers' own gradient checkpointing."""
        if enabled:
            self.activation_checkpointing_enable()
        else:
            self.activation_checkpointing_disable()

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The decoder's layers (LoRA adapts them; the learner shards the model as one unit, since the encoder's
        layers share these weights)."""
        return self.model.decoder.layers

    @property
    def tied_blocks(self) -> torch.nn.ModuleList:
        """The encoder's layers, parallel to ``blocks`` and holding the same parameters: an adapter put into a
        decoder layer goes into its encoder twin too (``learner.lora.apply_lora``)."""
        return self.model.encoder.language_model.layers


def temperature(remaining: int, d: UniformDecoding) -> torch.Tensor:
    """The public linear schedule at a step with ``remaining`` steps left (``d.steps`` at the first, 1 at the
    last), computed in float32 from an int32 step as the public decoder does, so the scaled logits are bitwise its."""
    return d.t_min + ((d.t_max - d.t_min) * (torch.tensor(remaining, dtype=torch.int32) / d.steps))


class EncoderCache:
    """The encoder's KV cache over the prompt and the finished canvases, read the way the public ``generate``
    reads it (prompt prefilled, then one canvas at a time), so the decoder sees bitwise the sampler's keys."""

    def __init__(self, model, prompt_mask_BP: torch.Tensor):
        """``prompt_mask_BP``: real (1) and padding (0) prompt tokens; positions count columns, as ``generate``'s."""
        from transformers import DynamicCache

        self.model, self.C = model, model.config.canvas_length
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.keys = prompt_mask_BP.bool()
        P = prompt_mask_BP.shape[1]
        self.position_ids = torch.arange(0, P, dtype=torch.int32, device=prompt_mask_BP.device)[None]

    def read(self, new_ids_BL: torch.Tensor):
        """Append ``new_ids_BL`` (the prompt, then each canvas) to the cache; returns the next canvas's decoder
        mask mapping and position ids [1, C]."""
        B, L = new_ids_BL.shape
        if self.cache.get_seq_length() > 0:
            self.keys = torch.nn.functional.pad(self.keys, (0, L), value=True)
        encoder = self.model.model.encoder
        empty = torch.empty(B, L, 0, dtype=self.model.dtype, device=new_ids_BL.device)
        mask = encoder.create_masks_for_generate(config=self.model.config, inputs_embeds=empty,
                                                 attention_mask=self.keys, cache=self.cache,
                                                 position_ids=self.position_ids)
        self.model.encode(input_ids=new_ids_BL.clone(memory_format=torch.contiguous_format), attention_mask=mask,
                          cache=self.cache, position_ids=self.position_ids)
        start = int(self.position_ids[0, -1]) + 1
        self.position_ids = torch.arange(start, start + self.C, dtype=torch.int32, device=new_ids_BL.device)[None]
        decoder_keys = torch.nn.functional.pad(self.keys, (0, self.C), value=True)
        canvas_shape = torch.empty(B, self.C, 1, dtype=torch.long, device=new_ids_BL.device)
        mapping = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config, inputs_embeds=canvas_shape, cache=self.cache, decoder_attention_mask=decoder_keys)
        return mapping, self.position_ids


def decoder_logits(model, canvas_BC, sc_logits_BCV, cache, mask_mapping, position_ids_BC, temp: torch.Tensor):
    """Temperature-scaled float32 logits [B, C, V] of one denoising step: the decoder on ``canvas_BC`` over the
    encoder ``cache``, self-conditioned on ``sc_logits_BCV`` (None at a canvas's first step)."""
    raw = model(decoder_input_ids=canvas_BC, self_conditioning_logits=sc_logits_BCV, cache=cache,
                decoder_attention_mask=mask_mapping, decoder_position_ids=position_ids_BC).logits
    return raw / temp


def dgemma_config(canvas_length: int = 256, **text):
    """A text-only ``DiffusionGemmaConfig``: ``text`` fills its ``DiffusionGemmaTextConfig``."""
    return hf.DiffusionGemmaConfig(text_config=hf.DiffusionGemmaTextConfig(**text), canvas_length=canvas_length)
