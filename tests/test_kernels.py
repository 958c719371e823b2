"""Fused sampling kernel: Philox stream, reference vs float64 math, Triton (interpreted on CPU) vs reference.

Letters: N rows, V vocabulary.

Triton's interpreter is chosen when a kernel is decorated and needs TRITON_INTERPRET=1 before triton
itself is imported, so the interpreted runs happen in one subprocess; this pytest process never
sees the variable, and the GPU tests in it get the compiled kernel.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout.kernels import sample_rows, sample_rows_reference, support_cutoff
from rollout.kernels.philox import exponential_noise, philox4x32_10, philox_rounds
from rollout.kernels.reference import LOG2E

REPO = Path(__file__).resolve().parents[1]


# --- the Philox stream


def test_philox_matches_random123_known_answers():
    as_t = lambda *vals: tuple(torch.tensor([v], dtype=torch.int64) for v in vals)  # noqa: E731
    out = philox_rounds(as_t(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))
    assert [o.item() for o in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    out = philox_rounds(as_t(*[0xFFFFFFFF] * 4), (0xFFFFFFFF, 0xFFFFFFFF))
    assert [o.item() for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert [o.item() for o in philox4x32_10(0, torch.zeros(1, dtype=torch.int64))] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8,
    ]


def test_exponential_noise_is_exponential_and_keyed_by_row_id():
    rows_N = torch.tensor([5, 9, 2**40 + 3])
    e_NV = exponential_noise(11, rows_N, 20_000)
    assert e_NV.dtype == torch.float32 and bool((e_NV > 0).all()) and bool(torch.isfinite(e_NV).all())
    # Exponential(1): mean 1, P(E < 0.01) = 1 - exp(-0.01); 60k draws give ~0.4% / ~4% standard errors
    assert abs(e_NV.double().mean().item() - 1.0) < 0.02
    assert abs((e_NV < 0.01).double().mean().item() / (1 - math.exp(-0.01)) - 1) < 0.2
    assert torch.equal(exponential_noise(11, rows_N[1:2], 20_000), e_NV[1:2])
    assert not torch.equal(exponential_noise(12, rows_N, 20_000), e_NV)
    assert torch.equal(exponential_noise(11, rows_N, 20_000, max_elements=25_000), e_NV)  # chunked


# --- the reference against float64 math


def _float64_stats(logits_NV, temperature, cutoff_N, token_N):
    x = logits_NV.double()
    support = torch.ones_like(x, dtype=torch.bool) if cutoff_N is None else x >= cutoff_N[:, None].double()
    t = temperature if temperature > 0 else 1.0
    logp_all = torch.log_softmax((x / t).masked_fill(~support, -math.inf), -1)
    p = logp_all.exp()
    entropy = -(p * logp_all.nan_to_num(neginf=0.0)).sum(-1)
    top2 = p.sort(-1, descending=True).values[:, :2]
    conf = torch.softmax(x, -1).gather(1, token_N[:, None])[:, 0]
    return logp_all.gather(1, token_N[:, None])[:, 0], entropy, top2[:, 0] - top2[:, 1], conf, support


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
@pytest.mark.parametrize("top_k", [None, 5])
def test_reference_matches_float64(temperature, top_k):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 301, generator=gen) * 3).to(torch.bfloat16)
    cutoff = support_cutoff(logits, temperature, top_k, None)
    out = sample_rows_reference(logits, temperature, 17, torch.arange(9), cutoff)
    logp, entropy, margin, conf, support = _float64_stats(logits, temperature, cutoff, out.token_N)
    assert bool(support.gather(1, out.token_N[:, None]).all())
    if temperature == 0:
        assert torch.equal(out.token_N, logits.float().argmax(-1))
    for got, want in [(out.logp_N, logp), (out.entropy_N, entropy), (out.margin_N, margin), (out.confidence_N, conf)]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_reference_argmax_takes_first_of_ties():
    logits = torch.zeros(2, 10)
    logits[0, [3, 7]] = 2.0
    logits[1, [1, 8]] = 5.0
    assert sample_rows_reference(logits, 0.0, 0, torch.arange(2)).token_N.tolist() == [3, 1]


def test_reference_samples_follow_the_support_distribution():
    """30k rows of the same logits with distinct row ids: token frequencies vs p~ (chi-square)."""
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -6.0, 0.2, 1.1])
    n, temperature = 30_000, 0.8
    logits = logits_V.expand(n, -1)
    cutoff = support_cutoff(logits, temperature, 8, None)
    out = sample_rows_reference(logits, temperature, 2024, torch.arange(n) * 7 + 100, cutoff)
    p_V = torch.softmax(logits_V.double() / temperature, -1) * (logits_V >= cutoff[0])
    p_V = p_V / p_V.sum()
    counts_V = torch.bincount(out.token_N, minlength=len(logits_V)).double()
    assert counts_V[p_V == 0].sum() == 0
    expected = n * p_V[p_V > 0]
    chi2 = ((counts_V[p_V > 0] - expected) ** 2 / expected).sum().item()
    # 7 degrees of freedom: P(chi2 > 35) ~ 1e-5; the seed is fixed, so this cannot flake
    assert chi2 < 35.0, chi2
    torch.testing.assert_close(out.logp_N[:50].double(), p_V.log()[out.token_N[:50]], atol=1e-5, rtol=1e-5)


def test_row_sample_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=gen)
    rows = torch.tensor([40, 41, 42, 43, 44, 45])
    full = sample_rows_reference(logits, 1.0, 5, rows)
    alone = sample_rows_reference(logits[3:4], 1.0, 5, rows[3:4])
    assert full.token_N[3] == alone.token_N[0]


def test_dispatch_rejects_unknown_or_unavailable_kernels():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sample_rows(logits, 1.0, 0, torch.arange(2), kernel="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        sample_rows(logits, 1.0, 0, torch.arange(2), kernel="triton")
    auto = sample_rows(logits, 1.0, 0, torch.arange(2))
    assert torch.equal(auto.token_N, sample_rows_reference(logits, 1.0, 0, torch.arange(2)).token_N)


def test_triton_launcher_rejects_what_it_compiles_no_variant_for():
    pytest.importorskip("triton")
    from rollout.kernels.triton_sampling import MAX_SPLITS, sample_rows_triton

    rows = torch.arange(2)
    with pytest.raises(ValueError, match="dtype"):
        sample_rows_triton(torch.randn(2, 10, dtype=torch.float64), 1.0, 0, rows)
    for n_split in (0, MAX_SPLITS + 1):
        with pytest.raises(ValueError, match="n_split"):
            sample_rows_triton(torch.randn(2, 10), 1.0, 0, rows, n_split=n_split)


# --- the Triton kernel under TRITON_INTERPRET=1 (CPU), against the reference

# (name, dtype, N, V, temperature, top_k, n_split, row_stride_pad)
_CASES = [
    ("f32-3x37-T0", "float32", 3, 37, 0.0, None, None, 0),
    ("bf16-3x37-T0.7-topk", "bfloat16", 3, 37, 0.7, 5, None, 0),
    ("f32-7x257-T1.3", "float32", 7, 257, 1.3, None, None, 0),
    ("bf16-7x257-T0-topk", "bfloat16", 7, 257, 0.0, 5, None, 0),
    ("bf16-3x1000-T0.7", "bfloat16", 3, 1000, 0.7, None, None, 0),
    ("f32-3x1000-T0.7-topk", "float32", 3, 1000, 0.7, 40, None, 0),
    ("f32-7x37-T1", "float32", 7, 37, 1.0, None, None, 0),
    ("bf16-3x1000-T1-topk", "bfloat16", 3, 1000, 1.0, 3, None, 0),
    ("f32-3x257-T0.7-stride", "float32", 3, 257, 0.7, None, None, 43),
    ("bf16-2x9000-T0.7-topk-split2", "bfloat16", 2, 9000, 0.7, 50, 2, 0),
    ("f32-2x9000-T0-split3", "float32", 2, 9000, 0.0, None, 3, 0),
    ("bf16-12x37-T0.9", "bfloat16", 12, 37, 0.9, None, None, 0),
    ("f32-3x40-T0-ties", "float32", 3, 40, 0.0, None, None, 0),
    ("f32-3x64-T0.7-neginf", "float32", 3, 64, 0.7, None, None, 0),
]

_SUBPROCESS = r"""
import json, sys, torch
from rollout.kernels.triton_sampling import sample_rows_triton
from rollout.kernels.reference import RowStats
cases, out_path = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for name, dtype, n, v, temperature, top_k, n_split, pad in cases:
    gen = torch.Generator().manual_seed(len(name) * 1000 + n * v)
    base = (torch.randn(n, v + pad, generator=gen) * 3).to(getattr(torch, dtype))
    logits = base[:, :v]  # row stride v + pad
    if name.endswith("ties"):
        logits[:, [5, 9, 30]] = 50.0
    if name.endswith("neginf"):
        logits[:, ::3] = float("-inf")
    cutoff = None
    if top_k is not None:
        cutoff = logits.float().topk(top_k, -1).values[:, -1]
    row_ids = torch.arange(n) * 13 + 2**33
    got = sample_rows_triton(logits, temperature, 99, row_ids, cutoff, n_split=n_split)
    results[name] = dict(logits=logits, cutoff=cutoff, row_ids=row_ids, got=got.__dict__)
torch.save(results, out_path)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every case through the interpreted kernel in one subprocess; returns {name: inputs + outputs}."""
    out = tmp_path_factory.mktemp("interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _SUBPROCESS, json.dumps(_CASES), str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_interpreted_kernel_matches_reference(interpreted, case):
    name, _, _, _, temperature, _, _, _ = case
    r = interpreted[name]
    want = sample_rows_reference(r["logits"], temperature, 99, r["row_ids"], r["cutoff"])
    got = r["got"]
    assert torch.equal(got["token_N"], want.token_N)  # same Philox stream, same key: bitwise the same draw
    for field in ("logp_N", "entropy_N", "margin_N", "confidence_N"):
        torch.testing.assert_close(got[field], getattr(want, field), atol=1e-5, rtol=1e-5, msg=field)


# --- full size on the GPU


def _gpu_logits(n, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, 126_464, device="cuda", generator=gen) * 4).to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.9, None), (0.9, 50), (1.0, None)])
def test_gpu_kernel_matches_reference_at_full_size(temperature, top_k):
    logits = _gpu_logits(512)
    rows = torch.arange(512, device="cuda") + 10_000
    cutoff = support_cutoff(logits, temperature, top_k, None)
    got = sample_rows(logits, temperature, 7, rows, cutoff, kernel="triton")
    want = sample_rows(logits, temperature, 7, rows, cutoff, kernel="torch")
    differ = got.token_N != want.token_N
    if temperature == 0:
        assert not bool(differ.any())
    else:
        # the kernel's lg2.approx/ex2.approx are off by ~1e-5 in the key: only near-ties may flip
        x = logits.float()
        if cutoff is not None:
            x = x.masked_fill(x < cutoff[:, None], -math.inf)
        key = x * torch.tensor(LOG2E / temperature, device="cuda") - exponential_noise(7, rows, x.shape[1]).log2()
        gap = key.gather(1, want.token_N[:, None]) - key.gather(1, got.token_N[:, None])
        assert int(differ.sum()) <= 2 and bool((gap.abs() < 1e-4).all())
    ok = ~differ
    for field in ("logp_N", "entropy_N", "margin_N", "confidence_N"):
        torch.testing.assert_close(getattr(got, field)[ok], getattr(want, field)[ok], atol=1e-4, rtol=1e-4, msg=field)


@pytest.mark.gpu
def test_gpu_few_rows_use_vocabulary_splits_and_match():
    logits = _gpu_logits(3, seed=1)[:, :100_003]
    rows = torch.tensor([1, 2, 3], device="cuda")
    got = sample_rows(logits, 0.0, 0, rows, kernel="triton")
    want = sample_rows(logits, 0.0, 0, rows, kernel="torch")
    assert torch.equal(got.token_N, want.token_N)
    torch.testing.assert_close(got.entropy_N, want.entropy_N, atol=1e-4, rtol=1e-4)
