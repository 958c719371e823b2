"""Load and save HF-format LLaDA checkpoints (config.json + safetensors), offline, no remote code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.model.configuration import LLaDAConfig
from common.model.modeling import LLaDAModelLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the key."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def read_config(path: str | Path) -> LLaDAConfig:
    """Read and check ``config.json`` of a checkpoint directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a LLaDA checkpoint directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if raw.get("model_type") != "llada":
        raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'llada'")
    for key in ("auto_map", "architectures", "transformers_version", "model_type"):
        raw.pop(key, None)
    try:
        return LLaDAConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map')") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    pickled = [name for name in PICKLE_FILES if (directory / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{directory / pickled[0]}: pickled weights are not loaded; convert them to safetensors "
            "(e.g. `python -m driver.convert DIR`) and retry"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
            if type(e).__name__ != "SafetensorError":
                raise
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return tensors


def build_model(config: LLaDAConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                seed: int | None = None) -> LLaDAModelLM:
    """A randomly initialised model (``device='meta'`` builds the shape without memory)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LLaDAModelLM(config)
    return model.to(to_dtype(dtype))


def load_pretrained(path: str | Path, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu") -> LLaDAModelLM:
    """Load an HF-format LLaDA checkpoint directory with LLaDA's key names; no network, no remote code."""
    directory = Path(path)
    config = read_config(directory)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = load_state_dict(directory)
    if config.weight_tying:
        tensors.pop("model.transformer.ff_out.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {tuple(tensors[key].shape)}, config implies {tuple(shape)}"
            )
    target = to_dtype(dtype)
    state = {k: v.to(device=device, dtype=target) for k, v in tensors.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def save_pretrained(model: LLaDAModelLM, path: str | Path, max_shard_bytes: int = 4 << 30,
                    dtype: str | torch.dtype | None = None) -> Path:
    """Write config.json and safetensors shard(s) with LLaDA's key names (readable by ``load_pretrained``)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype=to_dtype(dtype) if dtype else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = model.config.to_dict()
    config["model_type"] = "llada"
    config["architectures"] = ["LLaDAModelLM"]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
