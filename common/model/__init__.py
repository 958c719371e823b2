"""The LLaDA architecture: config, model, checkpoint I/O and presets.

Importing this package registers LLaDA with transformers' Auto classes (model_type "llada"), so
``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` (the class LLaDA's
public ``auto_map`` names) ``.from_pretrained(directory)`` load a LLaDA checkpoint with our code and no
``trust_remote_code``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from common.model.configuration import LLaDAConfig
from common.model.io import CheckpointError, build_model, load_pretrained, read_config, save_pretrained, to_dtype
from common.model.modeling import LLaDAModelLM, LLaDAOutput
from common.model.presets import PRESETS, preset_config

AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = [
    "PRESETS", "CheckpointError", "LLaDAConfig", "LLaDAModelLM", "LLaDAOutput", "build_model",
    "load_pretrained", "preset_config", "read_config", "save_pretrained", "to_dtype",
]
