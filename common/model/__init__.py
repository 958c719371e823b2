"""Model families behind one interface (``common.model.family``): LLaDA, Dream, SDAR and LLaDA2 MoE, their configs,
checkpoint I/O and presets.

Importing this package registers every family with transformers' Auto classes under its public
``model_type``, so ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM``
``.from_pretrained(directory)`` load a checkpoint of any of them with our code and no ``trust_remote_code``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from common.model.dgemma.modeling import DiffusionGemmaTextForBlockDiffusion
from common.model.dream.modeling import DreamConfig, DreamModel
from common.model.family import FAMILIES, ModelFamily, family_for_type, family_of, register
from common.model.io import CheckpointError, build_model, load_pretrained, read_config, save_pretrained, to_dtype
from common.model.llada.configuration import LLaDAConfig
from common.model.llada.modeling import LLaDAModelLM, LLaDAOutput
from common.model.llada2.modeling import LLaDA2MoeConfig, LLaDA2MoeModelLM, RoutingTape
from common.model.presets import PRESETS, preset_config
from common.model.sdar.modeling import SDARConfig, SDARForCausalLM

_QWEN_LORA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

register(ModelFamily(
    name="llada", model_type="llada", config_class=LLaDAConfig, model_class=LLaDAModelLM,
    public_repo="GSAI-ML/LLaDA-8B-Instruct",
    auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
              "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    architectures=("LLaDAModelLM",), logit_shift=0, attention="bidirectional",
    lora_targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"),
    mask_token="<|mdm_mask|>", eot_token="<|eot_id|>",
    decoding=dict(remasking="low_confidence", transfer="linear", block_grid="completion"),
))
register(ModelFamily(
    name="dream", model_type="Dream", config_class=DreamConfig, model_class=DreamModel,
    public_repo="Dream-org/Dream-v0-Instruct-7B",
    auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    architectures=("DreamModel",), logit_shift=1, attention="bidirectional", lora_targets=_QWEN_LORA,
    mask_token="<|mask|>", eot_token="<|im_end|>", tokenizer_class="Qwen2TokenizerFast",  # DreamTokenizer: remote code
    decoding=dict(transfer="timestep", block_grid="completion", position_ids="packed"),
))
register(ModelFamily(
    name="sdar", model_type="sdar", config_class=SDARConfig, model_class=SDARForCausalLM,
    public_repo="JetLM/SDAR-8B-Chat",
    auto_map={"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
              "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    architectures=("SDARForCausalLM",), logit_shift=0, attention="block_causal", lora_targets=_QWEN_LORA,
    mask_token="<MASK>", eot_token="<|im_end|>",
    decoding=dict(remasking="low_confidence", transfer="linear", block_grid="sequence", position_ids="packed"),
))
register(ModelFamily(
    name="llada2", model_type="llada2_moe", config_class=LLaDA2MoeConfig, model_class=LLaDA2MoeModelLM,
    public_repo="inclusionAI/LLaDA2.0-mini",
    auto_map={"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig", "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
              "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    architectures=("LLaDA2MoeModelLM",), logit_shift=0, attention="block_causal",
    # every block has these (dense and MoE layers alike); experts are adapted by naming them explicitly
    lora_targets=("attention.query_key_value", "attention.dense"),
    mask_token="<|mask|>", eot_token="<|role_end|>", routed=True,
    # the public generate: blocks of 32 from position 0, 32 steps a block, threshold 0.95 over the linear schedule
    decoding=dict(remasking="low_confidence", transfer="linear", block_grid="sequence", position_ids="packed",
                  threshold=0.95, threshold_floor="schedule", stop_after_eos=True),
))

# DiffusionGemma is transformers' own model (its Auto classes already know it): registered after the loop below,
# so AutoModel keeps transformers' class; ours only leaves the vision tower out.
_DGEMMA = ModelFamily(
    name="dgemma", model_type="diffusion_gemma", config_class=DiffusionGemmaTextForBlockDiffusion.config_class,
    model_class=DiffusionGemmaTextForBlockDiffusion, public_repo="google/diffusiongemma-26B-A4B-it", auto_map={},
    architectures=("DiffusionGemmaForBlockDiffusion",), logit_shift=0, attention="encoder_decoder",
    # v_proj is absent on the full-attention layers (values are the keys there); the experts are 3-D tensors
    lora_targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj"),
    mask_token=None, eot_token=None, decoding=dict(sampler="uniform"), native=True,
)

for _family in FAMILIES.values():
    AutoConfig.register(_family.model_type, _family.config_class, exist_ok=True)
    for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        _auto.register(_family.config_class, _family.model_class, exist_ok=True)

register(_DGEMMA)

__all__ = [
    "FAMILIES", "PRESETS", "CheckpointError", "DreamConfig", "DreamModel", "LLaDA2MoeConfig", "LLaDA2MoeModelLM",
    "LLaDAConfig", "LLaDAModelLM", "RoutingTape",
    "LLaDAOutput", "ModelFamily", "SDARConfig", "SDARForCausalLM", "build_model", "family_for_type", "family_of",
    "load_pretrained", "preset_config", "read_config", "register", "save_pretrained", "to_dtype",
]
