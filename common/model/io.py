"""Load and save HF-format checkpoints of every supported family (config.json + safetensors), offline, no
remote code; the family comes from config.json's ``model_type`` (``common.model.family``).

One path for everything: ``load_pretrained`` / ``<Model>.from_pretrained`` / ``AutoModel.from_pretrained``
all read through ``load_pretrained``, and ``save_pretrained`` / ``model.save_pretrained`` both write the
family's public layout: safetensors shards + ``model.safetensors.index.json`` (one ``model.safetensors`` when
it fits a shard), ``config.json`` (with the public ``auto_map``) and ``generation_config.json``.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.model.family import family_for_type, family_of

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
DEFAULT_SHARD_SIZE = "5GB"  # transformers 4.x's default; LLaDA-8B in bf16 is then 4 shards
# config.json keys that describe the file, not the architecture
_FILE_KEYS = ("auto_map", "architectures", "transformers_version", "model_type")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the key."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def shard_bytes(size: int | str) -> int:
    """``max_shard_size`` as transformers spells it (an int, or "5GB", "500MiB") in bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size {size!r}: give bytes or a size like '5GB' / '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def read_config(path: str | Path):
    """Read and check ``config.json`` of a checkpoint directory: the family's config class, by ``model_type``."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        family = family_for_type(raw.get("model_type"), where=str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for key in _FILE_KEYS:
        raw.pop(key, None)
    try:
        return family.config_class(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _weight_files(directory: Path) -> dict[str, Path] | list[Path]:
    """The index's {key: shard}, or the single safetensors file; one-line errors for anything else."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map')") from None
        return {key: directory / name for key, name in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    pickled = [name for name in PICKLE_FILES if (directory / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{directory / pickled[0]}: pickled weights are not loaded; save them as safetensors (with "
            "transformers: model.save_pretrained(DIR, safe_serialization=True)) and retry"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(file: Path, device: str = "cpu"):
    if not file.is_file():
        raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def tensor_plan(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{key: (file, shape)} of a (possibly sharded) checkpoint, read from the headers only (no tensor data)."""
    directory = Path(path)
    found = _weight_files(directory)
    files = sorted(set(found.values())) if isinstance(found, dict) else found
    plan = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if isinstance(found, dict) and found.get(key) != file:
                    continue  # a shard holding a key the index gives to another shard: the index wins
                plan[key] = (file, tuple(f.get_slice(key).get_shape()))
    if isinstance(found, dict):
        absent = sorted(set(found) - set(plan))
        if absent:
            raise CheckpointError(f"{found[absent[0]]}: tensor {absent[0]!r} is in {INDEX_FILE} but not in the shard")
    return plan


def build_model(config, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                seed: int | None = None):
    """A randomly initialised model of the config's family (``device='meta'`` builds the shape without memory)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = family_of(config).model_class(config)
    return model.to(to_dtype(dtype))


def load_pretrained(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                    config=None):
    """Load an HF-format checkpoint directory of any supported family with its public key names; no network,
    no remote code.

    Keys and shapes are checked from the safetensors headers before any weight is read; then each tensor
    goes from its file straight to ``device`` and ``dtype`` and is assigned into a model built on ``meta``,
    so the host never holds a second copy of the weights.
    """
    directory = Path(path)
    config = config if config is not None else read_config(directory)
    if family_of(config).native:  # tied encoder/decoder weights and the skipped vision tower: transformers' loader
        model = family_of(config).model_class.from_pretrained(directory, config=config, dtype=to_dtype(dtype))
        return model.to(device).eval()
    with torch.device("meta"):
        model = family_of(config).model_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = {k: v for k, v in tensor_plan(directory).items() if k in expected or not _tied_copy(model, k)}
    missing = sorted(set(expected) - set(plan))
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    unexpected = sorted(set(plan) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, shape in expected.items():
        if plan[key][1] != shape:
            raise CheckpointError(f"{directory}: tensor {key!r} has shape {plan[key][1]}, config implies {shape}")
    target = to_dtype(dtype)
    by_file = defaultdict(list)
    for key in expected:
        by_file[plan[key][0]].append(key)
    state = {}
    for file, keys in by_file.items():
        with _open(file, str(torch.device(device))) as f:
            for key in keys:
                tensor = f.get_tensor(key).to(target)
                # a tensor read at the file's byte offset can be misaligned, and CPU matmul kernels then round
                # differently: a loaded model would not compute bit for bit what the saved one did
                state[key] = tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _tied_copy(model, key: str) -> bool:
    """A checkpoint key the model does not hold because its config ties it to the embedding (public
    checkpoints sometimes store the tied output projection anyway)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith(("ff_out.weight", "lm_head.weight"))


def save_pretrained(model, path: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                    dtype: str | torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                    is_main_process: bool = True, safe_serialization: bool = True) -> Path:
    """Write the family's layout: safetensors shard(s) (+ index), config.json, generation_config.json.

    Tensors come to the host one shard at a time (at most ``max_shard_size`` bytes). ``model.save_pretrained(path)``
    is this function.
    """
    directory = Path(path)
    if not safe_serialization:
        raise ValueError("checkpoints are written as safetensors only (safe_serialization=False is not supported)")
    if family_of(model).native:
        if dtype is not None:
            raise ValueError(f"{family_of(model).name}: cast the model first; transformers writes it in its own dtype")
        model.save_pretrained(str(directory), max_shard_size=max_shard_size, state_dict=state_dict,
                              is_main_process=is_main_process)
        return directory
    if not is_main_process:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    target = to_dtype(dtype) if dtype is not None else None
    limit = shard_bytes(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * (target.itemsize if target else tensor.element_size())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(1, len(shards) + 1)]
    total, saved_dtype = 0, None
    for name, keys in zip(names, shards):
        host = {k: state[k].detach().to("cpu", dtype=target or state[k].dtype).contiguous() for k in keys}
        save_file(host, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in host.values())
        saved_dtype = saved_dtype or next(iter(host.values())).dtype
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2, sort_keys=True))
    _write_configs(model.config, directory, saved_dtype)
    return directory


def _write_configs(config, directory: Path, dtype: torch.dtype | None) -> None:
    """config.json with the family's public keys, model_type, architectures and auto_map (+ the dtype written),
    and a generation_config.json of its special ids."""
    from transformers import GenerationConfig

    data = config.to_dict()
    dtype_key = "dtype" if "dtype" in data else "torch_dtype"  # transformers 5 says "dtype", 4.x "torch_dtype"
    for key in ("_name_or_path", "dtype", "torch_dtype"):
        data.pop(key, None)
    family = family_of(config)
    data["model_type"] = family.model_type
    data["architectures"] = list(family.architectures)
    data["auto_map"] = family.export_auto_map()
    if dtype is not None:
        data[dtype_key] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None},
                     mask_token_id=config.mask_token_id).save_pretrained(str(directory))


def from_pretrained(cls: type, name_or_path: str | Path, *model_args, config=None,
                    dtype: str | torch.dtype | None = "auto", torch_dtype: str | torch.dtype | None = None,
                    device_map: str | torch.device | dict | None = None, **kwargs):
    """``<Model>.from_pretrained`` / ``AutoModel.from_pretrained``: ``load_pretrained`` with HF's arguments.

    ``dtype`` "auto" (transformers 5's default) keeps the dtype config.json records (float32 if none);
    ``device_map`` is one device (``"auto"``: the first GPU, else the CPU); a Hub id is downloaded with
    ``huggingface_hub.snapshot_download`` first (``local_files_only`` and ``HF_HUB_OFFLINE`` are honoured).
    """
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments")
    unknown = sorted(set(kwargs) - set(_HUB_KWARGS) - set(_IGNORED_KWARGS))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_pretrained: unsupported argument {unknown[0]!r}")
    directory = Path(name_or_path)
    if not directory.is_dir():
        directory = _download(str(name_or_path), kwargs)
    if config is None:
        config = read_config(directory)
    dtype = torch_dtype if torch_dtype is not None else dtype
    if dtype is None or dtype == "auto":
        recorded = vars(config).get("dtype") or vars(config).get("torch_dtype")  # transformers 5 / 4.x name
        dtype = str(recorded).removeprefix("torch.") if recorded is not None else "float32"
    return load_pretrained(directory, dtype=dtype, device=_device_of(device_map), config=config)


def _device_of(device_map: str | torch.device | dict | None) -> torch.device:
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map {device_map!r}: the model loads onto one device; give one device")
        device_map = devices.pop()
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
_IGNORED_KWARGS = ("trust_remote_code", "_from_auto", "adapter_kwargs", "low_cpu_mem_usage", "use_safetensors",
                   "attn_implementation", "proxies", "subfolder", "code_revision", "_commit_hash")


def _download(repo_id: str, kwargs: dict) -> Path:
    """A Hub snapshot of the files a load reads (weights as safetensors only), via the local cache."""
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.md"],
                                      **hub))
    except (OSError, ValueError) as e:  # huggingface_hub's offline / not-found / bad-id errors, in one line
        raise CheckpointError(f"{repo_id}: not a local directory, and no Hub snapshot could be had "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
