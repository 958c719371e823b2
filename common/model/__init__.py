"""The LLaDA architecture: config, model, checkpoint I/O and presets."""
from common.model.configuration import LLaDAConfig
from common.model.io import CheckpointError, build_model, load_pretrained, read_config, save_pretrained, to_dtype
from common.model.modeling import LLaDAModelLM, LLaDAOutput
from common.model.presets import PRESETS, preset_config

__all__ = [
    "PRESETS", "CheckpointError", "LLaDAConfig", "LLaDAModelLM", "LLaDAOutput", "build_model",
    "load_pretrained", "preset_config", "read_config", "save_pretrained", "to_dtype",
]
