"""The sampler's counter-based random stream in pure torch: Philox4x32-10 as ``tl.randint4x`` computes it.

Letters: N rows, V vocabulary, C Philox counters of a row.

Philox4x32-10 is computed with int64 tensors holding uint32 values; 32x32-bit products are split
into 16-bit halves so no intermediate ever exceeds 2**63 (torch has no uint32 multiply-high).

Layout (shared with the Triton kernel, which scans the vocabulary in tiles of ``4 * NOISE_Q``
columns and draws one Philox call per ``NOISE_Q`` lanes): column ``c`` of row id ``r`` uses output
word ``(c // NOISE_Q) % 4`` of the Philox call with key = seed and counter
``(r * ceil(V / (4 * NOISE_Q)) + c // (4 * NOISE_Q)) * NOISE_Q + c % NOISE_Q``. One Philox call thus
feeds four columns, which is what keeps the kernel's integer work per element affordable.
"""
from __future__ import annotations

import torch

NOISE_Q = 1024  # lanes per Philox call in a vocabulary tile; the kernel's tile is 4 * NOISE_Q columns

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplies counter word 0 (Triton's PHILOX_ROUND_A)
_ROUND_B = 0xCD9E8D57  # multiplies counter word 2 (Triton's PHILOX_ROUND_B)
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85

# Constants of the uint32 -> exponential variate conversion (fp32, identical in the kernel).
_TWO_M32 = 2.0**-32
_TWO_M33 = 2.0**-33
_V_MAX = 1.0 - 2.0**-24  # largest fp32 below 1: keeps -log(1 - v) finite
_SERIES_BELOW = 2.0**-6  # below it -log(1 - v) is a 4-term series (1 - v would lose v's low bits)
_LN2 = 0.6931471805599453


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    p_hi = b * (a >> 16)  # < 2**48
    p_lo = b * (a & 0xFFFF)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64) per int64 ``counter`` >= 0; equals ``tl.randint4x(seed, counter)`` (Triton 3.9)."""
    zero = torch.zeros_like(counter)
    return philox_rounds((counter & _MASK32, counter >> 32, zero, zero), (seed & _MASK32, (seed >> 32) & _MASK32))


def philox_rounds(counter: tuple[torch.Tensor, ...], key: tuple[int, int], n_rounds: int = 10):
    """Philox4x32 on a 4-word counter (uint32 values in int64 tensors) and a 2-word key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def exponential_from_uint32(r: torch.Tensor) -> torch.Tensor:
    """Exponential(1) variates E = -log(1 - v), v = (r + 1/2) / 2**32, in fp32 (Gumbel noise is -log E).

    The upper Gumbel tail comes from small v, where fp32 is dense, so the tail is resolved to
    ~2**-32 instead of the 2**-24 grid that ``tl.rand``'s [0, 1) floats give near 1.
    """
    v = r.to(torch.float32) * _TWO_M32 + _TWO_M33
    v = v.clamp(max=_V_MAX)
    series = v * (1.0 + v * (0.5 + v * (1.0 / 3.0 + v * 0.25)))
    return torch.where(v < _SERIES_BELOW, series, torch.log2(1.0 - v) * -_LN2)


def _noise_words(seed: int, row_ids_N: torch.Tensor, V: int) -> torch.Tensor:
    """Raw uint32 words (int64) of the stream for rows ``row_ids_N`` and columns 0..V-1: [N, V]."""
    tile = 4 * NOISE_Q
    n_tiles = -(-V // tile)
    counter_row_N = row_ids_N.to(torch.int64)[:, None] * (n_tiles * NOISE_Q)
    if V <= NOISE_Q:  # one tile, word 0 only: skip the counters no column uses
        return philox4x32_10(seed, counter_row_N + torch.arange(V, device=row_ids_N.device))[0]
    lane_C = torch.arange(n_tiles * NOISE_Q, device=row_ids_N.device, dtype=torch.int64)
    words = philox4x32_10(seed, counter_row_N + lane_C[None, :])
    N = row_ids_N.shape[0]
    # word q of counter (tile t, lane i) belongs to column t * 4Q + q * Q + i
    words_NTWQ = torch.stack([w.view(N, n_tiles, NOISE_Q) for w in words], dim=2)
    return words_NTWQ.reshape(N, n_tiles * tile)[:, :V]


def exponential_noise(seed: int, row_ids_N: torch.Tensor, V: int, max_elements: int = 1 << 25) -> torch.Tensor:
    """Exponential(1) variates [N, V] fp32 of the sampler's stream; Gumbel-max uses key = x/T - log E.

    Eager runs are chunked over rows so the int64 temporaries stay under ~``max_elements``;
    under torch.compile the whole stream is one fused kernel and needs no chunks.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    N = row_ids_N.shape[0]
    if torch.compiler.is_compiling() or N * V <= max_elements:
        return exponential_from_uint32(_noise_words(seed, row_ids_N, V))
    rows = max(1, max_elements // V)
    return torch.cat(
        [exponential_from_uint32(_noise_words(seed, row_ids_N[i : i + rows], V)) for i in range(0, N, rows)]
    )
