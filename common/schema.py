"""The trajectory wire format: one versioned Arrow schema, defined here and nowhere else.

One row per sample; one prompt's G samples travel as one RecordBatch (a *group*) and are never split.
Letters: B samples, P prompt length (left-padded on the torch side), G completion length, T denoising
steps, K banned ids.

Column notes:
- ``prompt_ids`` holds the real prompt tokens only (no padding); the learner re-pads on its side.
- Per-token columns (``completion_ids``, ``unmask_step``, ``logp``, ``entropy``, ``margin``, ``cutoff``)
  have G entries per row; per-step columns (``step_entropy``, ``step_margin``, ``step_committed``) T.
  ``unmask_step`` and ``step_committed`` are int16 (T and block sizes stay far below 32767; checked).
- ``reward_components`` is a ``map<string, float32>``: tasks name their own components (format,
  correctness, length...) and a map needs no schema change when a task adds one.
- ``gen_seconds`` / ``reward_seconds`` are the whole group's wall times, repeated on each of its rows.
- ``created_at`` is the UTC time the group was converted, in microseconds.
- Discarded draws (v3): ``discard_counts`` (G int16 per row) says how many steps of its block each
  position was drawn at and not committed; ``discard_ids`` / ``discard_logp`` hold those draws, position
  by position and step by step within a position (the s-th entry of a position is the s-th step of its
  block); ``discard_cutoff`` is parallel to them, or empty when the sampler cut no support (no
  top-k/top-p). ``commit_reads_draws``: the commit rule looked at the drawn tokens. ``discard_rb_logp`` (v6):
  parallel to them or empty, each draw's Rao-Blackwellised behaviour log-prob (``common.rao_blackwell``).
- ``block_grid`` (v4): where the sampler's blocks started, "completion" (at the completion's first token) or
  "sequence" (every block_length positions from the prompt's first token: block diffusion, SDAR).
- Routing (v5, mixtures of experts with ``sampler.record_routing``; empty lists and ``routing_width`` 0
  otherwise): ``routing_width`` R = MoE layers x experts per token; ``routing_settled`` each real column's
  (prompt, then completion) experts once its block was finished, R per column, layer-major, -1 where never
  recorded (the last block); ``routing_step`` the step's block columns in the forward that scored it, T x K x R.
  The learner replays them (``learner.routing: replay``) or lets the router choose again (``recompute``).
- Canvases (v6, uniform-noise decoding: DiffusionGemma; empty lists otherwise): ``canvas_shape`` [K canvases,
  S steps a canvas, C canvas length]; per step ``canvas_active`` (the row was still denoising) and
  ``canvas_logp`` (behaviour log-prob of the accepted draws), K x S; per step and position ``canvas_tokens``
  (what the decoder read), ``canvas_draws`` and ``canvas_accepted``, K x S x C; ``canvas_t_range`` the
  temperature schedule's [t_min, t_max]. The per-step columns above then hold the K x S canvas steps.
- Token editing (v7, LLaDA2.1's ``sampler.edit_threshold``; empty lists otherwise), T x K per row (K the block
  length, the step's block window in column order): ``edit_before`` the tokens the block held before the step,
  ``edit_draws`` the draw the step's rules read there (-1: none), ``edit_logp`` / ``edit_cutoff`` its behaviour
  log-prob and support cut-off. ``completion_ids`` holds the final tokens and ``unmask_step`` each position's first
  commit.
"""
from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.config.sampler import block_rounds

if TYPE_CHECKING:
    import torch

    from common.trajectory import Trajectory

# torch is imported inside the two conversion functions only: the replay queue actor needs the schema and
# validate_group but never torch, and importing torch costs seconds and hundreds of MB per actor.

SCHEMA_VERSION = 7  # v2: `filled` and `position_ids`; v3: the discarded draws (exact score function), `cache`;
# v4: `block_grid`, `open_block`; v5: the routing of mixtures of experts; v6: uniform-noise canvases, `discard_rb_logp`;
# v7: token editing
VERSION_KEY = b"unmask.schema_version"
TIMING_KEYS = ("gen_seconds", "reward_seconds")
_INT16_MAX = np.iinfo(np.int16).max

_i32, _f32 = pa.int32(), pa.float32()
SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("sample_index", _i32, nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(_i32), nullable=False),
        pa.field("completion_ids", pa.list_(_i32), nullable=False),
        pa.field("unmask_step", pa.list_(pa.int16()), nullable=False),
        pa.field("logp", pa.list_(_f32), nullable=False),
        pa.field("entropy", pa.list_(_f32), nullable=False),
        pa.field("margin", pa.list_(_f32), nullable=False),
        pa.field("cutoff", pa.list_(_f32), nullable=False),
        pa.field("step_entropy", pa.list_(_f32), nullable=False),
        pa.field("step_margin", pa.list_(_f32), nullable=False),
        pa.field("step_committed", pa.list_(pa.int16()), nullable=False),
        pa.field("reward", _f32, nullable=False),
        pa.field("reward_components", pa.map_(pa.string(), _f32), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("worker_id", pa.string(), nullable=False),
        pa.field("temperature", _f32, nullable=False),
        pa.field("block_length", _i32, nullable=False),
        pa.field("banned_ids", pa.list_(_i32), nullable=False),
        pa.field("filled", pa.list_(pa.bool_()), nullable=False),  # EOS filled by stop_on_eos_block, never sampled
        pa.field("position_ids", pa.string(), nullable=False),  # "absolute" (LLaDA's) or "packed"
        pa.field("cache", pa.string(), nullable=False),  # the sampler's block KV cache: none / prefix / dual
        pa.field("cache_refresh", _i32, nullable=False),  # full forward every r steps in a block (0: first only)
        pa.field("discard_counts", pa.list_(pa.int16()), nullable=False),
        pa.field("discard_ids", pa.list_(_i32), nullable=False),
        pa.field("discard_logp", pa.list_(_f32), nullable=False),
        pa.field("discard_cutoff", pa.list_(_f32), nullable=False),
        pa.field("discard_rb_logp", pa.list_(_f32), nullable=False),
        pa.field("commit_reads_draws", pa.bool_(), nullable=False),
        pa.field("block_grid", pa.string(), nullable=False),
        pa.field("open_block", pa.string(), nullable=False),  # what a block's first step commits: schedule / first_position
        pa.field("routing_width", _i32, nullable=False),
        pa.field("routing_settled", pa.list_(pa.int16()), nullable=False),
        pa.field("routing_step", pa.list_(pa.int16()), nullable=False),
        pa.field("canvas_shape", pa.list_(_i32), nullable=False),
        pa.field("canvas_active", pa.list_(pa.bool_()), nullable=False),
        pa.field("canvas_logp", pa.list_(_f32), nullable=False),
        pa.field("canvas_tokens", pa.list_(_i32), nullable=False),
        pa.field("canvas_draws", pa.list_(_i32), nullable=False),
        pa.field("canvas_accepted", pa.list_(pa.bool_()), nullable=False),
        pa.field("canvas_t_range", pa.list_(_f32), nullable=False),
        pa.field("edit_before", pa.list_(_i32), nullable=False),
        pa.field("edit_draws", pa.list_(_i32), nullable=False),
        pa.field("edit_logp", pa.list_(_f32), nullable=False),
        pa.field("edit_cutoff", pa.list_(_f32), nullable=False),
        pa.field("gen_seconds", _f32, nullable=False),
        pa.field("reward_seconds", _f32, nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
PER_TOKEN = ("completion_ids", "unmask_step", "logp", "entropy", "margin", "cutoff")
PER_STEP = ("step_entropy", "step_margin", "step_committed")


# --- writing (rollout side)


def _fixed_list(values_BX: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """A list column whose every row has the same length X, from a [B, X] array (one copy, no loop)."""
    B, X = values_BX.shape
    offsets = pa.array(np.arange(B + 1, dtype=np.int32) * X, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values_BX.reshape(-1), arrow_type))


def _int16(name: str, values: "torch.Tensor") -> np.ndarray:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > _INT16_MAX):
        raise ValueError(f"{name} must lie in [0, {_INT16_MAX}] to fit the schema's int16 column")
    return values.numpy().astype(np.int16)


def _discard_columns(traj: Trajectory) -> dict[str, pa.Array]:
    """The [B, G, S] discarded-draw tensors as ragged rows (only the slots that hold a draw)."""
    B, G = traj.completion_ids_BG.shape
    if traj.discard_ids_BGS is None:
        counts_BG = np.zeros((B, G), dtype=np.int16)
        empty = pa.ListArray.from_arrays(pa.array(np.zeros(B + 1, dtype=np.int32)), pa.array([], _i32))
        return {"discard_counts": _fixed_list(counts_BG, pa.int16()), "discard_ids": empty,
                "discard_logp": empty.cast(pa.list_(_f32)), "discard_cutoff": empty.cast(pa.list_(_f32)),
                "discard_rb_logp": empty.cast(pa.list_(_f32))}
    ids_BGS = traj.discard_ids_BGS.numpy()
    has_BGS = ids_BGS >= 0
    counts_BG = has_BGS.sum(-1)
    assert (has_BGS == (np.arange(ids_BGS.shape[2]) < counts_BG[..., None])).all(), "draws must fill slots 0.."
    offsets = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(counts_BG.sum(-1), out=offsets[1:])
    offsets = pa.array(offsets)

    def ragged(values_BGS: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values_BGS[has_BGS], arrow_type))

    def ragged_or_empty(values_BGS) -> pa.ListArray:  # optional columns: parallel to the draws, or empty
        if values_BGS is None:
            return pa.ListArray.from_arrays(pa.array(np.zeros(B + 1, dtype=np.int32)), pa.array([], _f32))
        return ragged(values_BGS.float().numpy(), _f32)

    return {
        "discard_counts": _fixed_list(counts_BG.astype(np.int16), pa.int16()),
        "discard_ids": ragged(ids_BGS.astype(np.int32), _i32),
        "discard_logp": ragged(traj.discard_logp_BGS.float().numpy(), _f32),
        "discard_cutoff": ragged_or_empty(traj.discard_cutoff_BGS),
        "discard_rb_logp": ragged_or_empty(traj.discard_rb_logp_BGS),
    }


def _routing_columns(traj: Trajectory) -> dict[str, pa.Array]:
    """The sampler's routing record: settled routing of the real columns (ragged by prompt), the steps' (fixed)."""
    B = len(traj)
    settled_BLR, step_BTKR = traj.extras.get("routing_settled_BLR"), traj.extras.get("routing_step_BTKR")
    if step_BTKR is None:
        empty = pa.ListArray.from_arrays(pa.array(np.zeros(B + 1, dtype=np.int32)), pa.array([], pa.int16()))
        return {"routing_width": pa.array(np.zeros(B, dtype=np.int32)), "routing_settled": empty, "routing_step": empty}
    R = settled_BLR.shape[-1]
    real_BL = _real_columns(traj)
    offsets = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(real_BL.sum(1) * R, out=offsets[1:])
    settled = settled_BLR.numpy().astype(np.int16)[real_BL].reshape(-1)
    return {"routing_width": pa.array(np.full(B, R, dtype=np.int32)),
            "routing_settled": pa.ListArray.from_arrays(pa.array(offsets), pa.array(settled, pa.int16())),
            "routing_step": _fixed_list(step_BTKR.numpy().astype(np.int16).reshape(B, -1), pa.int16())}


CANVAS = {"canvas_active": ("active_BKS", pa.bool_()), "canvas_logp": ("step_logp_BKS", _f32),
          "canvas_tokens": ("canvas_BKSC", _i32), "canvas_draws": ("draws_BKSC", _i32),
          "canvas_accepted": ("accepted_BKSC", pa.bool_())}


def _canvas_columns(traj: Trajectory) -> dict[str, pa.Array]:
    """A uniform-noise rollout's record (``rollout.uniform_sampler.canvas_trajectory``), or empty lists."""
    B = len(traj)
    if "canvas_BKSC" not in traj.extras:
        empty = pa.array([[]] * B, pa.list_(_i32))
        return {"canvas_shape": empty, **{name: pa.array([[]] * B, pa.list_(t)) for name, (_, t) in CANVAS.items()},
                "canvas_t_range": pa.array([[]] * B, pa.list_(_f32))}
    shape = np.asarray(traj.extras["canvas_BKSC"].shape[1:], dtype=np.int32)
    columns = {"canvas_shape": _fixed_list(np.tile(shape, (B, 1)), _i32)}
    for name, (key, arrow_type) in CANVAS.items():
        value = traj.extras[key].cpu()
        columns[name] = _fixed_list(value.numpy().reshape(B, -1).astype(arrow_type.to_pandas_dtype()), arrow_type)
    t_range = np.tile(np.asarray(traj.extras["canvas_t_range"], dtype=np.float32), (B, 1))
    return {**columns, "canvas_t_range": _fixed_list(t_range, _f32)}


EDIT = {"edit_before": ("edit_before_BTK", _i32), "edit_draws": ("edit_draws_BTK", _i32),
        "edit_logp": ("edit_logp_BTK", _f32), "edit_cutoff": ("edit_cutoff_BTK", _f32)}


def _edit_columns(traj: Trajectory) -> dict[str, pa.Array]:
    """A token-editing rollout's record (``rollout.sampler``'s ``edit_*_BTK``), or empty lists."""
    B = len(traj)
    if "edit_draws_BTK" not in traj.extras:
        return {name: pa.array([[]] * B, pa.list_(t)) for name, (_, t) in EDIT.items()}
    return {name: _fixed_list(traj.extras[key].cpu().numpy().reshape(B, -1).astype(t.to_pandas_dtype()), t)
            for name, (key, t) in EDIT.items()}


def _real_columns(traj: Trajectory) -> np.ndarray:
    """[B, P + G] bool: the real (non-padding) columns of the sampler's sequence."""
    B, G = traj.completion_ids_BG.shape
    return np.concatenate([traj.prompt_mask_BP.numpy().astype(bool), np.ones((B, G), dtype=bool)], axis=1)


def group_to_record_batch(
    traj: Trajectory,
    *,
    group_id: str,
    task: str,
    worker_id: str,
    policy_version: int,
    rewards: list[float],
    correct: list[bool],
    components: dict[str, list[float]],
    timings: dict[str, float],
) -> pa.RecordBatch:
    """One prompt's G samples (``traj`` holds exactly those rows) as one validated RecordBatch.

    ``timings`` has the group's ``gen_seconds`` and ``reward_seconds``; ``components`` maps each reward
    component name to its G values.
    """
    traj = traj.to("cpu")
    B = len(traj)
    _check_group_inputs(B, rewards, correct, components, timings)
    prompt_col, comp_col = _prompt_column(traj), _components_column(components, B)
    banned = np.asarray(traj.banned_ids, dtype=np.int32).reshape(1, -1).repeat(B, axis=0)
    filled_BG = traj.extras.get("filled_BG")
    filled = (filled_BG.cpu().numpy().astype(bool) if filled_BG is not None
              else np.zeros(tuple(traj.completion_ids_BG.shape), dtype=bool))
    now = _dt.datetime.now(_dt.timezone.utc)

    columns = {
        "group_id": pa.array([group_id] * B, pa.string()),
        "sample_index": pa.array(np.arange(B, dtype=np.int32)),
        "task": pa.array([task] * B, pa.string()),
        "prompt_ids": prompt_col,
        "completion_ids": _fixed_list(traj.completion_ids_BG.numpy().astype(np.int32), _i32),
        "unmask_step": _fixed_list(_int16("unmask_step", traj.unmask_step_BG), pa.int16()),
        "logp": _fixed_list(traj.logp_BG.float().numpy(), _f32),
        "entropy": _fixed_list(traj.entropy_BG.float().numpy(), _f32),
        "margin": _fixed_list(traj.margin_BG.float().numpy(), _f32),
        "cutoff": _fixed_list(traj.cutoff_BG.float().numpy(), _f32),
        "step_entropy": _fixed_list(traj.step_entropy_BT.float().numpy(), _f32),
        "step_margin": _fixed_list(traj.step_margin_BT.float().numpy(), _f32),
        "step_committed": _fixed_list(_int16("step_committed", traj.step_committed_BT), pa.int16()),
        "reward": pa.array(np.asarray(rewards, dtype=np.float32)),
        "reward_components": comp_col,
        "correct": pa.array(np.asarray(correct, dtype=bool)),
        "policy_version": pa.array(np.full(B, policy_version, dtype=np.int64)),
        "worker_id": pa.array([worker_id] * B, pa.string()),
        "temperature": pa.array(np.full(B, traj.temperature, dtype=np.float32)),
        "block_length": pa.array(np.full(B, traj.block_length, dtype=np.int32)),
        "banned_ids": _fixed_list(banned, _i32),
        "filled": _fixed_list(filled, pa.bool_()),
        "position_ids": pa.array([str(traj.extras.get("position_ids", "absolute"))] * B, pa.string()),
        "cache": pa.array([str(traj.extras.get("cache", "none"))] * B, pa.string()),
        "cache_refresh": pa.array(np.full(B, traj.extras.get("cache_refresh") or 0, dtype=np.int32)),
        **_discard_columns(traj),
        "commit_reads_draws": pa.array(np.full(B, traj.commit_reads_draws, dtype=bool)),
        "block_grid": pa.array([traj.block_grid] * B, pa.string()),
        "open_block": pa.array([str(traj.extras.get("open_block", "schedule"))] * B, pa.string()),
        **_routing_columns(traj),
        **_canvas_columns(traj),
        **_edit_columns(traj),
        "gen_seconds": pa.array(np.full(B, timings["gen_seconds"], dtype=np.float32)),
        "reward_seconds": pa.array(np.full(B, timings["reward_seconds"], dtype=np.float32)),
        "created_at": pa.array([now] * B, pa.timestamp("us", tz="UTC")),
    }
    rb = pa.RecordBatch.from_arrays(list(columns.values()), schema=SCHEMA)
    validate_group(rb)
    return rb


def _check_group_inputs(B: int, rewards, correct, components: dict, timings: dict) -> None:
    if B == 0:
        raise ValueError("group_to_record_batch needs at least one sample")
    if len(rewards) != B or len(correct) != B:
        raise ValueError(f"rewards and correct need one entry per sample ({B}), got {len(rewards)} and {len(correct)}")
    for name, values in components.items():
        if len(values) != B:
            raise ValueError(f"reward component {name!r} has {len(values)} values, expected one per sample ({B})")
    if set(timings) != set(TIMING_KEYS):
        raise ValueError(f"timings must have exactly the keys {TIMING_KEYS}, got {sorted(timings)}")


def _prompt_column(traj: Trajectory) -> pa.ListArray:
    """Prompts without their left padding (one boolean gather; offsets from the per-row counts)."""
    mask_BP = traj.prompt_mask_BP.bool()
    prompt_len_B = mask_BP.sum(dim=1).numpy().astype(np.int32)
    prompt_offsets = np.zeros(len(prompt_len_B) + 1, dtype=np.int32)
    np.cumsum(prompt_len_B, out=prompt_offsets[1:])
    prompt_values = traj.prompt_ids_BP[mask_BP].numpy().astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(prompt_offsets), pa.array(prompt_values, _i32))


def _components_column(components: dict[str, list[float]], B: int) -> pa.MapArray:
    names = list(components)
    comp_values = np.asarray([components[n] for n in names], dtype=np.float32).reshape(len(names), B)
    comp_offsets = np.arange(B + 1, dtype=np.int32) * len(names)
    return pa.MapArray.from_arrays(
        pa.array(comp_offsets), pa.array(np.tile(np.asarray(names, dtype=object), B), pa.string()),
        pa.array(comp_values.T.reshape(-1), _f32),  # row-major: sample b's components are contiguous
    )


# --- validation


def check_schema(schema: pa.Schema) -> None:
    """Reject anything that is not this module's schema at ``SCHEMA_VERSION`` (ValueError)."""
    meta = schema.metadata or {}
    if VERSION_KEY not in meta:
        raise ValueError("not an unmask trajectory batch: schema metadata lacks 'unmask.schema_version'")
    found = meta[VERSION_KEY].decode()
    if found != str(SCHEMA_VERSION):
        raise ValueError(
            f"trajectory schema version {found} but this code reads version {SCHEMA_VERSION}; "
            "convert the data or run the matching code version"
        )
    if not schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(f"trajectory columns differ from common.schema.SCHEMA v{SCHEMA_VERSION}: {schema}")


def _lengths(col: pa.Array) -> np.ndarray:
    return np.diff(col.offsets.to_numpy())


def validate_group(rb: pa.RecordBatch) -> None:
    """Schema/version check, exactly one group_id, no nulls, consistent list lengths (ValueError)."""
    check_schema(rb.schema)
    B = rb.num_rows
    if B == 0:
        raise ValueError("a trajectory group needs at least one row")
    for name in SCHEMA.names:
        if rb.column(name).null_count:
            raise ValueError(f"column {name!r} has nulls; every field of a sample must be filled")
    if pc.count_distinct(rb.column("group_id")).as_py() != 1:
        raise ValueError("a RecordBatch must hold exactly one group_id (one prompt's samples)")
    index = np.sort(rb.column("sample_index").to_numpy())
    if not np.array_equal(index, np.arange(B)):
        raise ValueError(f"sample_index must be 0..{B - 1} once each, got {index.tolist()}")
    token_len = _lengths(rb.column("completion_ids"))
    if (token_len != token_len[0]).any():
        raise ValueError(f"completions in one group must share a length, got {token_len.tolist()}")
    for name in PER_TOKEN[1:]:
        if not np.array_equal(_lengths(rb.column(name)), token_len):
            raise ValueError(f"{name} must have one entry per completion token ({token_len[0]})")
    step_len = _lengths(rb.column("step_entropy"))
    if (step_len != step_len[0]).any():
        raise ValueError(f"step columns in one group must share T, got {step_len.tolist()}")
    for name in PER_STEP[1:]:
        if not np.array_equal(_lengths(rb.column(name)), step_len):
            raise ValueError(f"{name} must have one entry per denoising step ({step_len[0]})")
    if not np.array_equal(_lengths(rb.column("discard_counts")), token_len):
        raise ValueError(f"discard_counts must have one entry per completion token ({token_len[0]})")
    counts = rb.column("discard_counts")
    starts = counts.offsets.to_numpy()[:-1] - counts.offsets[0].as_py()  # a sliced column's offsets start > 0
    n_draws = (np.add.reduceat(counts.flatten().to_numpy().astype(np.int64), starts) if token_len[0]
               else np.zeros(B, dtype=np.int64))
    for name in ("discard_ids", "discard_logp"):
        if not np.array_equal(_lengths(rb.column(name)), n_draws):
            raise ValueError(f"{name} must hold sum(discard_counts) entries per row ({n_draws.tolist()})")
    for name in ("discard_cutoff", "discard_rb_logp"):
        optional_len = _lengths(rb.column(name))
        if optional_len.any() and not np.array_equal(optional_len, n_draws):
            raise ValueError(f"{name} must be empty or hold one value per discarded draw")
    width = rb.column("routing_width").to_numpy()
    want = width * step_len[0] * rb.column("block_length").to_numpy()
    if not np.array_equal(_lengths(rb.column("routing_step")), want):
        raise ValueError("routing_step must hold T x block_length x routing_width entries per row (none unrecorded)")
    _validate_canvases(rb, step_len[0])
    edit_len = {name: _lengths(rb.column(name)) for name in EDIT}
    if any(n.any() for n in edit_len.values()):
        want = step_len[0] * rb.column("block_length").to_numpy()
        for name, n in edit_len.items():
            if not np.array_equal(n, want):
                raise ValueError(f"{name} must hold T x block_length entries per row on a token-editing rollout")
    steps = rb.column("unmask_step").flatten().to_numpy()
    if steps.size and (steps.min() < 0 or steps.max() >= step_len[0]):
        raise ValueError(f"unmask_step values must lie in [0, T={step_len[0]})")


def _validate_canvases(rb: pa.RecordBatch, T: int) -> None:
    shape_len = _lengths(rb.column("canvas_shape"))
    if not shape_len.any():
        if any(_lengths(rb.column(name)).any() for name in [*CANVAS, "canvas_t_range"]):
            raise ValueError("canvas columns without a canvas_shape; fill canvas_shape [K, S, C] or none of them")
        return
    if (shape_len != 3).any():
        raise ValueError("canvas_shape must hold [K, S, C] on every row of a canvas rollout")
    shapes = rb.column("canvas_shape").flatten().to_numpy().reshape(-1, 3)
    if (shapes != shapes[0]).any():
        raise ValueError("canvas_shape must be the same on every row of a group")
    K, S, C = (int(x) for x in shapes[0])
    if T != K * S:
        raise ValueError(f"a canvas rollout has K x S = {K * S} steps, but its step columns hold {T}")
    for name, want in [("canvas_active", K * S), ("canvas_logp", K * S), ("canvas_tokens", K * S * C),
                       ("canvas_draws", K * S * C), ("canvas_accepted", K * S * C), ("canvas_t_range", 2)]:
        if (_lengths(rb.column(name)) != want).any():
            raise ValueError(f"{name} must hold {want} entries per row (canvas_shape {[K, S, C]})")


# --- reading (learner side)


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _uniform_list(table: pa.Table, name: str, B: int) -> np.ndarray:
    """A list column whose rows all have one length, as a [B, X] numpy view of the flattened values."""
    col = _column(table, name)
    lengths = _lengths(col)
    if (lengths != lengths[0]).any():
        raise ValueError(f"{name} rows differ in length ({lengths.min()}..{lengths.max()}); batch one run's groups")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(B, int(lengths[0]))


def _uniform_scalar(table: pa.Table, name: str):
    values = _column(table, name).to_numpy(zero_copy_only=False)
    if (values != values[0]).any():
        raise ValueError(f"{name} differs across rows; one learner batch must use one sampler setting")
    return values[0].item() if isinstance(values[0], np.generic) else values[0]


def _left_pad(col: pa.ListArray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged list rows → ([B, P] left-padded int64, [B, P] bool mask), scattered in one vectorised step."""
    lengths_B = _lengths(col)
    B, P = len(lengths_B), int(lengths_B.max(initial=0))
    values = col.flatten().to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(B), lengths_B)
    starts = np.repeat(np.cumsum(lengths_B) - lengths_B, lengths_B)
    pos_in_row = np.arange(values.size) - starts
    col_index = np.repeat(P - lengths_B, lengths_B) + pos_in_row
    ids_BP = np.full((B, P), pad_id, dtype=np.int64)
    mask_BP = np.zeros((B, P), dtype=bool)
    ids_BP[row, col_index] = values
    mask_BP[row, col_index] = True
    return ids_BP, mask_BP


def _reward_components(table: pa.Table, B: int) -> dict[str, "torch.Tensor"]:
    """map column → {name: float32 [B]} with NaN where a row lacks the component."""
    import torch

    col = _column(table, "reward_components")
    keys = col.keys.to_numpy(zero_copy_only=False)
    items = col.items.to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(B), _lengths(col))
    out = {}
    for name in np.unique(keys) if keys.size else []:
        values_B = np.full(B, np.nan, dtype=np.float32)
        hit = keys == name
        values_B[row[hit]] = items[hit]
        out[str(name)] = torch.from_numpy(values_B)
    return out


def _discards(table: pa.Table, B: int, G: int, S: int) -> dict[str, "torch.Tensor | None"]:
    """The ragged discard columns back to dense [B, G, S] tensors (-1 ids, 0 logp, -inf cut-off elsewhere)."""
    import torch

    counts_BG = _uniform_list(table, "discard_counts", B).astype(np.int64)
    if counts_BG.size and counts_BG.max(initial=0) > S:
        raise ValueError(f"a position has {counts_BG.max()} discarded draws but its block has only {S + 1} steps")
    has_BGS = np.arange(S)[None, None, :] < counts_BG[..., None]
    ids_BGS = np.full((B, G, S), -1, dtype=np.int64)
    logp_BGS = np.zeros((B, G, S), dtype=np.float32)
    ids_BGS[has_BGS] = _column(table, "discard_ids").flatten().to_numpy(zero_copy_only=False)
    logp_BGS[has_BGS] = _column(table, "discard_logp").flatten().to_numpy(zero_copy_only=False)

    def optional(name: str, fill: float) -> "torch.Tensor | None":
        col = _column(table, name)
        if not len(col.flatten()):
            return None
        if not np.array_equal(_lengths(col), _lengths(_column(table, "discard_ids"))):
            raise ValueError(f"{name} must be empty or hold one value per discarded draw in every row")
        values_BGS = np.full((B, G, S), fill, dtype=np.float32)
        values_BGS[has_BGS] = col.flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(values_BGS)

    return {
        "discard_ids_BGS": torch.from_numpy(ids_BGS),
        "discard_logp_BGS": torch.from_numpy(logp_BGS),
        "discard_cutoff_BGS": optional("discard_cutoff", -np.inf),
        "discard_rb_logp_BGS": optional("discard_rb_logp", 0.0),
    }


def _tensor(array: np.ndarray, dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    # Arrow-backed numpy arrays are read-only; torch needs owned memory, so this is the one copy.
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


def table_to_trajectory(table: pa.Table, pad_id: int) -> Trajectory:
    """A batch of whole groups (as ``ReplayQueue.get`` returns) → one learner ``Trajectory``.

    Prompts are left-padded with ``pad_id``; ``group_B`` numbers groups 0.. in table order. Extras:
    ``correct_B``, ``sample_index_B``, ``reward_components`` ({name: [B]}), ``group_ids``, ``tasks``,
    ``worker_ids`` (one per group).
    """
    import torch

    from common.trajectory import Trajectory

    check_schema(table.schema)
    B = table.num_rows
    if B == 0:
        raise ValueError("table_to_trajectory needs at least one row")
    prompt_ids_BP, prompt_mask_BP = _left_pad(_column(table, "prompt_ids"), pad_id)
    per_token = {name: _uniform_list(table, name, B) for name in PER_TOKEN}
    per_step = {name: _uniform_list(table, name, B) for name in PER_STEP}
    banned_BK = _uniform_list(table, "banned_ids", B)
    if (banned_BK != banned_BK[:1]).any():
        raise ValueError("banned_ids differ across rows; one learner batch must use one sampler setting")

    group_codes = pc.dictionary_encode(_column(table, "group_id"))  # codes in order of first appearance
    G, T = per_token["completion_ids"].shape[1], per_step["step_entropy"].shape[1]
    block_length = int(_uniform_scalar(table, "block_length"))
    block_grid = str(_uniform_scalar(table, "block_grid"))
    rounds = block_rounds(G, block_length, block_grid) if block_length > 0 else 1
    discards = _discards(table, B, G, max(T // rounds - 1, 0))
    first_row = np.unique(group_codes.indices.to_numpy(), return_index=True)[1]
    return Trajectory(
        prompt_ids_BP=torch.from_numpy(prompt_ids_BP),
        prompt_mask_BP=torch.from_numpy(prompt_mask_BP),
        completion_ids_BG=_tensor(per_token["completion_ids"], torch.int64),
        unmask_step_BG=_tensor(per_token["unmask_step"], torch.int64),
        logp_BG=_tensor(per_token["logp"], torch.float32),
        entropy_BG=_tensor(per_token["entropy"], torch.float32),
        margin_BG=_tensor(per_token["margin"], torch.float32),
        cutoff_BG=_tensor(per_token["cutoff"], torch.float32),
        step_entropy_BT=_tensor(per_step["step_entropy"], torch.float32),
        step_margin_BT=_tensor(per_step["step_margin"], torch.float32),
        step_committed_BT=_tensor(per_step["step_committed"], torch.int64),
        temperature=float(_uniform_scalar(table, "temperature")),
        block_length=block_length,
        banned_ids=tuple(int(i) for i in banned_BK[0]),
        **discards,
        commit_reads_draws=bool(_uniform_scalar(table, "commit_reads_draws")),
        block_grid=block_grid,
        rewards_B=_tensor(_column(table, "reward").to_numpy(), torch.float32),
        group_B=_tensor(group_codes.indices.to_numpy(), torch.int64),
        policy_version_B=_tensor(_column(table, "policy_version").to_numpy(), torch.int64),
        extras={
            "correct_B": _tensor(_column(table, "correct").to_numpy(zero_copy_only=False), torch.bool),
            "sample_index_B": _tensor(_column(table, "sample_index").to_numpy(), torch.int64),
            "reward_components": _reward_components(table, B),
            "group_ids": group_codes.dictionary.to_pylist(),
            "tasks": _column(table, "task").take(first_row).to_pylist(),
            "worker_ids": _column(table, "worker_id").take(first_row).to_pylist(),
            "filled_BG": _tensor(_uniform_list(table, "filled", B), torch.bool),
            "position_ids": str(_uniform_scalar(table, "position_ids")),
            "cache": str(_uniform_scalar(table, "cache")),
            "cache_refresh": int(_uniform_scalar(table, "cache_refresh")) or None,
            "open_block": str(_uniform_scalar(table, "open_block")),
            **_routing(table, B, prompt_ids_BP.shape[1] + G, T, block_length),
            **_canvases(table, B),
            **_edits(table, B, T, block_length),
        },
    )


def _routing(table: pa.Table, B: int, L: int, T: int, K: int) -> dict[str, "torch.Tensor"]:
    """The routing record as the sampler made it (settled routing left-padded with -1), or nothing."""
    import torch

    R = int(_uniform_scalar(table, "routing_width"))
    if R == 0:
        return {}
    settled, _ = _left_pad(_column(table, "routing_settled"), -1)  # padding columns lead, R entries each
    return {"routing_settled_BLR": _tensor(settled.reshape(B, L, R), torch.int16),
            "routing_step_BTKR": _tensor(_uniform_list(table, "routing_step", B).reshape(B, T, K, R), torch.int16)}


def _canvases(table: pa.Table, B: int) -> dict:
    """A canvas rollout's record as ``rollout.uniform_sampler.canvas_trajectory`` made it, or nothing."""
    import torch

    if not _lengths(_column(table, "canvas_shape")).any():
        return {}
    shape = tuple(int(x) for x in _uniform_list(table, "canvas_shape", B)[0])
    dtypes = {"active_BKS": torch.bool, "step_logp_BKS": torch.float32, "canvas_BKSC": torch.int64,
              "draws_BKSC": torch.int64, "accepted_BKSC": torch.bool}
    out = {}
    for name, (key, _) in CANVAS.items():
        dims = shape[:2] if key.endswith("_BKS") else shape
        out[key] = _tensor(_uniform_list(table, name, B).reshape(B, *dims), dtypes[key])
    t_range = _uniform_list(table, "canvas_t_range", B)
    if (t_range != t_range[:1]).any():
        raise ValueError("canvas_t_range differs across rows; one learner batch must use one sampler setting")
    out["canvas_t_range"] = (float(t_range[0, 0]), float(t_range[0, 1]))
    return out


def _edits(table: pa.Table, B: int, T: int, K: int) -> dict:
    """A token-editing rollout's record as the sampler made it, or nothing."""
    import torch

    if not _lengths(_column(table, "edit_draws")).any():
        return {}
    dtypes = {_i32: torch.int64, _f32: torch.float32}
    return {key: _tensor(_uniform_list(table, name, B).reshape(B, T, K), dtypes[t]) for name, (key, t) in EDIT.items()}

