"""Training checkpoints with torch.distributed.checkpoint (resharded on load), plus the HF-format export.

Layout of one checkpoint, ``<root>/step_<version>/``: DCP shards and ``.metadata`` (the trainable parameters
and their optimizer state, sharded, loadable at any world size), ``rng_rank<r>.pt`` (each rank's RNG states)
and ``unmask_checkpoint.json`` (step, policy version, data position, world size), written last by rank 0 so
a directory without it is an incomplete save and is never picked for resume.

Frozen parameters (a LoRA base) are not saved: every learner build reads them from ``model.path`` (or
rebuilds the seeded preset), so a LoRA checkpoint of LLaDA-8B holds its 167.8M adapter parameters and their
Adam moments (3 x 0.67 GB in fp32), not the 8B unchanged base weights as well.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from common.model import CheckpointError, family_of, save_pretrained, to_dtype

META_FILE = "unmask_checkpoint.json"
STEP_PREFIX = "step_"


def step_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{version:08d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory: ``path`` itself, or the newest complete ``step_*`` inside it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if (path / META_FILE).is_file():
        return path
    complete = sorted(p for p in path.glob(f"{STEP_PREFIX}*") if (p / META_FILE).is_file())
    if not complete:
        raise CheckpointError(f"{path}: no complete checkpoint ({META_FILE} missing here and in every {STEP_PREFIX}*)")
    return complete[-1]


def read_meta(directory: Path) -> dict:
    """The small JSON record of a checkpoint (step, version, the driver's run state, world size)."""
    file = directory / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint record ({e})") from None
    for key in ("step", "version", "run_state"):
        if key not in meta:
            raise CheckpointError(f"{file}: field {key!r} missing")
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: DCP .metadata missing; the checkpoint is incomplete")
    return meta


def _rng_state() -> dict:
    """RNG states as tensors and plain Python values, so they load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _root_cause(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` of the first per-rank failure inside a DCP exception, on one line."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # (exception, stack summary)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def trainable_state(model) -> dict:
    """The checkpointed part of the model's (sharded) state dict: its trainable parameters."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model).items() if k in trainable}


def save_checkpoint(directory: Path, model, optimizer, *, meta: dict, rank: int) -> Path:
    """Collective: every rank writes its shards and RNG state; rank 0 then writes the record."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model": trainable_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    dist.barrier()
    return directory


def load_checkpoint(directory: Path, model, optimizer, *, rank: int) -> dict:
    """Collective: load model + optimizer (resharded to this world size) and this rank's RNG; returns the record.

    A rank with no saved RNG file (the new world size is larger) keeps its seeded RNG. Frozen parameters keep
    the values the learner was built with (checkpoints from before they were left out hold them too; unread).
    """
    meta = read_meta(directory)
    state = {"model": trainable_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures; reduce them to one line that names the directory
        raise CheckpointError(f"{directory}: cannot load checkpoint shards ({_root_cause(e)})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root``; returns what was deleted."""
    complete = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / META_FILE).is_file())
    doomed = complete[:-keep] if keep > 0 else complete
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state on CPU (rank 0 gets tensors; other ranks get an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model, optimizer) -> dict:
    """Collective: the unsharded optimizer state on CPU (on rank 0)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def export_hf(state: dict[str, torch.Tensor], config, directory: str | Path, dtype: str | torch.dtype) -> Path:
    """Write an HF-format checkpoint of the config's family (``common.model.load_pretrained`` reads it) from a
    full state dict."""
    with torch.device("meta"):
        model = family_of(config).model_class(config)
    model.load_state_dict(state, assign=True, strict=True)
    if family_of(config).native:  # transformers' class: tie what its config ties again, cast, write its own way
        model.tie_weights()
        return save_pretrained(model.to(to_dtype(dtype)), directory)
    return save_pretrained(model, directory, dtype=dtype)
