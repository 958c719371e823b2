"""Triton fused masked-logit sampling: one read of each row's logits gives the sample and its statistics.

Letters: N scored rows, V vocabulary, S vocabulary splits per row, Q lanes (``NOISE_Q``).

Pass 1 (grid N x S) scans columns in tiles of 4Q; every lane keeps its own online state (max,
sum of 2^(s-max), sum of 2^(s-max)(s-max), second max, Gumbel-max candidate, full-vocab T=1 max
and sum), updating its max and rescaling its sums once per 4 columns, so the loop has no
cross-thread reductions; the lanes are reduced once per program and written as one partial per
(row, split). Pass 2 (grid N) merges the S partials and finishes logp,
entropy, margin and confidence. S > 1 only when there are too few rows to fill the GPU.

``launch_configs`` lists every variant the launcher can have Triton compile (logit dtype, constexprs,
warps); ``rollout.kernels.compile_check`` compiles each for sm_80 and sm_90 without a GPU. Integer
arguments are typed in the kernel signatures, and arguments whose value or alignment does not matter
to the code are not specialized on, so the JIT builds no variants beyond these and the alignment of
the caller's logits.

All math is base 2 (exp2/log2 are the hardware's native transcendentals): s = x * log2(e) / T.
The Gumbel-max key of a column is s - log2(E) with E the Exponential(1) variate of the Philox stream
in ``rollout.kernels.philox``; inside a lane it is compared as the ratio 2^(s - max) / E, which
reuses the exp2 of the online sum and so costs one log2 per column instead of two.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rollout.kernels.philox import NOISE_Q
from rollout.kernels.reference import LOG2E, RowStats

_EXCLUDED = tl.constexpr(-3.0e38)  # scaled logit of a column outside the support (finite, so 0 * it is 0)
_INIT = tl.constexpr(-1.0e30)  # initial lane max: above _EXCLUDED so excluded columns never move it
# Logit dtypes the kernels are compiled and checked for, with Triton's name of each.
LOGIT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PARTIAL_WARPS = 8  # at T>0 at most 128 registers: 2 programs (16 warps) per SM; 4 warps need 240
_FINISH_WARPS = 1
# The finish kernel holds S_BLOCK partials per row in one warp's registers: S_BLOCK 1024 spills on sm_90.
MAX_SPLITS = 512
_S_BLOCKS = (32, 128, MAX_SPLITS)  # below 32, one partial per lane of the warp, a smaller block saves nothing


@triton.jit
def _philox4x32_10(c0, c1, k0, k1):
    """Philox4x32-10 of counter (c0, c1, 0, 0) and key (k0, k1), bit-equal to ``tl.randint4x``.

    Each 32x32 product is one 64-bit multiply of zero-extended words (one IMAD.WIDE giving high
    and low halves) instead of separate multiply-high and multiply-low instructions.
    """
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(10):
        p_b = c2.to(tl.uint64) * 0xCD9E8D57
        p_a = c0.to(tl.uint64) * 0xD2511F53
        c0 = (p_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p_b.to(tl.uint32)
        c3 = p_a.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _exponential(r, FAST_LOG2: tl.constexpr):
    """Exponential(1) variate from a uint32 word; same fp32 formula as philox.exponential_from_uint32."""
    v = r.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    v = tl.minimum(v, 0.9999999403953552)
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25)))
    if FAST_LOG2:  # lg2.approx: |error| < 2^-22 on log2(1 - v) <= -0.022, E off by < 1e-5 relative
        log2_w = libdevice.fast_log2f(1.0 - v)
    else:  # the interpreter has no libdevice
        log2_w = tl.log2(1.0 - v)
    return tl.where(v < 0.015625, series, log2_w * -0.6931471805599453)


@triton.jit
def _load_scaled(x_row, cols, end, cutoff, scale2, HAS_CUTOFF: tl.constexpr):
    """Q columns as fp32 logits x and scaled logits s (``_EXCLUDED`` outside the support)."""
    x = tl.load(x_row + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
    # masked loads give -inf, which the maximum turns into _EXCLUDED like any -inf logit
    s = tl.maximum(x * scale2, _EXCLUDED)
    if HAS_CUTOFF:
        s = tl.where(x >= cutoff, s, _EXCLUDED)
    return x, s


@triton.jit
def _top2(t1, t2, s):
    """Insert s into each lane's (largest, second largest)."""
    return tl.maximum(t1, s), tl.maximum(t2, tl.minimum(t1, s))


@triton.jit
def _accumulate(x, s, cols, word, m, se, sx, nb, eb, bk, bi, cutoff,
                SAMPLE: tl.constexpr, HAS_CUTOFF: tl.constexpr, FAST_LOG2: tl.constexpr):
    """Add Q columns to the lanes' sums relative to their (already updated) max m, and the sample."""
    d = s - m  # <= 0; _EXCLUDED columns give e = 0 and e * d = 0
    e = tl.exp2(d)
    se = se + e
    sx = sx + e * d
    if SAMPLE:
        ex = _exponential(word, FAST_LOG2)
        better = e * eb > nb * ex  # 2^(s-m) / E beats the lane's best nb / eb, without a division
        nb = tl.where(better, e, nb)
        eb = tl.where(better, ex, eb)
        bi = tl.where(better, cols, bi)
    else:
        key = x
        if HAS_CUTOFF:
            key = tl.where(x >= cutoff, x, float("-inf"))
        better = key > bk
        bk = tl.where(better, key, bk)
        bi = tl.where(better, cols, bi)
    return se, sx, nb, eb, bk, bi


@triton.jit
def _merge_max_sums(m, se, sx):
    """Merge per-lane (max, sum 2^(s-max), sum 2^(s-max)(s-max)) into one triple."""
    mt = tl.max(m, axis=0)
    w = tl.exp2(m - mt)
    set_ = tl.sum(se * w, axis=0)
    sxt = tl.sum(w * (sx + (m - mt) * se), axis=0)
    return mt, set_, sxt


@triton.jit
def _second_max(m, t2, BLOCK: tl.constexpr):
    """Second largest value over lanes given each lane's max and second max."""
    idx = tl.arange(0, BLOCK)
    first = tl.argmax(m, axis=0)
    return tl.maximum(tl.max(t2, axis=0), tl.max(tl.where(idx == first, _INIT, m), axis=0))


# seed: one variant for every seed; row_ids and cutoff are read once per program, their alignment is moot
@triton.jit(do_not_specialize=["seed"], do_not_specialize_on_alignment=["row_ids_ptr", "cutoff_ptr"])
def _partial_kernel(x_ptr, stride_row: tl.int64, row_ids_ptr, cutoff_ptr, part_f_ptr, part_i_ptr,
                    V: tl.int32, cols_per_split: tl.int32, scale2: tl.float32, seed: tl.int64,
                    Q: tl.constexpr, SAMPLE: tl.constexpr, HAS_CUTOFF: tl.constexpr,
                    SEPARATE_CONF: tl.constexpr, FAST_LOG2: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    x_row = x_ptr + row.to(tl.int64) * stride_row
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, V)
    cutoff = float("-inf")
    if HAS_CUTOFF:
        cutoff = tl.load(cutoff_ptr + row).to(tl.float32)
    lanes = tl.arange(0, Q)
    m = tl.full([Q], _INIT, tl.float32)
    t2 = tl.full([Q], _INIT, tl.float32)
    mf = tl.full([Q], _INIT, tl.float32)
    se = tl.zeros([Q], tl.float32)
    sx = tl.zeros([Q], tl.float32)
    sf = tl.zeros([Q], tl.float32)
    nb = tl.zeros([Q], tl.float32)
    eb = tl.full([Q], 1.0, tl.float32)
    bk = tl.full([Q], float("-inf"), tl.float32)
    bi = tl.full([Q], 2147483647, tl.int32)
    counter_row = tl.load(row_ids_ptr + row).to(tl.int64) * tl.cdiv(V, 4 * Q)
    seed64 = tl.full([], seed, tl.int64)  # seed < 2**63, so the bits equal the uint64 key
    k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0 = lanes.to(tl.uint32)
    w1 = w0
    w2 = w0
    w3 = w0
    for base in range(start, end, 4 * Q):
        if SAMPLE:
            counter = (counter_row + base // (4 * Q)) * Q + lanes
            w0, w1, w2, w3 = _philox4x32_10(counter.to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
        c0 = base + lanes
        c1 = c0 + Q
        c2 = c1 + Q
        c3 = c2 + Q
        x0, s0 = _load_scaled(x_row, c0, end, cutoff, scale2, HAS_CUTOFF)
        x1, s1 = _load_scaled(x_row, c1, end, cutoff, scale2, HAS_CUTOFF)
        x2, s2 = _load_scaled(x_row, c2, end, cutoff, scale2, HAS_CUTOFF)
        x3, s3 = _load_scaled(x_row, c3, end, cutoff, scale2, HAS_CUTOFF)
        # one max update (and one rescale of the sums) per lane per 4 columns, not per column
        m_old = m
        m, t2 = _top2(m, t2, s0)
        m, t2 = _top2(m, t2, s1)
        m, t2 = _top2(m, t2, s2)
        m, t2 = _top2(m, t2, s3)
        shift = m_old - m  # <= 0, finite: both are >= _INIT
        corr = tl.exp2(shift)
        sx = corr * (sx + shift * se)
        se = se * corr
        nb = nb * corr
        se, sx, nb, eb, bk, bi = _accumulate(x0, s0, c0, w0, m, se, sx, nb, eb, bk, bi, cutoff,
                                             SAMPLE, HAS_CUTOFF, FAST_LOG2)
        se, sx, nb, eb, bk, bi = _accumulate(x1, s1, c1, w1, m, se, sx, nb, eb, bk, bi, cutoff,
                                             SAMPLE, HAS_CUTOFF, FAST_LOG2)
        se, sx, nb, eb, bk, bi = _accumulate(x2, s2, c2, w2, m, se, sx, nb, eb, bk, bi, cutoff,
                                             SAMPLE, HAS_CUTOFF, FAST_LOG2)
        se, sx, nb, eb, bk, bi = _accumulate(x3, s3, c3, w3, m, se, sx, nb, eb, bk, bi, cutoff,
                                             SAMPLE, HAS_CUTOFF, FAST_LOG2)
        if SEPARATE_CONF:  # full vocabulary at T=1; -inf logits give 2^-inf = 0, no guard needed
            f0 = x0 * 1.4426950408889634
            f1 = x1 * 1.4426950408889634
            f2 = x2 * 1.4426950408889634
            f3 = x3 * 1.4426950408889634
            mf_new = tl.maximum(tl.maximum(tl.maximum(mf, f0), tl.maximum(f1, f2)), f3)
            sf = sf * tl.exp2(mf - mf_new) + tl.exp2(f0 - mf_new) + tl.exp2(f1 - mf_new) \
                + tl.exp2(f2 - mf_new) + tl.exp2(f3 - mf_new)
            mf = mf_new

    # --- reduce the lanes to one partial of this (row, split)
    if SAMPLE:
        bk = m + tl.log2(nb) - tl.log2(eb)  # the lane's best key s - log2(E); nb = 0 gives -inf
    k = tl.max(bk, axis=0)
    i = tl.min(tl.where(bk == k, bi, 2147483647), axis=0)  # lowest column among equal keys
    t2_all = _second_max(m, t2, Q)
    m_all, se_all, sx_all = _merge_max_sums(m, se, sx)
    mf_all = tl.max(mf, axis=0)
    sf_all = tl.sum(sf * tl.exp2(mf - mf_all), axis=0)
    out = part_f_ptr + (row * n_split + split) * 8
    tl.store(out + 0, m_all)
    tl.store(out + 1, se_all)
    tl.store(out + 2, sx_all)
    tl.store(out + 3, t2_all)
    tl.store(out + 4, k)
    tl.store(out + 5, mf_all)
    tl.store(out + 6, sf_all)
    tl.store(part_i_ptr + row * n_split + split, i)


# reads one logit per row: neither its alignment nor the row's shape is worth a variant
@triton.jit(do_not_specialize=["stride_row", "n_split", "V"], do_not_specialize_on_alignment=["x_ptr"])
def _finish_kernel(x_ptr, stride_row: tl.int64, part_f_ptr, part_i_ptr, n_split: tl.int32, V: tl.int32,
                   scale2: tl.float32,
                   token_ptr, logp_ptr, entropy_ptr, margin_ptr, conf_ptr,
                   S_BLOCK: tl.constexpr, SEPARATE_CONF: tl.constexpr):
    row = tl.program_id(0)
    splits = tl.arange(0, S_BLOCK)
    ok = splits < n_split
    part = part_f_ptr + (row * n_split + splits) * 8
    m = tl.load(part + 0, mask=ok, other=_INIT)
    se = tl.load(part + 1, mask=ok, other=0.0)
    sx = tl.load(part + 2, mask=ok, other=0.0)
    t2 = tl.load(part + 3, mask=ok, other=_INIT)
    k = tl.load(part + 4, mask=ok, other=float("-inf"))
    mf = tl.load(part + 5, mask=ok, other=_INIT)
    sf = tl.load(part + 6, mask=ok, other=0.0)
    i = tl.load(part_i_ptr + row * n_split + splits, mask=ok, other=2147483647)

    m_all, se_all, sx_all = _merge_max_sums(m, se, sx)
    t2_all = _second_max(m, t2, S_BLOCK)
    k_all = tl.max(k, axis=0)
    token = tl.min(tl.where(k == k_all, i, 2147483647), axis=0)
    token = tl.where(token < V, token, 0)  # a row of -inf logits: torch.argmax's answer
    x_tok = tl.load(x_ptr + row.to(tl.int64) * stride_row + token).to(tl.float32)

    log2_se = tl.log2(se_all)
    log2_z = m_all + log2_se
    s_tok = tl.maximum(x_tok * scale2, _EXCLUDED)
    ln2 = 0.6931471805599453
    if SEPARATE_CONF:
        mf_all = tl.max(mf, axis=0)
        log2_zf = mf_all + tl.log2(tl.sum(sf * tl.exp2(mf - mf_all), axis=0))
    else:
        log2_zf = log2_z
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logp_ptr + row, (s_tok - log2_z) * ln2)
    tl.store(entropy_ptr + row, (log2_se - sx_all / se_all) * ln2)
    tl.store(margin_ptr + row, tl.exp2(m_all - log2_z) - tl.exp2(t2_all - log2_z))
    tl.store(conf_ptr + row, tl.exp2(x_tok * 1.4426950408889634 - log2_zf))


@dataclass(frozen=True)
class KernelLaunch:
    """One variant of a kernel as the launcher has Triton compile it.

    ``signature``: Triton type of each runtime argument. ``aligned``: arguments always 16-divisible
    (the launcher's own buffers and tile counts); ``caller_aligned``: those that are when the caller's
    logits are (row start and row length), so the JIT builds one variant with and one without them.
    """

    kernel: triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    aligned: tuple[str, ...]
    caller_aligned: tuple[str, ...] = ()
    programs_per_sm: int = 1  # occupancy the variant is tuned for (limited by its registers)
    name: str = field(init=False)

    def __post_init__(self):
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        object.__setattr__(self, "name", f"{self.kernel.__name__}[{self.signature['x_ptr'][1:]},{flags}]")


def _flags(temperature: float, has_cutoff: bool) -> dict[str, bool]:
    """Constexpr flags of both kernels for a temperature and an optional support cut-off."""
    sample = temperature > 0
    # a separate T=1 full-vocabulary softmax for the confidence unless p~ is that distribution already
    return dict(SAMPLE=sample, HAS_CUTOFF=has_cutoff, SEPARATE_CONF=has_cutoff or (sample and temperature != 1.0))


def _s_block(n_split: int) -> int:
    """The finish kernel's block of partials: few sizes, so few variants to compile."""
    return next(b for b in _S_BLOCKS if b >= n_split)


def _partial_launch(x_type: str, flags: dict[str, bool]) -> KernelLaunch:
    return KernelLaunch(
        _partial_kernel,
        dict(x_ptr=f"*{x_type}", stride_row="i64", row_ids_ptr="*i64", cutoff_ptr="*fp32", part_f_ptr="*fp32",
             part_i_ptr="*i32", V="i32", cols_per_split="i32", scale2="fp32", seed="i64"),
        dict(Q=NOISE_Q, **flags, FAST_LOG2=True),  # FAST_LOG2 off only under the interpreter
        _PARTIAL_WARPS,
        aligned=("part_f_ptr", "part_i_ptr", "cols_per_split"),
        caller_aligned=("x_ptr", "stride_row", "V"),
        programs_per_sm=2,
    )


def _finish_launch(x_type: str, s_block: int, separate_conf: bool) -> KernelLaunch:
    return KernelLaunch(
        _finish_kernel,
        dict(x_ptr=f"*{x_type}", stride_row="i64", part_f_ptr="*fp32", part_i_ptr="*i32", n_split="i32", V="i32",
             scale2="fp32", token_ptr="*i64", logp_ptr="*fp32", entropy_ptr="*fp32", margin_ptr="*fp32",
             conf_ptr="*fp32"),
        dict(S_BLOCK=s_block, SEPARATE_CONF=separate_conf),
        _FINISH_WARPS,
        aligned=("part_f_ptr", "part_i_ptr", "token_ptr", "logp_ptr", "entropy_ptr", "margin_ptr", "conf_ptr"),
    )


def launch_configs() -> list[KernelLaunch]:
    """Every kernel variant ``sample_rows_triton`` can launch on CUDA (the compile check's list)."""
    flag_sets = {tuple(_flags(t, c).items()) for t in (0.0, 1.0, 0.7) for c in (False, True)}
    s_blocks = sorted({_s_block(n) for n in range(1, MAX_SPLITS + 1)})
    launches = []
    for x_type in LOGIT_DTYPES.values():
        for flags in sorted(flag_sets):
            launches.append(_partial_launch(x_type, dict(flags)))
        for s_block in s_blocks:
            for separate_conf in (False, True):
                launches.append(_finish_launch(x_type, s_block, separate_conf))
    return launches


def _default_splits(N: int, V: int, device: torch.device) -> int:
    """Vocabulary splits per row: enough programs for ~4 per SM when rows are few, else 1."""
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    max_splits = min(MAX_SPLITS, triton.cdiv(V, 4 * NOISE_Q))
    return max(1, min(max_splits, triton.cdiv(4 * n_sm, N)))


def sample_rows_triton(
    logits_NV: torch.Tensor,
    temperature: float,
    seed: int,
    row_ids_N: torch.Tensor,
    cutoff_N: torch.Tensor | None = None,
    n_split: int | None = None,
) -> RowStats:
    """Triton version of ``sample_rows_reference`` (same stream, same semantics); ``n_split`` is for tests."""
    if logits_NV.dim() != 2:
        raise ValueError(f"logits_NV must be [N, V], got shape {tuple(logits_NV.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if logits_NV.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits dtype must be one of {list(LOGIT_DTYPES)}, got {logits_NV.dtype}; use kernel='torch'")
    if n_split is not None and not 1 <= n_split <= MAX_SPLITS:
        raise ValueError(f"n_split must be in [1, {MAX_SPLITS}], got {n_split}")
    if logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    N, V = logits_NV.shape
    if V >= 2**31 - 1:
        raise ValueError(f"vocabulary of {V} columns exceeds the kernel's int32 column index")
    device = logits_NV.device
    has_cutoff = cutoff_N is not None
    flags = _flags(temperature, has_cutoff)
    if n_split is None:
        n_split = _default_splits(N, V, device)
    tile = 4 * NOISE_Q
    cols_per_split = triton.cdiv(triton.cdiv(V, n_split), tile) * tile
    n_split = triton.cdiv(V, cols_per_split)
    part_f = torch.empty(N, n_split, 8, device=device, dtype=torch.float32)
    part_i = torch.empty(N, n_split, device=device, dtype=torch.int32)
    row_ids = row_ids_N.to(device=device, dtype=torch.int64).contiguous()
    cutoff = cutoff_N.to(device=device, dtype=torch.float32).contiguous() if has_cutoff else part_f
    scale2 = LOG2E / (temperature if flags["SAMPLE"] else 1.0)
    if N > 0:
        _partial_kernel[(N, n_split)](
            logits_NV, logits_NV.stride(0), row_ids, cutoff, part_f, part_i,
            V, cols_per_split, scale2, int(seed),
            Q=NOISE_Q, **flags, FAST_LOG2=device.type == "cuda", num_warps=_PARTIAL_WARPS,
        )
    out = RowStats(
        token_N=torch.empty(N, device=device, dtype=torch.int64),
        logp_N=torch.empty(N, device=device, dtype=torch.float32),
        entropy_N=torch.empty(N, device=device, dtype=torch.float32),
        margin_N=torch.empty(N, device=device, dtype=torch.float32),
        confidence_N=torch.empty(N, device=device, dtype=torch.float32),
    )
    if N > 0:
        _finish_kernel[(N,)](
            logits_NV, logits_NV.stride(0), part_f, part_i, n_split, V, scale2,
            out.token_N, out.logp_N, out.entropy_N, out.margin_N, out.confidence_N,
            S_BLOCK=_s_block(n_split), SEPARATE_CONF=flags["SEPARATE_CONF"], num_warps=_FINISH_WARPS,
        )
    return out
